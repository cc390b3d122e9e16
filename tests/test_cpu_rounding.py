"""The CPU kernels' fp16 / bf16 results are their fp32 results rounded once.

The ops' contract: 16-bit inputs are computed in fp32 and each output is rounded once. A 16-bit input
upcast to fp32 is exact, so the fp32 run of the same kernel on the upcast inputs computes the same fp32
values (given that the compiler contracts both instantiations alike, as GCC does here with its default
-ffp-contract=fast on the AVX-512, AVX2 and baseline builds), and its output rounded to the 16-bit dtype
(torch's round-to-nearest-even) must equal the 16-bit run's bit for bit; fp32 results of a 16-bit run
(LayerNorm's mean / rstd, parameter gradients) must equal the fp32 run's. A conversion that rounds twice
or contracts differently shows up as mismatches in a fraction of the elements: converting to fp16 inside
the LayerNorm loop (GCC, AVX-512) mis-rounded ~1e-4 of the outputs, which every tolerance test passed.
"""
import pytest
import torch

import sola_ops  # noqa: F401  (registers torch.ops.sola_ops)

ops = torch.ops.sola_ops
LOW = [torch.float16, torch.bfloat16]
# (B, H, W, C): 200k elements, enough to catch a rounding slip of 1e-4, with C a multiple of the vectors
# and lanes; and an odd-sized one, whose C = 38 leaves every row a tail (LayerNorm's 16 lanes, 16-wide
# vectors) and W = 31 a partial last strip.
SHAPES = [(2, 56, 56, 32), (1, 30, 31, 38)]


def _inputs(shape, dtype, n, seed, nan):
    """n inputs; with nan, a NaN in every 997th element of the first (it must stay NaN in both runs)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(shape, generator=gen) * 3).to(dtype) for _ in range(n)]
    if nan:
        xs[0].view(-1)[::997] = float("nan")
    return xs


def _params(C, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(C, generator=gen), torch.randn(C, 1, 3, 3, generator=gen)


def _assert_rounded_once(low, high, dtype):
    """low (from 16-bit inputs) == high (from their fp32 upcasts) rounded to dtype; fp32 results equal."""
    for lo, hi in zip(low, high):
        if lo is None or lo.numel() == 0:
            continue
        want = hi.to(dtype) if lo.dtype == dtype else hi
        assert lo.dtype == want.dtype and lo.shape == want.shape
        same = (lo == want) | (lo.isnan() & want.isnan())
        assert bool(same.all()), f"{int((~same).sum())} of {lo.numel()} differ, e.g. {lo[~same][:4]} vs {want[~same][:4]}"


CASES = {
    "silu_mul_fwd": lambda x, g, gate, p: [ops.silu_mul_fwd(x, gate)],
    "silu_mul_bwd": lambda x, g, gate, p: list(ops.silu_mul_bwd(g, x, gate)),
    "bias_gelu_fwd": lambda x, g, gate, p: [ops.bias_gelu_fwd(x, p[0], "none")],
    "bias_gelu_tanh_fwd": lambda x, g, gate, p: [ops.bias_gelu_fwd(x, p[0], "tanh")],
    "bias_gelu_bwd": lambda x, g, gate, p: list(ops.bias_gelu_bwd(g, x, p[0], "none", True)),
    "bias_gelu_tanh_bwd": lambda x, g, gate, p: list(ops.bias_gelu_bwd(g, x, p[0], "tanh", True)),
    "dwconv_fwd": lambda x, g, gate, p: [ops.depthwise_conv3x3_fwd(x, p[1], p[0], False, "none", 1, "none", gate)],
    "dwconv_silu_fwd": lambda x, g, gate, p: [ops.depthwise_conv3x3_fwd(x, p[1], p[0], False, "silu", 1, "none", None)],
    "dwconv_relu_s2_fwd": lambda x, g, gate, p: [ops.depthwise_conv3x3_fwd(x, p[1], p[0], False, "relu", 2, "relu",
                                                                           None)],
    "dwconv_residual_fwd": lambda x, g, gate, p: [ops.depthwise_conv3x3_fwd(x, p[1], None, True, "none", 1, "none",
                                                                            None)],
    # (activation "silu"'s backward keeps g * silu' in x's dtype between its kernels: rounded twice, as torch's)
    "dwconv_bwd": lambda x, g, gate, p: list(ops.depthwise_conv3x3_bwd(g, x, p[1], False, True, None, "none", 1,
                                                                       None, "none", gate)),
    "dwconv_relu_s2_bwd": lambda x, g, gate, p: list(ops.depthwise_conv3x3_bwd(
        g[:, ::2, ::2], x, p[1], False, True, None, "relu", 2,
        ops.depthwise_conv3x3_fwd(x, p[1], p[0], False, "relu", 2, "relu", None), "relu", None)),
    "layer_norm_fwd": lambda x, g, gate, p: list(ops.layer_norm_fwd(x, p[0], p[0].flip(0), 1e-5)),
    "layer_norm_bwd": lambda x, g, gate, p: list(ops.layer_norm_bwd(
        g, x, p[0], *ops.layer_norm_fwd(x, p[0], None, 1e-5)[1:], True, True, gate)),
    # x as (B, H, N, D) = (2, 56, 56, 32): tables (N, D / 2) in fp32
    "rope_fwd": lambda x, g, gate, p: list(ops.rope_fwd(x, *_tables(x), "elu", True)),
    "rope_bwd": lambda x, g, gate, p: [ops.rope_bwd(g, gate, x, *_tables(x), "elu")],
}


def _tables(x):
    angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * torch.linspace(0.01, 1, x.shape[3] // 2)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_16bit_results_are_the_fp32_results_rounded_once(case, dtype, shape):
    # NaN inputs only for the forwards: a backward's parameter gradients sum over every row, so one NaN
    # would make them all NaN and leave nothing to compare
    x, g, gate = _inputs(shape, dtype, 3, seed=len(case), nan=not case.endswith("_bwd"))
    params = _params(shape[-1], seed=1)
    low = CASES[case](x, g, gate, params)
    high = CASES[case](x.float(), g.float(), gate.float(), params)
    if case.endswith("_bwd"):  # finite inputs, finite gradients: every value is compared
        assert all(bool(t.isfinite().all()) for t in high if t is not None)
    _assert_rounded_once(low, high, dtype)


def _with_grads(f, inputs, grad):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = f(*inputs)
    out.backward(grad)
    return [out] + [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("op", ["linear", "linear_rope", "softmax"])
def test_attention_16bit_results_are_the_fp32_results_rounded_once(op, dtype):
    """Linear attention's output and gradients, softmax attention's output. (Softmax's backward takes
    delta = rowsum(dO * O) from the rounded 16-bit output, as FlashAttention's, so its dq / dk are not.)"""
    gen = torch.Generator().manual_seed(3)
    q, k, v, g = [torch.randn(2, 4, 500, 32, generator=gen).to(dtype) for _ in range(4)]
    cos, sin = _tables(q)  # (N, D / 2)
    f = {"linear": sola_ops.linear_attention, "softmax": sola_ops.softmax_attention,
         "linear_rope": lambda q, k, v: sola_ops.linear_attention(q, k, v, rope=(cos, sin))}[op]
    if op == "softmax":
        low, high = [f(q, k, v)], [f(q.float(), k.float(), v.float())]
    else:
        low, high = _with_grads(f, (q, k, v), g), _with_grads(f, (q.float(), k.float(), v.float()), g.float())
    _assert_rounded_once(low, high, dtype)
