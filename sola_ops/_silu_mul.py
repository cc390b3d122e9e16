"""silu_mul's argument checks, fake (meta) implementations and autograd; the op itself is in
csrc/silu_mul (schema in csrc/sola.cpp)."""
import torch

from . import reference
from ._ops import (_FLOAT_DTYPES, check_like_x, ops, register_autograd, register_fake, run_bwd,
                   with_reference_derivative)


def check_silu_mul_args(x, gate, grad_out=None):
    """x float16 / bfloat16 / float32 / float64 of rank >= 1; gate (and grad_out) of x's shape (no
    broadcasting), dtype and device."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim, got a 0-dim tensor")
    check_like_x("gate", gate, x)
    if grad_out is not None:
        check_like_x("grad_out", grad_out, x)


@register_fake("sola_ops::silu_mul_fwd")
def _silu_mul_fwd_fake(x, gate):
    check_silu_mul_args(x, gate)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register_fake("sola_ops::silu_mul_bwd")
def _silu_mul_bwd_fake(grad_out, x, gate):
    check_silu_mul_args(x, gate, grad_out)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    x, gate = inputs
    ctx.save_for_backward(x, gate)  # silu(gate) is recomputed, never stored


def _backward(ctx, grad_out):
    x, gate = ctx.saved_tensors
    dx, dgate = run_bwd("silu_mul", ops.silu_mul_bwd, grad_out, x, gate)
    return tuple(with_reference_derivative([dx, dgate], reference.silu_mul, (x, gate), (grad_out,),
                                           ctx.needs_input_grad))


register_autograd("silu_mul_fwd", _backward, setup_context=_setup_context)
