"""Where a SoLA-Vision step spends its time, attn_impl="sola" vs "torch": the profiler's kernel time per
step, grouped by kind, so the model issue's speed-up can be traced to the ops that set it.

    python bench/model_breakdown.py                                   # CUDA: tiny, 224 px, batch 128, bf16, train step
    python bench/model_breakdown.py --step fwd --img-size 512 --batch 32 --features-only
    python bench/model_breakdown.py --top 15                          # also the 15 longest kernels per impl
    python bench/model_breakdown.py --ops 25                          # the 25 longest ops, with their GB/s
    python bench/model_breakdown.py --bytes 20 --device cpu           # no timing: bytes per step, 20 largest ops

On CUDA the times are the GPU kernels' (torch.profiler, CUDA activity), bf16 autocast as bench/models.py
runs it; on CPU (small defaults: 224 px, batch 2, fp32) the self CPU time of each op, a smoke test of the
grouping more than a measurement. Groups, by kernel or op name: sola_ops conv (our depthwise convs),
sola_ops norm (our LayerNorm), sola_ops (our other kernels), sdpa (PyTorch's attention kernels), gemm,
conv, norm, optimizer, elementwise, reduce, other.
"""
import argparse
import os
import sys
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import models as BM  # noqa: E402  (bench/models.py: the same models and steps as the model benchmark)

# First match wins: conv before gemm (cuDNN's convolutions are implicit GEMMs), sdpa before the rest.
GROUPS = (
    ("sola_ops conv", ("dwconv", "depthwise_conv3x3")),  # our depthwise convs, apart from our attention
    # our LayerNorm (torch's goes to "norm"); the partials' sum kernel it shares with the dwconv is "sola_ops"
    ("sola_ops norm", ("sola_ops::layer_norm", "ln_fwd_kernel", "ln_bwd_kernel", "ln_column_kernel")),
    ("sola_ops", ("sola::", "sola_ops", "void flash::")),
    ("sdpa", ("fmha", "flash_fwd", "flash_bwd", "pytorch_flash", "sdpa", "scaled_dot_product", "attention")),
    ("conv", ("conv", "fprop", "dgrad", "wgrad", "implicit", "winograd")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "matmul", "linear")),
    ("norm", ("layer_norm", "batch_norm", "batchnorm", "welford", "bn_")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "aten::add", "aten::mul", "aten::silu",
                     "aten::gelu", "aten::elu", "aten::cat", "aten::stack", "aten::sub", "aten::fill")),
    ("reduce", ("reduce", "aten::sum", "aten::mean")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def profile_step(step, device: torch.device, steps: int):
    """(kernels, ops) over `steps` runs of step(), each {name: (milliseconds per step, calls per step)}.
    CUDA: kernels are the GPU kernels' times; ops the device time of the kernels each op launched itself
    (self time), so nothing counts twice. CPU: both are the ops' self CPU times."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    kernels, ops = {}, {}
    for e in prof.key_averages():
        on_device = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        if cuda:
            us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
        else:
            us = e.self_cpu_time_total
        if us > 0:
            entry = (us / 1e3 / steps, e.count / steps)
            if on_device or not cuda:
                kernels[e.key] = entry
            if not on_device:
                ops[e.key] = entry
    return kernels, ops


def op_name(func) -> str:
    """The profiler's name of a dispatched op: "aten::mm", "sola_ops::layer_norm_fwd"."""
    return func._schema.name


# Views that do not say so (is_view is False): reshape's copy-free result
VIEW_LIKE = ("aten::_unsafe_view",)


def op_bytes(step, seen=None):
    """{op name: bytes per step} over one run of step(): each op's tensor inputs and outputs (a lower
    bound on what it moves; views move nothing), as a TorchDispatchMode sees the ops below autograd and
    autocast (the casts included). seen, a set, gets the names of all the ops it saw, views included."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    class CountBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = defaultdict(float)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if seen is not None:
                seen.add(op_name(func))
            outs = tree_flatten(out)[0]
            if not func.is_view and op_name(func) not in VIEW_LIKE and any(isinstance(t, torch.Tensor) for t in outs):
                self.bytes[op_name(func)] += nbytes(tree_flatten((args, kwargs))[0]) + nbytes(outs)
            return out

    with CountBytes() as counter:
        step()
    return dict(counter.bytes)


def op_efficiency(step, op_times):
    """{op name: (ms per step, calls per step, GB per step)}: op_times (profile_step's ops) joined with
    the bytes each op moves over one more run of step(). An op the dispatch mode never saw, one that another
    op's kernel calls (aten::cudnn_convolution, SDPA's aten::_flash_attention_forward: where the time of the
    convs and the attention lands), keeps its time with GB None; views, moving nothing, are left out."""
    seen = set()
    moved = op_bytes(step, seen)
    return {name: (ms, calls, moved[name] / 1e9 if name in moved else None)
            for name, (ms, calls) in op_times.items() if name in moved or (name not in seen and not is_view_op(name))}


def is_view_op(name: str) -> bool:
    """Whether a profiler name is a view op, also one the dispatch mode never sees (aten::t runs as
    aten::transpose below autograd)."""
    ns, _, op = name.partition("::")
    try:
        packet = getattr(getattr(torch.ops, ns), op)
        return any(getattr(packet, o).is_view for o in packet.overloads())
    except Exception:  # noqa: BLE001 - not an op: "autograd::engine::...", a record_function label
        return False


def print_op_table(effs, top: int, copy_gbps: float):
    """The top ops by time; % copy: their GB/s against a large device copy's (bench/common.py)."""
    print(f"  {'ms':>9} {'calls':>7} {'GB':>8} {'GB/s':>8} {'% copy':>7}  op")
    for name, (ms, calls, gb) in sorted(effs.items(), key=lambda kv: -kv[1][0])[:top]:
        gbps = None if gb is None else gb / (ms * 1e-3)
        pct = None if gb is None else 100 * gbps / copy_gbps
        print(f"  {ms:9.3f} {calls:7.0f} {BM.C.fmt(gb, '8.3f')} {BM.C.fmt(gbps, '8.1f')} {BM.C.fmt(pct, '7.1f')}  {name}")


def breakdown(times):
    groups = defaultdict(float)
    for name, (ms, _) in times.items():
        groups[group_of(name)] += ms
    return dict(groups)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=BM.MODEL)
    p.add_argument("--step", choices=("train", "fwd"), default="train")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 2 on CPU")
    p.add_argument("--features-only", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--top", type=int, default=0, help="also list the N longest kernels (ops) of each impl")
    p.add_argument("--ops", type=int, default=0, help="also list the N ops with the most time, with their GB/s")
    p.add_argument("--bytes", type=int, default=0, metavar="N",
                   help="no timing (any device, CPU included): each impl's bytes per step at --batch (default 128) "
                        "and the N ops moving the most, bf16 autocast")
    return p.parse_args(argv)


def step_bytes(timm, args, device, impl, batch):
    """op_bytes of one step of impl at batch (after a first step, so the optimizer's state exists)."""
    torch.manual_seed(0)
    kw = {"features_only": True} if args.features_only else {}
    model = timm.create_model(args.model, attn_impl=impl, **kw).to(device)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    op = "model_train" if args.step == "train" else "model_fwd"
    step = BM.make_step(model, op, args.features_only, x, labels,
                        lambda: torch.autocast(device.type, dtype=torch.bfloat16), capturable=False)
    step()
    return op_bytes(step)


def bytes_per_step(args):
    """{impl: {op: GB per step at args.batch}}, from steps at batch 2 and 4: the batch-proportional part
    (activations) scaled to the batch, the rest (parameters, optimizer) counted once. On CPU the autocast
    policy is the CPU's, close to CUDA's for these ops (linear / conv in bf16, our ops in x's dtype)."""
    timm, reason = BM.load_models()
    if timm is None:
        print(f"model_breakdown: {reason}")
        return None
    device, batch = torch.device(args.device), args.batch or 128
    per_impl = {}
    for impl in BM.ATTN_IMPLS:
        small, large = step_bytes(timm, args, device, impl, 2), step_bytes(timm, args, device, impl, 4)
        per_impl[impl] = {name: (small.get(name, 0.0) + (large.get(name, 0.0) - small.get(name, 0.0)) / 2 * (batch - 2))
                          / 1e9 for name in set(small) | set(large)}
    return per_impl


def print_bytes(per_impl, args):
    print(f"model_breakdown: {args.model} {args.step} step, {args.img_size} px, batch {args.batch or 128}, bf16 "
          "autocast: bytes each op's tensor inputs and outputs move per step (views excluded)")
    for impl, ops in per_impl.items():
        print(f"\n{impl}: {sum(ops.values()):.1f} GB per step; the {args.bytes} largest ops")
        for name, gb in sorted(ops.items(), key=lambda kv: -kv[1])[:args.bytes]:
            print(f"  {gb:8.2f}  {name}")


def measure(args):
    """{impl: {group: ms per step}} for attn_impl "sola" and "torch" (None without the models)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (128 if cuda else 2)
    steps = args.steps or (5 if cuda else 1)
    timm, reason = BM.load_models()
    if timm is None:
        print(f"model_breakdown: {reason}")
        return None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    torch.backends.cudnn.benchmark = True  # as bench/models.py (and timm's train.py)
    op = "model_train" if args.step == "train" else "model_fwd"
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device, generator=gen)
    labels = torch.randint(0, 1000, (batch,), device=device, generator=gen)

    print(f"model_breakdown: {args.model} {args.step} step, {args.img_size} px, batch {batch}"
          f"{', features_only' if args.features_only else ''}, {'bf16 autocast' if cuda else 'fp32'}, "
          f"{'GPU kernel' if cuda else 'CPU op self'} time per step over {steps} profiled step(s) on {device}")
    per_impl = {}
    copy_gbps = BM.C.measure_peaks(device, quick=True)["copy_GBps"] if args.ops else None
    if args.ops:
        print(f"model_breakdown: a device copy moves {copy_gbps:.0f} GB/s (read + write)")
    for impl in BM.ATTN_IMPLS:
        torch.manual_seed(0)
        kw = {"features_only": True} if args.features_only else {}
        model = timm.create_model(args.model, attn_impl=impl, **kw).to(device)
        step = BM.make_step(model, op, args.features_only, x, labels, lambda: amp, capturable=False)
        for _ in range(2 if cuda else 1):  # warm-up: cuDNN's choices, the allocator, lazy module loads
            step()
        times, ops = profile_step(step, device, steps)
        per_impl[impl] = times
        if args.top:
            print(f"\n{impl}: the {args.top} longest ({'kernels' if cuda else 'ops'}), ms per step")
            for name, (ms, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:args.top]:
                print(f"  {ms:9.3f}  {calls:6.0f}x  {group_of(name):<11}  {name[:110]}")
        if args.ops:
            print(f"\n{impl}: the {args.ops} ops with the most {'device' if cuda else 'CPU'} time per step, the bytes "
                  "they move (inputs + outputs) and the GB/s that gives")
            print_op_table(op_efficiency(step, ops), args.ops, copy_gbps)
        del model, step

    return {impl: breakdown(t) for impl, t in per_impl.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.bytes:
        per_impl = bytes_per_step(args)
        if per_impl is None:
            return 1
        print_bytes(per_impl, args)
        return 0
    groups = measure(args)
    if groups is None:
        return 1
    names = [g for g, _ in GROUPS] + ["other"]
    print(f"\n{'group':<12}" + "".join(f"{impl + ' ms':>12}" for impl in BM.ATTN_IMPLS) + f"{'torch - sola':>14}")
    for g in names + ["total"]:
        vals = [sum(groups[i].values()) if g == "total" else groups[i].get(g, 0.0) for i in BM.ATTN_IMPLS]
        print(f"{g:<12}" + "".join(f"{v:12.3f}" for v in vals) + f"{vals[1] - vals[0]:14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
