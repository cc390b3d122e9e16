"""Model benchmark: SoLA-Vision forward and train-step throughput with attn_impl="sola" vs "torch".

    python bench/models.py                       # GPU if visible, else tiny CPU sizes
    python bench/models.py --quick --out bench/results/cpu.json --append

Models come from the `sola_vision` package (models/ in this repository) through timm:
`timm.create_model("sola_vision_tiny", attn_impl=..., features_only=...)`. Without timm or
sola_vision (or without the model registered) every row is listed in `skipped` with the reason.

Configurations (model, image size, batch, features_only):
  CUDA: sola_vision_tiny 224 px batch 128 (classifier), features_only at 512 px batch 32 and
        1024 px batch 8; bf16 autocast.
  CPU:  224 px batch 2, features_only at 256 px batch 1 (and 512 px batch 1 without --quick); fp32,
        or bf16 autocast with --amp bf16 (CPUs with AVX-512 BF16 / AMX run it on their bf16 units).

Rows (the kernel rows' schema, DESIGN.md): op "model_fwd" (eval, no_grad) or "model_train" (one
AdamW step: zero_grad, forward, loss, backward, step; cross-entropy on random labels for the
classifier, the sum of the feature maps' means for features_only); impl "sola_ops" for
attn_impl="sola" and "torch" for attn_impl="torch"; pass fwd / fwd_bwd; dtype bfloat16 (autocast)
or float32; B = batch; H, Nq, Nk, D, GBps, TFLOPs null; ms = median time of one step (CUDA events,
3 warm-up steps, 20 timed; CPU fewer; torch.backends.cudnn.benchmark on, as timm's train.py); img_per_s = B / ms; peak_mem_MB = the peak memory allocated
while the steps ran (parameters, optimizer state and activations included; null on CPU);
ratio_to_best_baseline = torch's ms / this row's ms. Plus model, attn_impl, img_size, features_only and
cuda_graph: on CUDA every step is measured twice, eager and replayed from a CUDA graph (captured after
warm-up; AdamW with capturable=True), which leaves out the Python and kernel-launch overhead: on the H200
box that overhead was most of an eager forward of the tiny model (26-44 ms for 64 images at 224 px,
whichever layers were softmax), so only the graph rows show what the kernels change (--no-graph: eager only).
"""
import argparse
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)

import common as C  # noqa: E402

MODEL = "sola_vision_tiny"
ATTN_IMPLS = ("sola", "torch")
MODEL_OPS = ("model_fwd", "model_train")


def configs(device_type, quick):
    """[(model, img_size, batch, features_only)]"""
    if device_type == "cuda":
        return [(MODEL, 224, 128, False), (MODEL, 512, 32, True), (MODEL, 1024, 8, True)]
    cfgs = [(MODEL, 224, 2, False), (MODEL, 256, 1, True)]
    if not quick:
        cfgs.append((MODEL, 512, 1, True))
    return cfgs


def import_sola_vision():
    """import sola_vision; when that finds only a namespace package (an editable install made before
    models/__init__.py existed), the checkout's models/ is loaded as sola_vision instead."""
    import sola_vision
    init = os.path.join(ROOT, "models", "__init__.py")
    if getattr(sola_vision, "__file__", None) is None and os.path.exists(init):
        for name in [n for n in sys.modules if n == "sola_vision" or n.startswith("sola_vision.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location("sola_vision", init,
                                                      submodule_search_locations=[os.path.dirname(init)])
        sola_vision = importlib.util.module_from_spec(spec)
        sys.modules["sola_vision"] = sola_vision
        spec.loader.exec_module(sola_vision)
    return sola_vision


def load_models():
    """(timm module, None) or (None, reason)."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001
        return None, f"timm not importable ({C.short_reason(e, 160)})"
    try:
        import_sola_vision()  # registers the sola_vision_* models with timm
    except Exception as e:  # noqa: BLE001
        return None, f"sola_vision not importable ({C.short_reason(e, 160)})"
    try:
        names = timm.list_models("sola_vision*")
    except Exception:  # noqa: BLE001
        names = []
    if MODEL not in names:
        return None, f"timm has no model {MODEL!r} registered (sola_vision is not written yet?)"
    return timm, None


def make_step(model, op, features_only, x, labels, autocast, capturable):
    """The measured step: "model_fwd" (eval, no_grad) or "model_train" (zero_grad, forward, loss,
    backward, AdamW step; capturable=True keeps the optimizer's state on the GPU for a CUDA graph)."""
    if op == "model_fwd":
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                return model(x)
        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=capturable)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(x)
            if features_only:
                loss = sum(f.float().mean() for f in out)
            else:
                loss = F.cross_entropy(out.float(), labels)
        loss.backward()
        opt.step()
        return loss
    return step


def amp_dtype_for(device, amp):
    """The autocast dtype of the steps: --amp "bf16" or "none", else bf16 on CUDA and none (fp32) on the CPU."""
    if amp is None:
        amp = "bf16" if device.type == "cuda" else "none"
    return torch.bfloat16 if amp == "bf16" else None


def run(device, args, rows, skipped, on_change=lambda: None):
    """Measures every configuration; on_change() after each row or skip (the caller saves the JSON)."""
    timm, reason = load_models()
    cfgs = configs(device.type, args.quick)
    if timm is None:
        for op in MODEL_OPS:
            skipped.append({"op": op, "impl": None, "pass": None, "model": MODEL, "reason": reason})
        print(f"bench/models.py: skipped: {reason}", flush=True)
        on_change()
        return
    reps = args.reps or (20 if device.type == "cuda" else (2 if args.quick else 3))
    warmup = 3 if device.type == "cuda" else 1
    # As timm's train.py runs: fixed shapes, so cuDNN times its algorithms once (on the warm-up steps)
    # for the stem's and the downsamples' convs instead of taking its heuristics' first pick.
    torch.backends.cudnn.benchmark = True
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    amp_dtype = amp_dtype_for(device, args.amp)
    dtype = "bfloat16" if amp_dtype is not None else "float32"
    gen = torch.Generator(device=device).manual_seed(0)
    # CUDA: each step eager and as a CUDA graph replay (the GPU's time alone)
    graph_modes = (False, True) if device.type == "cuda" and not args.no_graph else (False,)

    def autocast():
        if amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(device.type, dtype=amp_dtype)

    for model_name, size, batch, features_only in cfgs:
        for graph in graph_modes:
            for attn_impl in ATTN_IMPLS:
                impl = "sola_ops" if attn_impl == "sola" else attn_impl
                base = {"model": model_name, "attn_impl": attn_impl, "img_size": size,
                        "features_only": features_only, "cuda_graph": graph, "dtype": dtype, "B": batch,
                        "case": "model"}
                for op, pass_ in (("model_fwd", "fwd"), ("model_train", "fwd_bwd")):
                    row = measure_one(timm, device, args, base, op, pass_, impl, gen, autocast, reps, warmup,
                                      deadline, skipped)
                    if row is not None:
                        rows.append(row)
                    on_change()


def measure_one(timm, device, args, base, op, pass_, impl, gen, autocast, reps, warmup, deadline, skipped):
    """One row, or None after appending the reason to skipped."""
    model_name, size, batch, features_only, graph = (base["model"], base["img_size"], base["B"],
                                                     base["features_only"], base["cuda_graph"])
    label = f"{op:<11} {base['attn_impl']:<5} {size:>4}px b{batch:<3} {'features' if features_only else 'cls':<8}" \
            f"{' graph' if graph else ' eager'}"

    def skip(why):
        skipped.append({"op": op, "impl": impl, "pass": pass_, **base, "reason": why})
        print(f"  skipped {label}: {why}", flush=True)

    if deadline is not None and time.monotonic() > deadline:
        skip(f"time budget (--budget-s {args.budget_s:g}) used up")
        return None
    model = x = labels = step = None
    try:
        model = timm.create_model(model_name, pretrained=False, attn_impl=base["attn_impl"],
                                  features_only=features_only).to(device)
        x = torch.randn(batch, 3, size, size, generator=gen, device=device)
        if op == "model_train" and not features_only:
            n_cls = getattr(model, "num_classes", 1000) or 1000
            labels = torch.randint(0, n_cls, (batch,), generator=gen, device=device)
        step = make_step(model, op, features_only, x, labels, autocast, capturable=graph)
        t0 = time.perf_counter()
        step()
        C.sync(device)
        call_s = time.perf_counter() - t0
        if args.max_impl_s and call_s * (warmup + reps) > args.max_impl_s:
            skip(f"too slow: one step took {call_s:.2f} s (--max-impl-s {args.max_impl_s:g})")
            return None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if graph:
            from sola_vision.explore_measure import cuda_graphed  # the explorer times its steps the same way
            step = cuda_graphed(step, device)
        ms, times = C.time_fn(step, device, reps, warmup)
        mem = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    except Exception as e:  # noqa: BLE001 - OOM, a missing kernel, an API mismatch, a failed capture
        skip(C.short_reason(e))
        return None
    finally:
        del model, x, labels, step
        C.free_memory(device)
    row = C.make_row(op=op, impl=impl, **{"pass": pass_}, dtype=base["dtype"], B=batch, ms=C.sig(ms),
                     peak_mem_MB=mem)
    row.update(base, img_per_s=C.sig(batch / (ms * 1e-3)), reps=len(times))
    print(f"  {label} {ms:9.2f} ms {row['img_per_s']:9.1f} img/s", flush=True)
    return row


def load_to_append(path, device):
    """The results JSON at path without its model rows, or None when another device, torch or csrc/ wrote it:
    e.g. the committed bench/results/<gpu>.json of an earlier run, left as it was when this run's kernel
    bench died before its first case; appended to, its old kernel rows passed for this run's."""
    import json
    with open(path) as f:
        data = json.load(f)
    here = (C.device_name(device), torch.__version__, C.csrc_sha256())
    if (data.get("device"), data.get("torch"), data.get("csrc_sha256")) != here:
        print(f"bench/models.py: {path} is from another run (device, torch or csrc/ differ): not appending to it, "
              "writing a new one", flush=True)
        return None
    data["rows"] = [r for r in data.get("rows", []) if r.get("op") not in MODEL_OPS]
    data["skipped"] = [s for s in data.get("skipped", []) if s.get("op") not in MODEL_OPS]
    return data


def main(argv=None):
    p = argparse.ArgumentParser(description="SoLA-Vision throughput, attn_impl sola vs torch.")
    p.add_argument("--quick", action="store_true", help="fewer CPU configurations / runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="results JSON to write")
    p.add_argument("--append", action="store_true",
                   help="add the model rows to an existing --out JSON (its earlier model rows are replaced)")
    p.add_argument("--reps", type=int)
    p.add_argument("--budget-s", type=float)
    p.add_argument("--max-impl-s", type=float, default=None, help="default 120 on CUDA, 60 on CPU")
    p.add_argument("--no-table", action="store_true")
    p.add_argument("--no-graph", action="store_true", help="CUDA: eager steps only (no CUDA graph rows)")
    p.add_argument("--amp", choices=("bf16", "none"), default=None,
                   help="autocast dtype of the steps (default: bf16 on CUDA, none = fp32 on the CPU)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a row was skipped for another reason than out of memory or time")
    args = p.parse_args(argv)
    device = C.pick_device(args.device)
    if args.max_impl_s is None:
        args.max_impl_s = 120.0 if device.type == "cuda" else 60.0
    t0 = time.perf_counter()
    print(f"bench/models.py: {C.device_name(device)}, torch {torch.__version__}", flush=True)
    rows, skipped = [], []
    data = None
    if args.out and args.append and os.path.exists(args.out):
        data = load_to_append(args.out, device)
    if data is None:
        data = C.header(device, C.measure_peaks(device, quick=True), {"mode": "models", "cudnn_benchmark": True})
    kept_rows, kept_skipped = data["rows"], data["skipped"]

    def save():  # after every row, so a run killed by a time limit keeps what it measured
        data["rows"] = kept_rows + C.add_derived(rows, data["peak"])
        data["skipped"] = kept_skipped + skipped
        data.setdefault("meta", {})["models_elapsed_s"] = round(time.perf_counter() - t0, 1)
        if args.out:
            C.write_json(args.out, data)

    run(device, args, rows, skipped, on_change=save)
    save()
    if not args.no_table and rows:
        print()
        C.table(sorted(rows, key=lambda r: (r["model"], r["features_only"], r["img_size"], r["cuda_graph"], r["op"],
                                            r["attn_impl"])))
    print(f"{len(rows)} model rows, {len(skipped)} skipped, {time.perf_counter() - t0:.1f} s"
          + (f", written to {args.out}" if args.out else ""))
    failed = failures(skipped)
    for s in failed[:10]:
        print(f"not measured: {s.get('attn_impl') or s.get('impl')} {s.get('op')}: {s['reason']}", file=sys.stderr)
    data.setdefault("meta", {})["models_exit_status"] = 1 if (args.strict and failed) else 0
    return data


def failures(skipped):
    """Skips that say something is broken (an error, the model not importable), not out of memory or time."""
    return [s for s in skipped if not s["reason"].startswith(C.BENIGN_SKIPS)]


if __name__ == "__main__":
    sys.exit(main()["meta"]["models_exit_status"])
