"""Helpers shared by bench/kernels.py, bench/models.py and bench/plot.py.

Timing (METHOD: warm up, then the median of many runs):
  * CUDA: one pair of CUDA events around each run, median of >= 20 runs after the warm-up; with
    flush_l2 a 256 MB buffer is written before each run (outside the events) so that a
    memory-bound kernel does not read its inputs from the 50-60 MB L2 of the previous run.
  * CPU: time.perf_counter around each run, fewer runs.

The results JSON (DESIGN.md, "Benchmarks and GPU results"):
  {"device", "torch", "date", "csrc_sha256", "peak": {"copy_GBps", "bf16_matmul_TFLOPs", ...},
   "rows": [{"op", "impl", "pass", "dtype", "B", "H", "Nq", "Nk", "D", "ms", "GBps", "TFLOPs",
             "peak_mem_MB", "pct_peak", "ratio_to_best_baseline", ...}],
   "skipped": [{..., "reason"}], "meta": {...}}
"""
import contextlib
import datetime
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Every row has these keys (null where a field does not apply), in this order.
ROW_KEYS = ("op", "impl", "pass", "dtype", "B", "H", "Nq", "Nk", "D", "ms", "GBps", "TFLOPs",
            "peak_mem_MB", "pct_peak", "ratio_to_best_baseline")
TOP_KEYS = ("device", "torch", "date", "csrc_sha256", "peak", "rows", "skipped")
OPS = ("linear_attention", "softmax_attention", "model_fwd", "model_train")
PASSES = ("fwd", "fwd_bwd")
KERNEL_IMPLS = ("sola_ops", "sola_ops_wgmma", "sola_ops_1group", "sola_ops_twin", "sola_ops_unstaged",
                "sola_ops_presplit", "sola_ops_tf32", "reference", "einsum_fp32", "sdpa_flash", "sdpa_cudnn",
                "sdpa_efficient", "sdpa_math", "naive", "fla", "flash_bla")
FLUSH_BYTES = 256 * 1024 * 1024


def is_ours(impl):
    """sola_ops and its variants (sola_ops_wgmma, sola_ops_unstaged, ...: the same op on other kernels): never
    a baseline."""
    return impl.startswith("sola_ops")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float64": torch.float64}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# ---- identity of a run --------------------------------------------------------------------------

def csrc_sha256(root=ROOT):
    """The first field of `find csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`, run
    from the repository root: sha256 over the lines "<sha256 of file>  csrc/<path>\\n", the files
    sorted bytewise by path. None when there is no csrc/."""
    base = os.path.join(root, "csrc")
    if not os.path.isdir(base):
        return None
    paths = []
    for dirpath, _dirnames, filenames in os.walk(base):  # like find: symlinked dirs are not entered
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                paths.append(os.path.relpath(full, root).replace(os.sep, "/"))
    lines = []
    for rel in sorted(paths, key=lambda p: p.encode()):
        with open(os.path.join(root, rel), "rb") as f:
            lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {rel}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"


def slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results file name)."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def pick_device(arg="auto"):
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(arg)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return device


def header(device, peak, meta=None):
    """The top-level fields of a results JSON (rows and skipped are filled in by the caller)."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "csrc_sha256": csrc_sha256(),
        "peak": peak,
        "rows": [],
        "skipped": [],
        "meta": dict(meta or {}),
    }


def write_json(path, data):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, torch.dtype):
        return dtype_name(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def finite_or_none(x, ndigits=None):
    if x is None:
        return None
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        return None
    return round(x, ndigits) if ndigits is not None else x


def sig(x, digits=5):
    """x rounded to `digits` significant digits (for the JSON)."""
    return None if x is None else float(f"{x:.{digits}g}")


def make_row(**fields):
    row = {k: None for k in ROW_KEYS}
    row.update(fields)
    return row


# ---- timing -----------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a kernel fault broke the context: the caller records that error, not this echo of it
            pass


_FLUSH = {}


def _flush_buffer(device):
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    return _FLUSH[key]


def release_flush_buffer():
    _FLUSH.clear()


def time_fn(fn, device, reps, warmup, flush_l2=False, ctx=contextlib.nullcontext, min_time_s=0.0, max_reps=50):
    """Median milliseconds of fn() over reps runs after warmup runs (all inside ctx()).
    On CPU, runs go on past reps (up to max_reps) until they add up to min_time_s, which steadies
    the median of short calls. Returns (median_ms, all_ms)."""
    with ctx():
        for _ in range(warmup):
            fn()
        sync(device)
        if device.type == "cuda":
            buf = _flush_buffer(device) if flush_l2 else None
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for i in range(reps):
                if buf is not None:
                    buf.zero_()  # 256 MB written: evicts the inputs of the last run from L2
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            times = []
            while len(times) < reps or (sum(times) < min_time_s * 1e3 and len(times) < max_reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def peak_mem_mb(fn, device, ctx=contextlib.nullcontext):
    """Peak memory allocated by one call of fn beyond what was allocated before it (the inputs,
    the L2 flush buffer and anything else alive stay out of it), in MB. None on CPU."""
    if device.type != "cuda":
        return None
    with ctx():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    return round((peak - base) / 2**20, 2)


def is_oom(exc):
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def is_fatal_cuda_error(exc):
    """Errors after which the CUDA context is unusable (every later CUDA call fails too)."""
    text = str(exc).lower()
    return any(s in text for s in ("illegal memory access", "device-side assert", "illegal instruction",
                                   "misaligned address", "unspecified launch failure", "an illegal"))


# Skip reasons (short_reason's, or a script's own) that say nothing is broken: memory or time ran out, or an
# earlier CUDA error left the context unusable. --strict fails on any other.
BENIGN_SKIPS = ("out of memory", "time budget", "too slow", "inputs: out of memory", "not run: an earlier CUDA error")


def short_reason(exc, limit=300):
    """A one-line reason for `skipped` from an exception (the first meaningful line)."""
    if is_oom(exc):
        return "out of memory"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:limit]


@contextlib.contextmanager
def capture_warnings():
    """Collects the warnings raised inside (SDPA explains why a backend refused in warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def warning_reasons(caught):
    """The first lines of caught warnings, each once, without PyTorch's "(Triggered internally at ...)" tail.
    All of them: SDPA says "Flash attention kernel not used because:" in one warning and why (dtype, head
    dim, GPU arch) in the next ones, which name neither "kernel" nor "because"."""
    lines = [re.sub(r"\s*\(Triggered internally at [^)]*\)", "", str(w.message)).splitlines() for w in caught]
    return list(dict.fromkeys(ln[0].strip() for ln in lines if ln and ln[0].strip()))


# ---- device peaks -----------------------------------------------------------------------------

def measure_peaks(device, quick=False, tiny=False):
    """The two ceilings, measured now (METHOD.md: measure them on the device, on random data).

    copy_GBps: a device-to-device copy_ of a large buffer, counting bytes read plus bytes written
      (2 * bytes / time). CUDA: 1 GiB; CPU: 64 MB (4 MB with tiny).
    bf16_matmul_TFLOPs: 2 * n^3 / time of an n x n x n matmul on random data. CUDA: bf16 with
      n = 8192; CPU: fp32 with n = 1024 (256 with tiny) -- the key keeps its name and
      peak["matmul_dtype"] says what was measured.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        copy_bytes, n, mm_dtype, reps, warmup = 2**30, 8192, torch.bfloat16, 20, 3
    else:
        copy_bytes = 4 * 2**20 if tiny else 64 * 2**20
        n, mm_dtype = (256 if tiny else 1024), torch.float32
        reps, warmup = (3, 1) if (quick or tiny) else (5, 1)
    src = torch.rand(copy_bytes // 4, generator=gen, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms, _ = time_fn(lambda: dst.copy_(src), device, reps, warmup)
    del src, dst
    a = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(mm_dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(mm_dtype)
    c = torch.empty(n, n, device=device, dtype=mm_dtype)
    mm_ms, _ = time_fn(lambda: torch.mm(a, b, out=c), device, reps, warmup)
    del a, b, c
    free_memory(device)
    return {
        "copy_GBps": sig(2 * copy_bytes / (copy_ms * 1e-3) / 1e9, 5),
        "bf16_matmul_TFLOPs": sig(2 * n**3 / (mm_ms * 1e-3) / 1e12, 5),
        "copy_MB": copy_bytes // 2**20,
        "matmul_n": n,
        "matmul_dtype": dtype_name(mm_dtype),
    }


# ---- derived columns ----------------------------------------------------------------------------

def group_key(row):
    return (row["op"], row["pass"], row["dtype"], row["B"], row["H"], row["Nq"], row["Nk"], row["D"],
            row.get("case"), row.get("model"), row.get("img_size"), row.get("features_only"), row.get("cuda_graph"))


def add_derived(rows, peak):
    """pct_peak: linear rows GB/s over the measured copy bandwidth, softmax rows TFLOP/s over the
    measured bf16 matmul rate, in percent. ratio_to_best_baseline = (ms of the fastest baseline of
    the same op, pass, dtype and shape) / ms, so > 1 means faster than every baseline; baselines
    are all impls but ours (is_ours), except those with same_function=False (fla's causal kernel).
    Model rows: the baseline is attn_impl="torch"."""
    best = {}
    for r in rows:
        if r.get("ms") is None or is_ours(r["impl"]) or r.get("same_function") is False:
            continue
        k = group_key(r)
        if k not in best or r["ms"] < best[k][0]:
            best[k] = (r["ms"], r["impl"])
    for r in rows:
        if r.get("GBps") is not None and peak.get("copy_GBps"):
            r["pct_peak"] = sig(100 * r["GBps"] / peak["copy_GBps"], 4)
        elif r.get("TFLOPs") is not None and peak.get("bf16_matmul_TFLOPs"):
            r["pct_peak"] = sig(100 * r["TFLOPs"] / peak["bf16_matmul_TFLOPs"], 4)
        b = best.get(group_key(r))
        if b is not None and r.get("ms"):
            r["ratio_to_best_baseline"] = sig(b[0] / r["ms"], 5)
            r["best_baseline"] = b[1]
    return rows


# ---- printing -----------------------------------------------------------------------------------

def fmt(x, spec):
    if x is None:
        width = re.match(r"\d*", spec).group()
        return "-".rjust(int(width) if width else 1)
    return format(x, spec)


def shape_label(r):
    if r["op"].startswith("model"):
        fo = "feat" if r.get("features_only") else "cls"
        return f"{r.get('model', '?')} {fo} {r.get('img_size')}px b{r['B']}"
    n = f"N={r['Nq']}" if r["Nq"] == r["Nk"] else f"Nq={r['Nq']} Nk={r['Nk']}"
    return f"B={r['B']} H={r['H']} {n} D={r['D']}"


def table(rows, file=sys.stdout):
    """A compact text table of result rows."""
    hdr = (f"{'op':<11} {'pass':<7} {'dtype':<5} {'shape':<32} {'impl':<15} {'ms':>9} {'GB/s':>8} "
           f"{'TFLOP/s':>8} {'%peak':>6} {'x best':>7} {'mem MB':>8}")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    last = None
    for r in rows:
        key = group_key(r)
        if last is not None and key != last:
            print("", file=file)
        last = key
        op = {"linear_attention": "linear", "softmax_attention": "softmax"}.get(r["op"], r["op"])
        extra = ""
        if r.get("img_per_s") is not None:
            extra = f"  {r['img_per_s']:.1f} img/s"
        print(f"{op:<11} {r['pass']:<7} {DTYPE_SHORT.get(r['dtype'], r['dtype']):<5} {shape_label(r):<32} "
              f"{r['impl']:<15} {fmt(r['ms'], '9.3f')} {fmt(r['GBps'], '8.1f')} {fmt(r['TFLOPs'], '8.2f')} "
              f"{fmt(r.get('pct_peak'), '6.1f')} {fmt(r.get('ratio_to_best_baseline'), '7.2f')} "
              f"{fmt(r.get('peak_mem_MB'), '8.1f')}{extra}", file=file)
