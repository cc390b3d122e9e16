"""torch.library.opcheck over every sola_ops op (CPU): the schema's mutation / aliasing claims, the fake
(meta) implementations against the kernels (shapes, dtypes and strides, which torch.compile and export
rely on), the autograd registration, and AOT dispatch with dynamic shapes."""
import pytest
import torch

import sola_ops  # noqa: F401  (registers the ops)

ops = torch.ops.sola_ops


def randn(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def heads_interleaved(B, H, N, D, grad=False):
    """A (B, H, N, D) view of a (B, N, H, D) tensor, as a model's qkv projection leaves it."""
    return randn(B, N, H, D).transpose(1, 2).requires_grad_(grad)


def rope_tables(N, D):
    angle = torch.randn(N, D // 2)
    return angle.cos(), angle.sin()


def linear_fwd_cases():
    q, k, v = (randn(2, 3, 17, 8, grad=True) for _ in range(3))
    cos, sin = rope_tables(17, 8)
    yield "plain", (q, k, v, None, None, "elu", True, 1e-6)
    yield "norms", (q, k, v, randn(2, 3, 17, 8, grad=True), randn(2, 3, 17, 8, grad=True), "identity", True, 1e-6)
    yield "rope", (q, k, v, None, None, "elu", True, 1e-6, cos, sin)
    yield "unnormalized_relu", (q, k, v, None, None, "relu", False, 0.0)
    yield "views", (heads_interleaved(2, 3, 17, 8, True), heads_interleaved(2, 3, 17, 8, True),
                    heads_interleaved(2, 3, 17, 6, True), None, None, "elu", True, 1e-6)
    yield "bf16", tuple(randn(2, 3, 17, 8, grad=True, dtype=torch.bfloat16) for _ in range(3)) + (
        None, None, "elu", True, 1e-6)


def linear_bwd_cases():
    for name, args in linear_fwd_cases():
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        q, k, v, q_norm, k_norm, feature_map, normalize, eps, *rope = args
        out, state, z = ops.linear_attention_fwd(*args)
        yield name, (torch.randn_like(out), q, k, v, q_norm, k_norm, state, z, feature_map, normalize, eps, *rope)


def softmax_fwd_cases():
    yield "square", (randn(2, 3, 17, 8, grad=True), randn(2, 3, 17, 8, grad=True), randn(2, 3, 17, 8, grad=True),
                     8 ** -0.5)
    yield "cross_dv", (randn(2, 3, 5, 8, grad=True), randn(2, 3, 13, 8, grad=True), randn(2, 3, 13, 6, grad=True),
                       0.3)
    yield "views", (heads_interleaved(2, 3, 17, 8, True), heads_interleaved(2, 3, 17, 8, True),
                    heads_interleaved(2, 3, 17, 8, True), 0.5)
    yield "fp64", tuple(randn(2, 3, 17, 8, grad=True, dtype=torch.float64) for _ in range(3)) + (0.5,)


def softmax_bwd_cases():
    for name, args in softmax_fwd_cases():
        q, k, v, scale = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out, lse = ops.softmax_attention_fwd(q, k, v, scale)
        yield name, (torch.randn_like(out), q, k, v, out, lse, scale)
        yield name + "_grad_lse", (torch.randn_like(out), q, k, v, out, lse, scale, torch.randn_like(lse))


def rope_cases():
    cos, sin = rope_tables(17, 8)
    x = randn(2, 3, 17, 8, grad=True)
    yield "fwd_identity", ops.rope_fwd, (x, cos, sin, "identity", False)
    yield "fwd_features", ops.rope_fwd, (x, cos, sin, "elu", True)
    yield "bwd", ops.rope_bwd, (randn(2, 3, 17, 8), None, x.detach(), cos, sin, "identity")
    yield "bwd_features", ops.rope_bwd, (randn(2, 3, 17, 8), randn(2, 3, 17, 8), x.detach(), cos, sin, "relu")


def dwconv_cases():
    x, w, b = randn(2, 5, 7, 4, grad=True), randn(4, 1, 3, 3, grad=True), randn(4, grad=True)
    yield "fwd_plain", ops.depthwise_conv3x3_fwd, (x, w, b, False)
    yield "fwd_residual", ops.depthwise_conv3x3_fwd, (x, w, None, True)
    yield "fwd_silu_stride2", ops.depthwise_conv3x3_fwd, (x, w, b, False, "silu", 2)
    yield "fwd_relu_input", ops.depthwise_conv3x3_fwd, (x, w, b, False, "none", 1, "relu", randn(2, 5, 7, 4))
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    out = ops.depthwise_conv3x3_fwd(xd, wd, bd, False, "relu")
    yield "bwd_plain", ops.depthwise_conv3x3_bwd, (randn(2, 5, 7, 4), xd, wd, False, True)
    yield "bwd_silu", ops.depthwise_conv3x3_bwd, (randn(2, 5, 7, 4), xd, wd, False, True, bd, "silu")
    yield "bwd_relu_out", ops.depthwise_conv3x3_bwd, (randn(2, 5, 7, 4), xd, wd, False, False, bd, "relu", 1, out)
    yield "bwd_stride2", ops.depthwise_conv3x3_bwd, (randn(2, 3, 4, 4), xd, wd, False, True, None, "none", 2)
    yield "bwd_dx_addend", ops.depthwise_conv3x3_bwd, (randn(2, 5, 7, 4), xd, wd, True, False, None, "none", 1,
                                                       None, "none", randn(2, 5, 7, 4))


def elementwise_cases():
    x, w, b = randn(3, 5, 16, grad=True), randn(16, grad=True), randn(16, grad=True)
    yield "layer_norm_fwd", ops.layer_norm_fwd, (x, w, b, 1e-5)
    yield "layer_norm_fwd_plain", ops.layer_norm_fwd, (x, None, None, 1e-5)
    _, mean, rstd = ops.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    yield "layer_norm_bwd", ops.layer_norm_bwd, (randn(3, 5, 16), x.detach(), w.detach(), mean, rstd, True, True)
    yield "layer_norm_bwd_addend", ops.layer_norm_bwd, (randn(3, 5, 16), x.detach(), None, mean, rstd, False, False,
                                                        randn(3, 5, 16))
    gate = randn(3, 5, 16, grad=True)
    yield "silu_mul_fwd", ops.silu_mul_fwd, (x, gate)
    yield "silu_mul_bwd", ops.silu_mul_bwd, (randn(3, 5, 16), x.detach(), gate.detach())
    yield "bias_gelu_fwd", ops.bias_gelu_fwd, (x, b, "none")
    yield "bias_gelu_fwd_tanh_nobias", ops.bias_gelu_fwd, (x, None, "tanh")
    yield "bias_gelu_bwd", ops.bias_gelu_bwd, (randn(3, 5, 16), x.detach(), b.detach(), "tanh", True)


def all_cases():
    for name, args in linear_fwd_cases():
        yield "linear_fwd_" + name, ops.linear_attention_fwd, args
    for name, args in linear_bwd_cases():
        yield "linear_bwd_" + name, ops.linear_attention_bwd, args
    for name, args in softmax_fwd_cases():
        yield "softmax_fwd_" + name, ops.softmax_attention_fwd, args
    for name, args in softmax_bwd_cases():
        yield "softmax_bwd_" + name, ops.softmax_attention_bwd, args
    for group in (rope_cases, dwconv_cases, elementwise_cases):
        for name, op, args in group():
            yield name, op, args


torch.manual_seed(0)
CASES = list(all_cases())


@pytest.mark.parametrize("op, args", [(op, args) for _, op, args in CASES], ids=[name for name, _, _ in CASES])
def test_opcheck(op, args):
    torch.library.opcheck(op, args)
