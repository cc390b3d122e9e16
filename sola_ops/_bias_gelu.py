"""bias_gelu's argument checks, fake (meta) implementations and autograd; the op itself is in
csrc/bias_gelu (schema in csrc/sola.cpp)."""
import torch

from . import reference
from ._ops import (_FLOAT_DTYPES, _acc_dtype, check_channel_param, check_like_x, ops, register_autograd, register_fake,
                   run_bwd, with_reference_derivative)

APPROXIMATIONS = ("none", "tanh")


def check_approximate(approximate):
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def check_bias_gelu_args(x, bias, approximate, grad_out=None):
    """x float16 / bfloat16 / float32 / float64 of rank >= 1; bias (C,) floating on x's device, or None;
    approximate "none" or "tanh"; grad_out of x's shape (no broadcasting), dtype and device."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim, got a 0-dim tensor")
    if bias is not None:
        check_channel_param("bias", bias, x)
    check_approximate(approximate)
    if grad_out is not None:
        check_like_x("grad_out", grad_out, x)


@register_fake("sola_ops::bias_gelu_fwd")
def _bias_gelu_fwd_fake(x, bias, approximate="none"):
    check_bias_gelu_args(x, bias, approximate)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register_fake("sola_ops::bias_gelu_bwd")
def _bias_gelu_bwd_fake(grad_out, x, bias, approximate="none", with_bias=True):
    check_bias_gelu_args(x, bias, approximate, grad_out)
    if with_bias and bias is None:
        raise ValueError("with_bias needs bias (dbias sums the gradient of x + bias)")
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((x.shape[-1] if with_bias else 0,), dtype=_acc_dtype(x.dtype)))


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)  # x + bias and gelu' are recomputed, never stored
    ctx.approximate = approximate


def _backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    # A frozen bias (no grad wanted) costs the kernels no sums.
    with_bias = bias is not None and ctx.needs_input_grad[1]
    dx, dbias = run_bwd("bias_gelu", ops.bias_gelu_bwd, grad_out, x, bias, ctx.approximate, with_bias)
    # dbias in the bias's own dtype (an fp32 parameter under autocast: no copy).
    dbias = dbias.to(bias.dtype) if with_bias else None

    def forward(x, bias):
        return reference.bias_gelu(x, bias, ctx.approximate)
    dx, dbias = with_reference_derivative([dx, dbias], forward, (x, bias), (grad_out,), ctx.needs_input_grad)
    return dx, dbias, None


register_autograd("bias_gelu_fwd", _backward, setup_context=_setup_context)
