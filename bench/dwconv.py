"""Depthwise 3x3 conv on channels-last tokens, as SoLA-Vision's blocks run it (the CPE: x + conv(x); the
in-block conv: silu(conv(x))) and its downsamples do (relu(conv(x)) at stride 2, on the expanded tensor):
sola_ops.depthwise_conv3x3 against PyTorch's conv2d on the channels-last view (cuDNN on CUDA), forward
and forward + backward (input, weight and bias gradients), under bf16 autocast with fp32 parameters
as the model bench runs, on sola_vision_tiny's block and downsample shapes. Also the blocks' LayerNorm:
sola_ops.layer_norm (bf16 in, bf16 out) against nn.LayerNorm under autocast (fp32 out, as torch runs it),
and their gated output y * SiLU(gate): sola_ops.silu_mul against x * F.silu(gate), the gate a channel slice
gate[..., C:] of one (B, H, W, 2C) projection as the blocks pass it (read in place by both). And the MLP's
fc1 + GELU as the two impls of the model run it: sola_ops.bias_gelu(F.linear(x, fc1.weight), fc1.bias) against
F.gelu(fc1(x)) (the bias added in the GEMM's epilogue), x the C-wide block tokens, fwd_bwd including the
weight and bias gradients: the GEMM is in both, so the difference is what the fusion saves.

    python bench/dwconv.py --out bench/results/nvidia-h200_dwconv.json     # CUDA: 224 px b128, 1024 px b8
    python bench/dwconv.py --device cpu --tiny                                # a smoke test

Rows follow DESIGN.md's format (op "depthwise_conv3x3", "layer_norm", "silu_mul" or "bias_gelu", impl "sola_ops"
or "torch", Nq = H * W tokens, D = channels, img_hw (the input's), case "dwconv_residual", "dwconv_silu",
"dwconv_downsample", "layer_norm", "silu_mul" or "bias_gelu"); GB/s counts the bytes a fused kernel must move in
x's dtype: the forward reads x and writes out, the backward reads the gradient and x (and out, for relu's mask)
and writes dx; silu_mul's forward reads x and gate and writes out, its backward reads the gradient, x and gate
and writes dx and dgate; bias_gelu (D = fc1's input width C) counts the 4C-wide hidden tensor's elementwise
passes only (forward: the pre-activation in, the output out; backward: the gradient and pre-activation in, dx
out), its time includes fc1's GEMMs.
The baseline of ratio_to_best_baseline is "torch".
"""
import argparse
import contextlib
import itertools
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common as C  # noqa: E402

# (B, H, W, C): sola_vision_tiny's four stages at 224 px, batch 128; stage 1 at 1024 px, batch 8. The
# downsamples' convs take the stage's input expanded to 4x the next stage's width.
CUDA_SHAPES = [(128, 56, 56, 64), (128, 28, 28, 128), (128, 14, 14, 256), (128, 7, 7, 512), (8, 256, 256, 64)]
CUDA_DOWNSAMPLE_SHAPES = [(128, 56, 56, 512), (128, 28, 28, 1024), (128, 14, 14, 2048), (8, 256, 256, 512)]
CPU_SHAPES = [(8, 28, 28, 64), (8, 7, 7, 256)]
CPU_DOWNSAMPLE_SHAPES = [(8, 28, 28, 256)]
TINY_SHAPES = [(2, 8, 8, 16), (2, 5, 7, 24)]
# The forms that are not depthwise convs: their op is the form.
OTHER_OPS = ("layer_norm", "silu_mul", "bias_gelu")

# The block's two forms, the CPE (x + conv(x)) and the in-block conv with its SiLU, and the downsample's
# stride-2 conv with its ReLU: form -> (stride, residual, activation).
FORMS = {"residual": (1, True, None), "silu": (1, False, "silu"), "downsample": (2, False, "relu")}
ACTIVATIONS = {None: lambda y: y, "silu": torch.nn.functional.silu, "relu": torch.relu}


class Gate(torch.nn.Module):
    """silu_mul's gate as the blocks pass it: the act_proj half gate[..., C:] of one (B, H, W, 2C) projection,
    a channel slice at row stride 2C, held as a parameter (a leaf keeping those strides) so both impls
    differentiate it without a slice backward."""

    def __init__(self, shape, device, dtype):
        super().__init__()
        B, H, W, C = shape
        both = (torch.randn(B, H, W, 2 * C, device=device, dtype=torch.float32) * 3).to(dtype)
        self.gate = torch.nn.Parameter(both[..., C:])


def make_module(form, shape, device, dtype):
    """The layer whose parameters a form uses: the depthwise conv, the LayerNorm, silu_mul's gate or
    bias_gelu's fc1 (C -> 4C, MLP ratio 4)."""
    channels = shape[3]
    if form == "bias_gelu":
        return torch.nn.Linear(channels, 4 * channels, device=device)
    if form == "layer_norm":
        return torch.nn.LayerNorm(channels, device=device)
    if form == "silu_mul":
        return Gate(shape, device, dtype)
    return torch.nn.Conv2d(channels, channels, 3, stride=FORMS[form][0], padding=1, groups=channels, device=device)


def impls(sola_ops, form):
    if form == "layer_norm":
        return {"sola_ops": lambda x, norm: sola_ops.layer_norm(x, norm.weight, norm.bias, norm.eps),
                "torch": lambda x, norm: norm(x)}
    if form == "bias_gelu":
        return {"sola_ops": lambda x, fc1: sola_ops.bias_gelu(torch.nn.functional.linear(x, fc1.weight), fc1.bias),
                "torch": lambda x, fc1: torch.nn.functional.gelu(fc1(x))}
    if form == "silu_mul":
        return {"sola_ops": lambda x, g: sola_ops.silu_mul(x, g.gate),
                "torch": lambda x, g: x * torch.nn.functional.silu(g.gate)}
    stride, residual, activation = FORMS[form]

    def torch_conv(x, conv):
        y = ACTIVATIONS[activation](conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x + y if residual else y

    def ours(x, conv):
        return sola_ops.depthwise_conv3x3(x, conv.weight, conv.bias, residual=residual, activation=activation,
                                          stride=stride)

    return {"sola_ops": ours, "torch": torch_conv}


def cases(device, tiny):
    """(shape, form) pairs to time."""
    if tiny:
        return list(itertools.product(TINY_SHAPES, (*FORMS, *OTHER_OPS)))
    cuda = device.type == "cuda"
    block, down = (CUDA_SHAPES, CUDA_DOWNSAMPLE_SHAPES) if cuda else (CPU_SHAPES, CPU_DOWNSAMPLE_SHAPES)
    stages = CUDA_SHAPES[:4] if cuda else CPU_SHAPES  # silu_mul: the four 224 px stages
    return (list(itertools.product(block, ("residual", "silu"))) + [(shape, "downsample") for shape in down] +
            [(shape, "layer_norm") for shape in block] + [(shape, "silu_mul") for shape in stages] +
            [(shape, "bias_gelu") for shape in stages])


def run(device, args, data):
    """Times every case into data's rows (written to args.out after each case: a killed run keeps them)."""
    rows, skipped = data["rows"], data["skipped"]
    import sola_ops
    dtype = C.DTYPES[args.dtype]
    reps = args.reps or (20 if device.type == "cuda" else 3)
    # bf16 / fp16 as the model runs them: autocast, fp32 parameters (conv2d gets them cast, ours reads fp32)
    low = dtype in (torch.float16, torch.bfloat16)
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if low else contextlib.nullcontext
    for (B, H, W, Ch), form in cases(device, args.tiny):
        op = form if form in OTHER_OPS else "depthwise_conv3x3"
        case = form if form in OTHER_OPS else f"dwconv_{form}"

        def skip(name, pass_, e):
            skipped.append({"op": op, "impl": name, "pass": pass_, "dtype": args.dtype, "B": B, "Nq": H * W,
                            "D": Ch, "img_hw": [H, W], "case": case, "reason": C.short_reason(e)})
        try:
            module = make_module(form, (B, H, W, Ch), device, dtype)
            x = torch.randn(B, H, W, Ch, device=device, dtype=dtype if low else torch.float32).to(dtype)
            fns = impls(sola_ops, form)
            with ctx():
                outs = {name: fn(x, module) for name, fn in fns.items()}
        except Exception as e:  # noqa: BLE001 - a shape a kernel refuses, OOM: the other cases still run
            for name, pass_ in itertools.product(("sola_ops", "torch"), C.PASSES):
                skip(name, pass_, e)
            C.free_memory(device)
            continue
        g = torch.randn_like(outs["torch"])  # in each impl's output dtype (torch's LayerNorm: fp32 under autocast)
        diff = (outs["sola_ops"].double() - outs["torch"].double()).abs().max().item()
        for name, fn in fns.items():
            xg = x.detach().requires_grad_(True)
            params = [xg, *module.parameters()]
            g_out = g.to(outs[name].dtype)
            passes = {
                "fwd": lambda: torch.no_grad()(fn)(x, module),
                "fwd_bwd": lambda: torch.autograd.grad(fn(xg, module), params, g_out),
            }
            for pass_, step in passes.items():
                try:
                    ms, _ = C.time_fn(step, device, reps, warmup=3, ctx=ctx)
                except Exception as e:  # noqa: BLE001
                    skip(name, pass_, e)
                    continue
                out_elems = outs[name].numel()
                elems = x.numel() + out_elems  # forward: x in, out out
                if pass_ == "fwd_bwd":  # backward: the gradient, x (and out for relu's mask) in, dx out
                    elems += out_elems * (2 if form == "downsample" else 1) + 2 * x.numel()
                if form == "bias_gelu":  # the hidden tensor's elementwise passes (2 forward, 3 backward)
                    elems = out_elems * (5 if pass_ == "fwd_bwd" else 2)
                if form == "silu_mul":  # and gate in; backward: gate in, dgate out
                    elems += x.numel() * (3 if pass_ == "fwd_bwd" else 1)
                rows.append(C.make_row(op=op, impl=name, **{"pass": pass_}, dtype=args.dtype, B=B,
                                       Nq=H * W, D=Ch, ms=C.sig(ms), case=case, img_hw=[H, W],
                                       GBps=C.sig(elems * x.element_size() / (ms * 1e-3) / 1e9),
                                       max_abs_diff_vs_torch=C.sig(diff, 3)))
                print(f"{name:<9} {form:<10} {pass_:<8} B={B} {H}x{W} C={Ch}: {ms:.4f} ms", flush=True)
        if args.out:
            C.write_json(args.out, data)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=sorted(C.DTYPES), help="default bfloat16 (CUDA), float32 (CPU)")
    p.add_argument("--tiny", action="store_true", help="two tiny shapes (for the tests)")
    p.add_argument("--reps", type=int)
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args(argv)
    device = C.pick_device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    peak = C.measure_peaks(device, quick=True, tiny=args.tiny)
    data = C.header(device, peak, {"bench": "dwconv"})
    run(device, args, data)
    C.add_derived(data["rows"], peak)
    for r in data["rows"]:
        print(f"{r['impl']:<9} {r['case'].removeprefix('dwconv_'):<10} {r['pass']:<8} B={r['B']:<4} {r['img_hw'][0]:>3}x{r['img_hw'][1]:<3} C={r['D']:<4} "
              f"{r['ms']:>9.4f} ms {r['GBps']:>8.1f} GB/s {C.fmt(r['pct_peak'], '5.1f')}% of copy  "
              f"x{C.fmt(r['ratio_to_best_baseline'], '.2f')} vs torch")
    for s in data["skipped"]:
        print(f"skipped: {s['impl']:<9} {s['case'].removeprefix('dwconv_'):<10} {s['pass']:<8} B={s['B']:<4} "
              f"{s['img_hw'][0]:>3}x{s['img_hw'][1]:<3} C={s['D']:<4} {s['reason']}")
    if args.out:
        C.write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
