"""A small CUDA workload for compute-sanitizer (memcheck, racecheck): the sola_ops ops, forward and
backward, on small awkward shapes in several dtypes, each checked against the fp64 reference on the
CPU (so that no reference kernel runs on the GPU under the sanitizer).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \\
        python scripts/sanitizer_driver.py

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so an access past the end
of one tensor is out of bounds for memcheck instead of landing in a neighbour from the same pool
block. Exits 1 when an output disagrees with the reference or an op raises, 2 without CUDA.
"""
import argparse
import os
import sys
import time
from functools import partial

import torch

import sola_ops
from sola_ops import reference

# The flash kernels take two row groups per warp only on grids that fill the GPU; these shapes
# are small, so force two wherever there are more than 64 rows (the one-group kernels still run
# for the shorter sides).
os.environ.setdefault("SOLA_FLASH_GROUPS", "2")

# Relative L2 error allowed against the fp64 reference (a sanity bound, not the tests' rule).
TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-9}

# (B, H, Nq, Nk, Dk, Dv): odd lengths, Nq != Nk, Dk != Dv, tile-edge and single-row cases.
SHAPES = [
    (1, 1, 1, 3, 32, 32),
    (2, 3, 77, 50, 32, 32),
    (1, 2, 129, 129, 64, 64),
    (2, 1, 65, 200, 64, 48),
    (1, 1, 33, 17, 128, 128),
    (1, 1, 70, 40, 96, 96),
]
HEAD_DIMS_ONLY_SOFTMAX = [(1, 1, 40, 70, 256, 256)]
# Key sequences long enough that the wgmma forward's ring of K / V stages wraps around.
WGMMA_LONG_KEYS = [(1, 1, 130, 333, 128, 128), (1, 2, 70, 600, 64, 64)]


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = torch.linalg.vector_norm(b).item()
    return torch.linalg.vector_norm(a - b).item() / (den if den > 0 else 1.0)


DEVICE = "cuda"


def check(name, fn, ref_fn, inputs, dtype, failures):
    """Runs fn on DEVICE (forward and backward) and ref_fn on fp64 CPU copies; records failures."""
    try:
        xs = [x.detach().to(DEVICE, dtype).requires_grad_(True) for x in inputs]
        out = fn(*xs)
        g = torch.randn(out.shape, dtype=torch.float32).to(DEVICE, dtype)
        grads = torch.autograd.grad(out, xs, g)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        failures.append(f"{name}: raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        print(f"  FAIL {name}: raised {e}", flush=True)
        return
    # the reference sees the values the kernel saw (rounded to dtype), in fp64
    r64 = [x.detach().cpu().double().requires_grad_(True) for x in xs]
    ref = ref_fn(*r64)
    ref_grads = torch.autograd.grad(ref, r64, g.cpu().double())
    errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
    finite = all(torch.isfinite(t).all().item() for t in [out, *grads])
    ok = finite and max(errs) <= TOL[dtype]
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err out {errs[0]:.1e}, grads {max(errs[1:]):.1e}", flush=True)
    if not ok:
        failures.append(f"{name}: rel err {max(errs):.2e} > {TOL[dtype]:.0e} (finite={finite})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="float16,bfloat16,float32,float64")
    p.add_argument("--quick", action="store_true", help="three shapes only")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and (not torch.cuda.is_available() or not sola_ops.build_info().get("cuda")):
        print("sanitizer_driver: needs a CUDA device and a CUDA build of sola_ops", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    shapes = SHAPES[:3] if args.quick else SHAPES
    gen = torch.Generator().manual_seed(0)
    failures = []

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for B, H, Nq, Nk, Dk, Dv in shapes:
            q, k, v = randn(B, H, Nq, Dk), randn(B, H, Nk, Dk), randn(B, H, Nk, Dv)
            tag = f"{dt} B={B} H={H} Nq={Nq} Nk={Nk} Dk={Dk} Dv={Dv}"
            check(f"linear elu {tag}", sola_ops.linear_attention, reference.linear_attention, [q, k, v], dtype, failures)
            check(f"softmax {tag}", sola_ops.softmax_attention, reference.softmax_attention, [q, k, v], dtype, failures)
        if dtype != torch.float64:
            # the backward's twins for 99 KB GPUs, forced here (single-buffered; dkdv's lse / delta in the
            # padding of its query rows): fp32 head dims 64 / 128, 16-bit 128 / 256
            os.environ["SOLA_FLASH_BWD_TWIN"] = "1"
            for B, H, Nq, Nk, D in ((1, 2, 129, 70, 64), (1, 1, 33, 17, 128), (1, 1, 40, 70, 256)):
                q, k, v = randn(B, H, Nq, D), randn(B, H, Nk, D), randn(B, H, Nk, D)
                check(f"softmax bwd twins {dt} B={B} H={H} Nq={Nq} Nk={Nk} D={D}", sola_ops.softmax_attention,
                      reference.softmax_attention, [q, k, v], dtype, failures)
            del os.environ["SOLA_FLASH_BWD_TWIN"]
        if dtype in (torch.float16, torch.float32):
            # the other linear-attention variants, and a strided (B, N, H, D)-transposed input
            B, H, N, D = 2, 2, 37, 32
            q, k, v, qn, kn = (randn(B, H, N, D) for _ in range(5))
            for fm in ("relu", "identity"):
                check(f"linear {fm} normalize=False {dt}",
                      lambda q, k, v, fm=fm: sola_ops.linear_attention(q, k, v, feature_map=fm, normalize=False),
                      lambda q, k, v, fm=fm: reference.linear_attention(q, k, v, feature_map=fm, normalize=False),
                      [q, k, v], dtype, failures)
            check(f"linear q_norm/k_norm {dt}",
                  lambda q, k, v, qn, kn: sola_ops.linear_attention(q, k, v, q_norm=qn, k_norm=kn),
                  lambda q, k, v, qn, kn: reference.linear_attention(q, k, v, q_norm=qn, k_norm=kn),
                  [q, k, v, qn, kn], dtype, failures)
            t = lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  (B, N, H, D) memory
            check(f"softmax transposed-layout {dt}", lambda q, k, v: sola_ops.softmax_attention(t(q), t(k), t(v)),
                  reference.softmax_attention, [q, k, v], dtype, failures)
            check(f"linear transposed-layout {dt}", lambda q, k, v: sola_ops.linear_attention(t(q), t(k), t(v)),
                  reference.linear_attention, [q, k, v], dtype, failures)
    # rope (feature map + rotary embedding), both outputs: a vision shape, an odd head dim through
    # a slice (element loads, a partial last vector).
    for dtype in dtypes:
        for B, H, N, D, sl in ((2, 3, 77, 32, False), (1, 2, 9, 10, True)):
            angles = randn(N, D // 2) * 3
            cos, sin = angles.cos(), angles.sin()
            dev = (cos.to(DEVICE), sin.to(DEVICE))

            def fused(x, tables=dev, sl=sl):
                x = x[..., 1:] if sl else x
                return torch.cat(sola_ops.rope(x, *tables, feature_map="elu", return_features=True), -1)

            def ref(x, tables=(cos.double(), sin.double()), sl=sl):
                x = x[..., 1:] if sl else x
                return torch.cat(reference.rope(x, *tables, feature_map="elu", return_features=True), -1)
            check(f"rope elu {str(dtype).replace('torch.', '')} B={B} H={H} N={N} D={D}{' slice' if sl else ''}",
                  fused, ref, [randn(B, H, N, D + sl)], dtype, failures)
    # linear attention with RoPE fused (fp16 / bf16: the tensor-core kernels read the tables; fp32
    # composes): head dims 32 (QueryGrad sums dS) and 64 (token reduction over q, g), a Dk whose
    # table rows are not whole 16-byte vectors (10), the (B, N, 2H, D) head-slice views of the model;
    # 768 heads of 200 rows: more heads than an H100 / H200 holds blocks at once, so each row block
    # walks all 4 tiles of its head through both cp.async stages (the staged row tiles).
    for dtype in dtypes:
        for B, H, N, Dk, Dv in ((2, 2, 77, 32, 32), (1, 2, 130, 64, 48), (1, 1, 21, 10, 8), (8, 96, 200, 32, 32),
                                (8, 96, 200, 64, 64)):
            angles = randn(N, Dk // 2) * 3
            cos, sin = angles.cos(), angles.sin()
            dev = (cos.to(DEVICE), sin.to(DEVICE))

            def fused(q, k, v, tables=dev):
                qk = torch.cat((q, k), 1).transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, 2H, D) memory
                return sola_ops.linear_attention(qk[:, :q.shape[1]], qk[:, q.shape[1]:], v, rope=tables)

            def ref(q, k, v, tables=(cos.double(), sin.double())):
                return reference.linear_attention(q, k, v, rope=tables)
            check(f"linear rope {str(dtype).replace('torch.', '')} B={B} H={H} N={N} Dk={Dk} Dv={Dv}",
                  fused, ref, [randn(B, H, N, Dk), randn(B, H, N, Dk), randn(B, H, N, Dv)], dtype, failures)
    # depthwise 3x3 conv (+ residual): a block shape taking the vector kernels (C = 64, rows past one
    # strip), and a slice with an odd channel count (the one-channel kernels); weight and bias grads too.
    # Stride 2 with relu (the downsample's conv; its input gradient is the transposed kernel) on odd
    # sizes, 37 rows giving 19 output rows (past one strip). relu input (the downsample's ReLU read inside
    # the conv: x read as relu(x), dx masked by x > 0 as the reversed / transposed kernels store it) at
    # both strides, with silu at stride 1 (its backward recomputes the sum from relu(x)).
    for dtype in dtypes:
        for B, H, W, Ch, sl, stride, relu_in in ((2, 19, 7, 64, False, 1, False), (1, 5, 3, 7, True, 1, False),
                                                 (2, 37, 9, 64, False, 2, False), (1, 6, 5, 7, True, 2, False),
                                                 (2, 19, 7, 64, False, 1, True), (1, 5, 3, 7, True, 1, True),
                                                 (2, 37, 9, 64, False, 2, True), (1, 6, 5, 7, True, 2, True)):
            def dw(x, w, b, sl=sl, stride=stride, relu_in=relu_in, fn=sola_ops.depthwise_conv3x3):
                x = x[..., 1:] if sl else x
                if relu_in:
                    return fn(x, w, b, activation="silu" if stride == 1 else "relu", stride=stride,
                              input_activation="relu")
                if stride == 1:
                    return fn(x, w, b, residual=True)
                return fn(x, w, b, activation="relu", stride=2)
            check(f"dwconv {str(dtype).replace('torch.', '')} B={B} H={H} W={W} C={Ch} /{stride}{' slice' if sl else ''}"
                  f"{' relu-in' if relu_in else ''}",
                  dw, partial(dw, fn=reference.depthwise_conv3x3),
                  [randn(B, H, W, Ch + sl), randn(Ch, 1, 3, 3), randn(Ch)], dtype, failures)
        # an addend (LePE: attention output + conv) read as the output is written: the vector kernel at
        # stride 1 with silu, a slice through the one-channel kernel at stride 2
        for B, H, W, Ch, sl, stride in ((2, 19, 7, 64, False, 1), (1, 6, 5, 7, True, 2)):
            def dw_add(x, w, b, a, sl=sl, stride=stride, fn=sola_ops.depthwise_conv3x3):
                x, a = (x[..., 1:], a[..., 1:]) if sl else (x, a)
                return fn(x, w, b, activation="silu" if stride == 1 else None, stride=stride, addend=a)
            OH, OW = (H + stride - 1) // stride, (W + stride - 1) // stride
            check(f"dwconv addend {str(dtype).replace('torch.', '')} B={B} H={H} W={W} C={Ch} /{stride}"
                  f"{' slice' if sl else ''}", dw_add, partial(dw_add, fn=reference.depthwise_conv3x3),
                  [randn(B, H, W, Ch + sl), randn(Ch, 1, 3, 3), randn(Ch), randn(B, OH, OW, Ch + sl)], dtype, failures)
    # LayerNorm: the register-cached vector kernel (C = 64, 300 rows: teams of 8 threads, several blocks),
    # a slice with an odd width (the scalar kernel), and 1030-wide rows (read per pass, the column kernel
    # for the weight and bias gradients).
    for dtype in dtypes:
        for rows, Ch, sl in ((300, 64, False), (37, 7, True), (40, 1030, False)):
            def ln(x, w, b, sl=sl, fn=sola_ops.layer_norm):
                return fn(x[..., 1:] if sl else x, w, b)
            check(f"layer_norm {str(dtype).replace('torch.', '')} rows={rows} C={Ch}{' slice' if sl else ''}",
                  ln, partial(ln, fn=reference.layer_norm), [randn(rows, Ch + sl), randn(Ch), randn(Ch)], dtype,
                  failures)
    # A CPE and its LayerNorm as one node (depthwise_conv3x3_layer_norm): the norm's backward reads out's
    # gradient as its addend; vector (C = 64) and scalar (C = 7) LayerNorm kernels.
    for dtype in dtypes:
        for Ch in (64, 7):
            def cpe_ln(x, cw, cb, nw, nb):
                out, normed = sola_ops.depthwise_conv3x3_layer_norm(x, cw, cb, nw, nb, residual=True)
                return out + 2 * normed

            def cpe_ln_ref(x, cw, cb, nw, nb):
                out = reference.depthwise_conv3x3(x, cw, cb, residual=True)
                return out + 2 * reference.layer_norm(out, nw, nb)
            check(f"dwconv+layer_norm {str(dtype).replace('torch.', '')} B=2 H=9 W=7 C={Ch}", cpe_ln, cpe_ln_ref,
                  [randn(2, 9, 7, Ch), randn(Ch, 1, 3, 3), randn(Ch), randn(Ch), randn(Ch)], dtype, failures)
    # The SoLA-Vision token mixer as one autograd node (sola_vision.attention_node): LePE's input gradient
    # written with the attention's dv as its addend (depthwise_conv3x3_bwd's dx_addend), both mixers, against
    # the "torch" mixer in fp64; C = 64 (vector dwconv kernels), 2 heads.
    from sola_vision.layers import LinearAttention, SoftmaxAttention
    for dtype in dtypes:
        for cls in (LinearAttention, SoftmaxAttention):
            def mixer_fn(x, w, b, lw, lb, mixer):
                names = ("qk.weight", "qk.bias", "lepe.weight", "lepe.bias")
                return torch.func.functional_call(mixer, dict(zip(names, (w, b, lw, lb))), (x,))
            sola_mixer, torch_mixer = cls(64, 2, attn_impl="sola").to(DEVICE), cls(64, 2, attn_impl="torch")
            check(f"token mixer node {cls.letter} {str(dtype).replace('torch.', '')} B=2 H=9 W=7 C=64",
                  partial(mixer_fn, mixer=sola_mixer), partial(mixer_fn, mixer=torch_mixer),
                  [randn(2, 9, 7, 64), randn(128, 64) * 0.3, randn(128), randn(64, 1, 3, 3), randn(64)], dtype,
                  failures)
    # silu_mul: the model's gate, a channel slice y[..., :C] of a (B, H, W, 2C) tensor read in place (C = 64:
    # the 16-byte vector kernels at row stride 2C), an odd width (C = 7: the element kernels), and rows one
    # element off alignment (y[..., 1:C + 1]: element kernels on a multiple-of-8 width), many rows past
    # one block.
    for dtype in dtypes:
        for B, H, W, Ch, start in ((2, 9, 7, 64, 0), (1, 5, 3, 7, 0), (3, 11, 13, 24, 1)):
            def sm(x, y, Ch=Ch, start=start, fn=sola_ops.silu_mul):
                return fn(x, y[..., start:start + Ch])
            check(f"silu_mul {str(dtype).replace('torch.', '')} B={B} H={H} W={W} C={Ch} gate=y[..., {start}:]",
                  sm, partial(sm, fn=reference.silu_mul), [randn(B, H, W, Ch), randn(B, H, W, 2 * Ch) * 3], dtype,
                  failures)
    # bias_gelu: the MLP's hidden tokens (C = 256: the 16-byte vector kernels, 9 slabs of 64 rows for the
    # bias gradient), an odd width (C = 7: the element kernels, one slab), and rows one element off alignment
    # (x = y[..., 1:C + 1]: element kernels on a multiple-of-8 width, read in place), the tanh approximation
    # on the last two.
    for dtype in dtypes:
        for B, H, W, Ch, start, approx in ((2, 16, 18, 256, None, "none"), (1, 5, 3, 7, None, "tanh"),
                                           (3, 11, 13, 24, 1, "tanh")):
            def bg(x, b, start=start, Ch=Ch, approx=approx, fn=sola_ops.bias_gelu):
                return fn(x if start is None else x[..., start:start + Ch], b, approx)
            check(f"bias_gelu {str(dtype).replace('torch.', '')} B={B} H={H} W={W} C={Ch} {approx}"
                  f"{'' if start is None else f' x=y[..., {start}:]'}",
                  bg, partial(bg, fn=reference.bias_gelu), [randn(B, H, W, Ch + (start or 0)) * 2, randn(Ch)], dtype,
                  failures)
    # The Hopper wgmma forward (opt-in; where the build or the GPU has none this repeats the above).
    os.environ["SOLA_FLASH_WGMMA"] = "1"
    for dtype in (d for d in dtypes if d in (torch.float16, torch.bfloat16)):
        for B, H, Nq, Nk, Dk, Dv in shapes + WGMMA_LONG_KEYS:
            q, k, v = randn(B, H, Nq, Dk), randn(B, H, Nk, Dk), randn(B, H, Nk, Dv)
            check(f"softmax wgmma {str(dtype).replace('torch.', '')} B={B} H={H} Nq={Nq} Nk={Nk} Dk={Dk} Dv={Dv}",
                  sola_ops.softmax_attention, reference.softmax_attention, [q, k, v], dtype, failures)
    del os.environ["SOLA_FLASH_WGMMA"]
    # The staged row tiles with q_norm / k_norm (a third staged input) at head dim 64, 768 heads so
    # blocks walk their tiles, in each variant of the row kernels (SOLA_LINEAR_ROWS: bench/kernels.py's
    # sola_ops_unstaged, sola_ops_presplit); unstaged also plain cases at head dim 32.
    def normed(fn):
        return lambda q, k, v, qn, kn: fn(q, k, v, q_norm=qn, k_norm=kn)
    for dtype in (d for d in dtypes if d in (torch.float16, torch.bfloat16)):
        dt = str(dtype).replace("torch.", "")
        angles = randn(200, 32) * 3
        cos, sin = angles.cos(), angles.sin()
        for variant in ("staged", "unstaged", "staged_presplit"):
            os.environ["SOLA_LINEAR_ROWS"] = variant
            check(f"linear {variant} q_norm/k_norm {dt} B=8 H=96 N=200 D=64", normed(sola_ops.linear_attention),
                  normed(reference.linear_attention), [randn(8, 96, 200, 64) for _ in range(5)], dtype, failures)
            if variant != "staged":  # staged: the RoPE cases above
                check(f"linear {variant} rope {dt} B=8 H=96 N=200 D=64",
                      partial(sola_ops.linear_attention, rope=(cos.to(DEVICE), sin.to(DEVICE))),
                      partial(reference.linear_attention, rope=(cos.double(), sin.double())),
                      [randn(8, 96, 200, 64) for _ in range(3)], dtype, failures)
        os.environ["SOLA_LINEAR_ROWS"] = "unstaged"
        for B, H, N, D in ((2, 2, 77, 32), (8, 96, 200, 32)):
            check(f"linear unstaged {dt} B={B} H={H} N={N} D={D}", sola_ops.linear_attention,
                  reference.linear_attention, [randn(B, H, N, D) for _ in range(3)], dtype, failures)
    os.environ.pop("SOLA_LINEAR_ROWS", None)
    # The products on tf32 (SOLA_LINEAR_MMA=tf32: bench/kernels.py's sola_ops_tf32; by default the
    # forward's token reduction and bf16's row kernels multiply 16-bit operands), both tiles, plain and
    # with RoPE.
    os.environ["SOLA_LINEAR_MMA"] = "tf32"
    for dtype in (d for d in dtypes if d in (torch.float16, torch.bfloat16)):
        dt = str(dtype).replace("torch.", "")
        for D in (32, 64):
            angles = randn(200, D // 2) * 3
            cos, sin = angles.cos(), angles.sin()
            check(f"linear tf32 products {dt} B=2 H=3 N=200 D={D}", sola_ops.linear_attention,
                  reference.linear_attention, [randn(2, 3, 200, D) for _ in range(3)], dtype, failures)
            check(f"linear tf32 products rope {dt} B=2 H=3 N=200 D={D}",
                  partial(sola_ops.linear_attention, rope=(cos.to(DEVICE), sin.to(DEVICE))),
                  partial(reference.linear_attention, rope=(cos.double(), sin.double())),
                  [randn(2, 3, 200, D) for _ in range(3)], dtype, failures)
    os.environ.pop("SOLA_LINEAR_MMA", None)
    for B, H, Nq, Nk, Dk, Dv in HEAD_DIMS_ONLY_SOFTMAX:
        q, k, v = randn(B, H, Nq, Dk), randn(B, H, Nk, Dk), randn(B, H, Nk, Dv)
        check(f"softmax bfloat16 D={Dk}", sola_ops.softmax_attention, reference.softmax_attention, [q, k, v],
              torch.bfloat16, failures)
    print(f"sanitizer_driver: {len(failures)} failure(s) in {time.perf_counter() - t0:.1f} s")
    for f in failures:
        print(f"  {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
