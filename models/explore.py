"""Placement explorer: what softmax layers cost, depending on how many there are and where they sit.

    python -m sola_vision.explore --model sola_vision_tiny --img-size 224 --quick
    python -m sola_vision.explore --model sola_vision_tiny --k 1,2 --stages 3,4 --out bench/results
    python -m sola_vision.explore --patterns LL-LLLL-LLLLLLLS-LLLL LL-LLLL-LLLLLLLL-SLLL --budget-ms 40

Candidates are all placements of k softmax layers among the blocks of the chosen stages (--k, --stages),
or the given --patterns; the variant's registered default pattern and the all-linear pattern are always
added as reference rows. Every candidate is built from the model's own `layer_pattern` argument. Reported:

  params          parameter count (the same for every pattern: both mixers have the same weights)
  GFLOPs          forward FLOPs per image at each --img-sizes size, from torch's FlopCounterMode (2 per
                  multiply-add; the sola_ops formulas registered), counted on the meta device
  softmax share   FLOPs of the softmax-attention ops / the model's forward FLOPs, in %: the quadratic part,
                  which grows with the number of tokens (CSV: softmax_share_pct; softmax_share_attn_pct is
                  the same numerator over the attention ops' FLOPs only)
  fwd ms          median time of one forward pass (eval, no_grad) of a batch
  train ms        median time of one train step (train mode, forward + cross-entropy + backward); the
                  optimizer step is left out, its cost does not depend on the pattern
  fwd/train MB    peak memory one step allocates beyond what was allocated before it (activations,
                  gradients, workspaces); CUDA: the caching allocator's peak, CPU: torch.profiler's
                  memory events
  Pareto          not dominated in (lower cost, higher softmax share) at --img-size, cost = fwd ms when
                  measured, else GFLOPs

Latency uses our kernels (--attn-impl sola), bf16 autocast on CUDA and fp32 on CPU, CUDA events (perf_counter
on CPU), warm-up runs then the median. Output: a table on stdout, DIR/placements_<model>_<device>.csv (one row
per pattern and image size) and a .png Pareto plot (cost vs softmax share, the default placement starred).
"""
import argparse
import contextlib
import csv
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F

from . import placement as P
from .engine import autocast
from .flops import flops as model_flops
from .flops import linear_attention_flops, softmax_attention_flops
from .layers import sola_ops
from .sola_vision import SoLAVision

ROLE_LINEAR, ROLE_DEFAULT = "linear", "default"
# FLOPs are counted with our ops when the extension imports (their formulas are registered then); torch's
# own count of the plain-PyTorch mixers is the same (tests/test_models.py checks it).
FLOP_IMPL = "sola" if sola_ops is not None else "torch"


@dataclass
class Result:
    """One candidate pattern; per-size dicts are keyed by image size."""
    pattern: str
    role: str = ""  # "linear", "default", "default,linear" or "" (an enumerated / given placement)
    params: Optional[int] = None
    flops: Dict[int, int] = field(default_factory=dict)  # forward FLOPs of one image
    softmax_flops: Dict[int, int] = field(default_factory=dict)  # ... in the softmax-attention ops
    attn_flops: Dict[int, int] = field(default_factory=dict)  # ... in all attention ops
    batch: Dict[int, int] = field(default_factory=dict)
    fwd_ms: Dict[int, float] = field(default_factory=dict)
    train_ms: Dict[int, float] = field(default_factory=dict)
    fwd_mb: Dict[int, float] = field(default_factory=dict)
    train_mb: Dict[int, float] = field(default_factory=dict)
    notes: Dict[int, str] = field(default_factory=dict)
    pareto: bool = False

    @property
    def n_softmax(self) -> int:
        return self.pattern.count("S")

    def gflops(self, size: int) -> float:
        return self.flops[size] / 1e9

    def share(self, size: int) -> float:
        """Softmax share of the forward FLOPs at `size`, in %."""
        return 100.0 * self.softmax_flops[size] / self.flops[size]


# ---- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sola_vision.explore", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="sola_vision_tiny", help="a registered sola_vision_* variant")
    p.add_argument("--img-size", type=int, default=224,
                   help="main input size: latency, budgets and the Pareto front are taken here")
    p.add_argument("--img-sizes", default="224,512,1024",
                   help="sizes for the FLOP growth (and latency without --quick on CUDA); --img-size is added")
    p.add_argument("--k", default=None, help="numbers of softmax layers to place, e.g. 1,2 (default 1,2; 1 with "
                                             "--quick)")
    p.add_argument("--stages", default=None,
                   help="1-based stages the softmax layers may go in, e.g. 3,4 (default: the stages where the "
                        "variant's default pattern has them)")
    p.add_argument("--patterns", nargs="+", default=None, metavar="PATTERN",
                   help="explicit layer patterns (e.g. LL-LLLL-LLLSLLLS-LLLS) instead of --k/--stages")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch at --img-size (default 64 on CUDA, 1 on CPU); other sizes keep the pixels per "
                        "batch: round(B * (img_size / size)^2), at least 1")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--attn-impl", default="sola", choices=["sola", "torch"],
                   help="attention for the latency runs: our kernels or plain PyTorch")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default CUDA 20, CPU 3; "
                                                          "--quick: 10 / 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="extra warm-up runs after the memory run, which warms up too (default CUDA 2, CPU 0)")
    p.add_argument("--latency-sizes", choices=["main", "all"], default=None,
                   help="where latency is measured: --img-size only, or every size (default: all on CUDA, "
                        "main on CPU and with --quick)")
    p.add_argument("--no-latency", action="store_true", help="params and FLOPs only")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice; 1 with --quick on CPU, which keeps "
                        "timings steady on a shared machine)")
    p.add_argument("--flops", choices=["count", "analytic"], default=None,
                   help="count: FlopCounterMode on every pattern; analytic: one counted all-linear model per "
                        "size plus the exact per-block formulas of the swapped layers (same numbers, faster). "
                        "Default count, analytic with --quick")
    p.add_argument("--quick", action="store_true",
                   help="k=1, fewer timing runs, latency at --img-size only, analytic FLOPs")
    p.add_argument("--max-patterns", type=int, default=200, help="refuse enumerations larger than this")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="list the placements whose forward time at --img-size is at most this")
    p.add_argument("--budget-gflops", type=float, default=None,
                   help="list the placements whose forward GFLOPs per image at --img-size are at most this")
    p.add_argument("--out", default="explore_out", help="folder for the CSV and the PNG")
    p.add_argument("--no-plot", action="store_true", help="CSV only")
    return p


def parse_ints(p: argparse.ArgumentParser, text: str, flag: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError:
        p.error(f"{flag}: expected comma-separated integers such as 1,2, got {text!r}")
    if not values:
        p.error(f"{flag}: expected at least one integer, got {text!r}")
    return values


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validates everything before any model is built; fills in the defaults that depend on the device."""
    try:
        args.depths = P.model_depths(args.model)
    except ValueError as e:
        p.error(f"--model: {e}")
    if args.img_size < 32:
        p.error(f"--img-size must be at least 32 (the model's stride), got {args.img_size}")
    sizes = parse_ints(p, args.img_sizes, "--img-sizes")
    if min(sizes) < 32:
        p.error(f"--img-sizes must all be at least 32 (the model's stride), got {args.img_sizes!r}")
    args.sizes = sorted(set(sizes) | {args.img_size})

    if args.patterns is not None:
        if args.k is not None or args.stages is not None:
            p.error("--patterns replaces the enumeration: give either --patterns or --k/--stages, not both")
        given = []
        for pattern in args.patterns:
            try:
                given.append(P.canonical(pattern, args.depths))
            except ValueError as e:
                p.error(f"--patterns: {e}")
        args.placements = list(dict.fromkeys(given))
    else:
        default_s = sorted({i + 1 for i, _ in P.softmax_blocks(P.default_pattern(args.model))})
        stages = parse_ints(p, args.stages, "--stages") if args.stages else (default_s or (len(args.depths) - 1,
                                                                                           len(args.depths)))
        ks = parse_ints(p, args.k, "--k") if args.k else ((1,) if args.quick else (1, 2))
        try:
            P.check_stages(stages, args.depths)
        except ValueError as e:
            p.error(f"--stages: {e}")
        try:
            n = P.count_placements(args.depths, ks, stages)
        except ValueError as e:
            p.error(f"--k: {e}")
        if n > args.max_patterns:
            p.error(f"--k {','.join(map(str, ks))} --stages {','.join(map(str, stages))} gives {n} patterns, more "
                    f"than --max-patterns {args.max_patterns}; narrow them or raise --max-patterns")
        args.stages, args.k = stages, ks
        args.placements = P.enumerate_placements(args.depths, ks, stages)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if args.attn_impl == "sola" and sola_ops is None:
        p.error("--attn-impl sola needs the sola_ops extension, which is not importable; build it or use "
                "--attn-impl torch")
    if args.attn_impl == "sola" and cuda and not args.no_latency and not sola_ops.build_info().get("cuda"):
        p.error("--attn-impl sola on CUDA needs a CUDA build of sola_ops (sola_ops.build_info() has no CUDA); "
                "rebuild with nvcc, use --device cpu, or --attn-impl torch")
    if args.batch_size is None:
        args.batch_size = 64 if cuda else 1
    if args.threads is None and args.quick and not cuda:
        args.threads = 1
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.reps is None:
        args.reps = (10 if args.quick else 20) if cuda else (1 if args.quick else 3)
    if args.warmup is None:
        args.warmup = 2 if cuda else 0
    if args.batch_size < 1 or args.reps < 1 or args.warmup < 0 or args.max_patterns < 1:
        p.error("--batch-size, --reps and --max-patterns must be at least 1, --warmup at least 0")
    if args.latency_sizes is None:
        args.latency_sizes = "all" if cuda and not args.quick else "main"
    if args.flops is None:
        args.flops = "analytic" if args.quick else "count"
    for flag, value in (("--budget-ms", args.budget_ms), ("--budget-gflops", args.budget_gflops)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be positive, got {value:g}")
    if args.budget_ms is not None and args.no_latency:
        p.error("--budget-ms needs the latency runs: drop --no-latency")


def candidates(model: str, depths: Sequence[int], placements: Sequence[str]) -> List[Result]:
    """The two reference rows (all linear, the registered default), then the placements not already there."""
    linear, default = P.linear_pattern(depths), P.default_pattern(model)
    roles = {linear: ROLE_LINEAR}
    roles[default] = ROLE_DEFAULT if default != linear else f"{ROLE_DEFAULT},{ROLE_LINEAR}"
    patterns = list(dict.fromkeys([linear, default, *placements]))
    return [Result(pattern, roles.get(pattern, "")) for pattern in patterns]


def batch_for(size: int, main_size: int, main_batch: int) -> int:
    """Same pixels per batch as main_batch images of main_size (at least one image)."""
    return max(1, round(main_batch * (main_size / size) ** 2))


# ---- models -------------------------------------------------------------------------------------

def build_model(name: str, pattern: str, attn_impl: str, device: torch.device) -> SoLAVision:
    """The registered variant with `pattern` as its layer_pattern. weight_init="skip" keeps PyTorch's default
    init: the truncated-normal one takes seconds per build on a small CPU, and neither FLOPs nor time nor
    memory depend on the weight values."""
    model = timm.create_model(name, layer_pattern=pattern, attn_impl=attn_impl, weight_init="skip")
    return model.to(device)


# ---- FLOPs --------------------------------------------------------------------------------------

@contextlib.contextmanager
def record_attention_shapes(model: SoLAVision):
    """Yields {(stage, block): q shape (B, heads, N, head_dim)}, filled by the next forward pass."""
    shapes, handles = {}, []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            def hook(mixer, inputs, key=(i, j)):
                b, h, w, _ = inputs[0].shape  # the mixer takes (B, H, W, C) tokens
                shapes[key] = (b, mixer.num_heads, h * w, mixer.head_dim)
            handles.append(block.attn.register_forward_pre_hook(hook))
    try:
        yield shapes
    finally:
        for handle in handles:
            handle.remove()


def count_flops(model: SoLAVision, img_size: int) -> Tuple[int, Dict[Tuple[int, int], tuple]]:
    """(forward FLOPs of one image, attention shapes per block), counted by sola_vision.flops."""
    with record_attention_shapes(model) as shapes:
        total = model_flops(model, img_size, batch_size=1)
    return total, dict(shapes)


def attention_flops(shapes: Dict[Tuple[int, int], tuple], pattern: str) -> Tuple[int, int]:
    """(softmax-attention FLOPs, linear-attention FLOPs) of the pattern's blocks, by the formulas that are
    registered for the sola_ops custom ops (q, k, v all have the block's shape; MLLA normalises)."""
    softmax = set(P.softmax_blocks(pattern))
    sm = sum(softmax_attention_flops(s, s, s) for key, s in shapes.items() if key in softmax)
    lin = sum(linear_attention_flops(s, s, s) for key, s in shapes.items() if key not in softmax)
    return sm, lin


def add_flops(results: List[Result], args: argparse.Namespace, models: Dict[str, SoLAVision], log) -> None:
    """Fills flops / softmax_flops / attn_flops for every size. The all-linear model is counted at each size
    (which also records the token grid of every block); a pattern's count is then either its own model's
    (args.flops == "count", on the meta device) or the all-linear count with the swapped blocks' formula
    difference added ("analytic": exact, as each block's FLOPs do not depend on the other blocks)."""
    linear = P.linear_pattern(args.depths)
    base_model = models.get(linear)
    if base_model is None:
        base_model = build_model(args.model, linear, FLOP_IMPL, torch.device("cpu"))
    base_model = base_model.to("meta").set_attn_impl(FLOP_IMPL)
    base, shapes, lin_all = {}, {}, {}
    for size in args.sizes:
        base[size], shapes[size] = count_flops(base_model, size)
        lin_all[size] = attention_flops(shapes[size], linear)[1]
    for n, r in enumerate(results, 1):
        model = None
        if args.flops == "count" and r.pattern != linear:
            model = models.pop(r.pattern, None)
            if model is None:
                model = build_model(args.model, r.pattern, FLOP_IMPL, torch.device("cpu"))
            model = model.to("meta").set_attn_impl(FLOP_IMPL)
            r.params = r.params or sum(p.numel() for p in model.parameters())
        for size in args.sizes:
            sm, lin = attention_flops(shapes[size], r.pattern)
            total = base[size] - lin_all[size] + sm + lin
            if model is not None:
                counted = count_flops(model, size)[0]
                if counted != total:  # the formulas and the counter disagree: report, trust the counter
                    log(f"  note: {r.pattern} at {size}px: counted {counted} FLOPs, formulas give {total}")
                total = counted
            r.flops[size], r.softmax_flops[size], r.attn_flops[size] = total, sm, sm + lin
        if r.params is None:
            r.params = sum(p.numel() for p in base_model.parameters())
        if model is not None:
            log(f"  [{n}/{len(results)}] FLOPs counted: {r.pattern}")
        del model


# ---- latency and memory -----------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over `reps` runs after `warmup` runs: CUDA events on CUDA (the runs queue
    back to back), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto logs a line to the C-level stderr at every profiler start and stop: hide those (only around the
    start and the stop, so that the step's own warnings still show)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_mb(fn: Callable) -> Optional[float]:
    """Runs fn once under torch.profiler with memory events; the peak of the running sum of allocations minus
    frees, in MB (None when this torch's profiler does not expose the events)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_native_stderr():
            prof.stop()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
    except Exception:  # noqa: BLE001 - a private corner of the profiler: no number rather than a crash
        return None
    return peak / 2**20


def peak_mb(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak memory one call of fn allocates beyond what was allocated before it, in MB (fn runs once)."""
    if device.type != "cuda":
        return cpu_peak_mb(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def make_steps(model: SoLAVision, size: int, batch: int, device: torch.device) -> Dict[str, Callable]:
    """The two measured steps on random images: "fwd" (run it in eval mode) under no_grad, and "train" (run
    it in train mode): forward, cross-entropy, backward."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=gen, device=device)

    def fwd():
        with torch.no_grad(), autocast(device, amp=True):
            model(x)

    def train():
        model.zero_grad(set_to_none=True)  # gradients are allocated inside the step, as in training
        with autocast(device, amp=True):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()

    return {"fwd": fwd, "train": train}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(r: Result, model: SoLAVision, size: int, args: argparse.Namespace) -> None:
    """Peak memory (one run, which also warms up), then the median time, of both steps at `size`."""
    batch = batch_for(size, args.img_size, args.batch_size)
    r.batch[size] = batch
    try:
        for name, step in make_steps(model, size, batch, args.device).items():
            model.train(name == "train")  # set once, outside the timed runs
            mem = peak_mb(step, args.device)
            ms = time_ms(step, args.device, args.warmup, args.reps)
            getattr(r, f"{name}_ms")[size], getattr(r, f"{name}_mb")[size] = ms, mem
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        r.notes[size] = "out of memory"
    finally:
        model.zero_grad(set_to_none=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()


def warm_up(model: SoLAVision, sizes: Sequence[int], args: argparse.Namespace) -> None:
    """One untimed forward at each size and a train step at --img-size, so that one-time allocations (RoPE
    tables cached per size, cuBLAS / cuDNN workspaces) stay out of the first row's memory."""
    for size in sizes:
        steps = make_steps(model, size, batch_for(size, args.img_size, args.batch_size), args.device)
        for name in ("fwd", "train") if size == args.img_size else ("fwd",):
            model.train(name == "train")
            try:
                steps[name]()
            except (torch.OutOfMemoryError, RuntimeError) as e:  # out of memory: the measured rows say so
                if not is_oom(e):
                    raise
    model.zero_grad(set_to_none=True)
    if args.device.type == "cuda":
        torch.cuda.empty_cache()


def add_latency(results: List[Result], args: argparse.Namespace, models: Dict[str, SoLAVision], log) -> None:
    """Builds each pattern's model on the device and measures it; the models that add_flops counts (all of
    them with --flops count, else the all-linear one) are kept in `models`, moved to the meta device."""
    sizes = args.sizes if args.latency_sizes == "all" else [args.img_size]
    warm = build_model(args.model, results[0].pattern, args.attn_impl, args.device)
    warm_up(warm, sizes, args)
    for n, r in enumerate(results, 1):
        model = warm if n == 1 else build_model(args.model, r.pattern, args.attn_impl, args.device)
        warm = None
        r.params = sum(p.numel() for p in model.parameters())
        for size in sizes:
            measure(r, model, size, args)
        main = args.img_size
        log(f"  [{n}/{len(results)}] {r.pattern}  fwd {fmt(r.fwd_ms.get(main), '.1f')} ms  train "
            f"{fmt(r.train_ms.get(main), '.1f')} ms at {main}px" + (f"  ({r.notes[main]})" if main in r.notes else ""))
        if args.flops == "count" or r.pattern == P.linear_pattern(args.depths):
            models[r.pattern] = model.to("meta")  # reused by add_flops without a second build
        del model


# ---- analysis -----------------------------------------------------------------------------------

def cost(r: Result, size: int) -> Optional[float]:
    """What the Pareto front minimises: forward ms where measured, else forward GFLOPs."""
    return r.fwd_ms.get(size) if r.fwd_ms else r.gflops(size)


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[bool]:
    """points: (softmax share, cost); True where no other point has at least the share at most the cost
    and is better in one of them."""
    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])
    return [not any(dominates(q, pt) for q in points) for pt in points]


def mark_pareto(results: List[Result], size: int) -> None:
    usable = [r for r in results if cost(r, size) is not None]
    for r, on_front in zip(usable, pareto_front([(r.share(size), cost(r, size)) for r in usable])):
        r.pareto = on_front


def within_budget(results: List[Result], args: argparse.Namespace) -> List[Result]:
    """Placements within --budget-ms / --budget-gflops at --img-size, most softmax layers first, then the
    deepest placement first."""
    size = args.img_size
    keep = []
    for r in results:
        if args.budget_ms is not None and (r.fwd_ms.get(size) is None or r.fwd_ms[size] > args.budget_ms):
            continue
        if args.budget_gflops is not None and r.gflops(size) > args.budget_gflops:
            continue
        keep.append(r)
    return sorted(keep, key=lambda r: P.placement_key(r.pattern))


# ---- output -------------------------------------------------------------------------------------

def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_table(results: List[Result], args: argparse.Namespace) -> str:
    """Plain-text table: one line per pattern, FLOPs and softmax share at every size, latency and memory
    at --img-size (the CSV has every measured size)."""
    main = args.img_size
    cols = [("role", "<"), ("pattern", "<"), ("S", ">"), ("softmax at", "<")]
    cols += [(f"GFLOPs@{s}", ">") for s in args.sizes] + [(f"sm%@{s}", ">") for s in args.sizes]
    if not args.no_latency:
        cols += [("fwd ms", ">"), ("train ms", ">"), ("fwd MB", ">"), ("train MB", ">")]
    cols += [("Pareto", "<")]
    # Decimals per size so that the largest value of a column shows 4 significant digits.
    top = {s: max(max(r.gflops(s) for r in results), 1e-9) for s in args.sizes}
    decimals = {s: max(0, 3 - math.floor(math.log10(top[s]))) for s in args.sizes}
    rows = []
    for r in results:
        row = [r.role, r.pattern, str(r.n_softmax), P.describe(r.pattern)]
        row += [f"{r.gflops(s):.{decimals[s]}f}" for s in args.sizes] + [f"{r.share(s):.2f}" for s in args.sizes]
        if not args.no_latency:
            row += [fmt(r.fwd_ms.get(main), ".1f"), fmt(r.train_ms.get(main), ".1f"),
                    fmt(r.fwd_mb.get(main), ".0f"), fmt(r.train_mb.get(main), ".0f")]
        row += ["*" if r.pareto else ""]
        rows.append(row)
    widths = [max(len(c[0]), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(f"{cell:{a}{w}}" for cell, (_, a), w in zip(cells, cols, widths)).rstrip()

    header = line([c[0] for c in cols])
    return "\n".join([header, "-" * len(header)] + [line(row) for row in rows])


CSV_FIELDS = ["model", "pattern", "role", "n_softmax", "softmax_at", "params", "img_size", "flops_fwd", "gflops_fwd",
              "softmax_share_pct", "softmax_share_attn_pct", "softmax_flops", "attn_flops", "flops_method", "batch",
              "fwd_ms", "train_ms", "fwd_peak_MB", "train_peak_MB", "pareto", "note", "device", "attn_impl", "dtype"]


def _round(x: Optional[float], digits: int = 5) -> Optional[float]:
    return None if x is None else float(f"{x:.{digits}g}")


def write_csv(path: str, results: List[Result], args: argparse.Namespace, device_name: str) -> None:
    """One row per pattern and image size. FLOPs are per image (flops_fwd exact, gflops_fwd rounded);
    softmax_share_pct = softmax-attention FLOPs / forward FLOPs, softmax_share_attn_pct = softmax-attention
    FLOPs / all attention-op FLOPs, both in %; batch, ms and MB only where measured (per batch); pareto
    refers to --img-size."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            for s in args.sizes:
                attn = r.attn_flops[s]
                w.writerow({
                    "model": args.model, "pattern": r.pattern, "role": r.role, "n_softmax": r.n_softmax,
                    "softmax_at": P.describe(r.pattern), "params": r.params, "img_size": s,
                    "flops_fwd": r.flops[s], "gflops_fwd": _round(r.gflops(s), 6),
                    "softmax_share_pct": _round(r.share(s)),
                    "softmax_share_attn_pct": _round(100 * r.softmax_flops[s] / attn if attn else 0.0),
                    "softmax_flops": r.softmax_flops[s], "attn_flops": attn,
                    "flops_method": "counted" if args.flops == "count" or r.role.endswith(ROLE_LINEAR) else "analytic",
                    "batch": r.batch.get(s), "fwd_ms": _round(r.fwd_ms.get(s)), "train_ms": _round(r.train_ms.get(s)),
                    "fwd_peak_MB": _round(r.fwd_mb.get(s)), "train_peak_MB": _round(r.train_mb.get(s)),
                    "pareto": int(r.pareto) if s == args.img_size else "", "note": r.notes.get(s, ""),
                    "device": device_name, "attn_impl": args.attn_impl,
                    "dtype": "bfloat16" if args.device.type == "cuda" else "float32",
                })


def plot_pareto(path: str, results: List[Result], args: argparse.Namespace, device_name: str) -> None:
    """Cost against softmax share: one panel per image size (forward GFLOPs), plus the measured forward and
    train-step times at --img-size; the Pareto front dashed, the default placement starred."""
    from .plots import _pyplot

    plt = _pyplot()
    main = args.img_size
    panels = [(f"forward GFLOPs / image, {s}px", s, lambda r, s=s: r.gflops(s)) for s in args.sizes]
    if not args.no_latency:
        panels += [(f"forward ms, {main}px, batch {args.batch_size}", main, lambda r: r.fwd_ms.get(main)),
                   (f"train step ms, {main}px, batch {args.batch_size}", main, lambda r: r.train_ms.get(main))]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis")
    kmax = max(1, max(r.n_softmax for r in results))
    for ax, (label, size, value) in zip(axes, panels):
        pts = [(r, r.share(size), value(r)) for r in results if value(r) is not None]
        for k in sorted({r.n_softmax for r, _, _ in pts}):
            xy = [(x, y) for r, x, y in pts if r.n_softmax == k and not r.role]
            if xy:
                ax.scatter(*zip(*xy), s=18, color=cmap(0.85 * k / kmax), alpha=0.8, label=f"{k} softmax layer(s)")
        on_front = pareto_front([(x, y) for _, x, y in pts])
        front = sorted((x, y) for (_, x, y), on in zip(pts, on_front) if on)
        if front:
            ax.plot(*zip(*front), "--o", color="grey", lw=1, ms=9, mfc="none",
                    label="Pareto front (share up, cost down)")
        for r, x, y in pts:
            if ROLE_DEFAULT in r.role:
                ax.scatter([x], [y], marker="*", s=220, color="crimson", edgecolor="black", zorder=5,
                           label=f"default {r.pattern}")
            elif r.role == ROLE_LINEAR:
                ax.scatter([x], [y], marker="s", s=50, color="black", zorder=4, label="all linear")
        ax.set(xlabel=f"softmax share of forward FLOPs at {size}px (%)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{args.model}: cost vs softmax share ({device_name}, attn_impl {args.attn_impl})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_label(device: torch.device) -> Tuple[str, str]:
    """(description, file-name slug)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, slug(name)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})", "cpu"


# ---- main -------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> List[Result]:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return explore(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a bigger process (tests)


def explore(args: argparse.Namespace) -> List[Result]:
    """Measures every candidate, prints the table (and the budget list), writes the CSV and the plot."""
    t0 = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    name, tag = device_label(args.device)
    results = candidates(args.model, args.depths, args.placements)
    log(f"sola_vision.explore: {args.model}, {len(results)} patterns, {name}, torch {torch.__version__}, "
        f"attn_impl {args.attn_impl}, FLOPs {args.flops}")
    models: Dict[str, SoLAVision] = {}
    if not args.no_latency:
        add_latency(results, args, models, log)
    add_flops(results, args, models, log)
    mark_pareto(results, args.img_size)

    params = {r.params for r in results}
    batches = ", ".join(f"{b} at {s}px" for s, b in sorted(results[0].batch.items()))
    log("")
    log(f"{args.model}: params {'/'.join(f'{x / 1e6:.2f}' for x in sorted(params))} M; GFLOPs per image; "
        f"sm% = softmax-attention share of the forward FLOPs; ms / MB per batch ({batches or 'not measured'}); "
        f"Pareto *: no other pattern has a higher softmax share for less {'GFLOPs' if args.no_latency else 'fwd ms'} "
        f"at {args.img_size}px")
    log(render_table(results, args))

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"placements_{args.model}_{tag}")
    write_csv(stem + ".csv", results, args, name)
    written = [stem + ".csv"]
    if not args.no_plot:
        plot_pareto(stem + ".png", results, args, name)
        written.append(stem + ".png")

    if args.budget_ms is not None or args.budget_gflops is not None:
        limits = [f"fwd <= {args.budget_ms:g} ms"] if args.budget_ms is not None else []
        limits += [f"<= {args.budget_gflops:g} GFLOPs"] if args.budget_gflops is not None else []
        fits = within_budget(results, args)
        log(f"\nwithin budget ({', '.join(limits)} at {args.img_size}px): {len(fits)} of {len(results)}, "
            "most softmax layers first, then the deepest")
        for r in fits:
            log(f"  {r.pattern}  S={r.n_softmax}  at {P.describe(r.pattern):<12}  "
                f"{r.gflops(args.img_size):.4g} GFLOPs  fwd {fmt(r.fwd_ms.get(args.img_size), '.1f')} ms"
                + (f"  ({r.role})" if r.role else ""))
    log(f"\nwrote {', '.join(written)} in {time.perf_counter() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()
