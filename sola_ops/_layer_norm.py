"""layer_norm's argument checks, fake (meta) implementations and autograd; the op itself is in
csrc/layer_norm (schema in csrc/sola.cpp)."""
import torch

from . import reference
from ._ops import (_FLOAT_DTYPES, _acc_dtype, check_channel_param, check_like_x, ops, register_autograd, register_fake,
                   run_bwd, with_reference_derivative)


def check_layer_norm_args(x, weight, bias, eps, prefix=""):
    """x (..., C) float with C >= 1; weight, bias (C,) or None, floating, on x's device; eps a finite number >= 0.
    prefix: put before "weight" and "bias" in the messages (the fused op's norm_weight, norm_bias)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last dim of at least 1 (the normalised features), got shape {tuple(x.shape)}")
    for name, t in ((prefix + "weight", weight), (prefix + "bias", bias)):
        if t is not None:
            check_channel_param(name, t, x, "features")
    if not (eps == eps and abs(eps) != float("inf") and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if x.dtype != torch.float64 and eps > torch.finfo(torch.float32).max:
        raise ValueError(f"eps must fit in float32 (the statistics' dtype for {x.dtype} x), got {eps}")


@register_fake("sola_ops::layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps):
    check_layer_norm_args(x, weight, bias, eps)
    stats = x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@register_fake("sola_ops::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, x, weight, mean, rstd, with_weight, with_bias, addend=None):
    check_layer_norm_args(x, weight, None, 0.0)
    if addend is not None:
        check_like_x("addend", addend, x)
    if with_weight and weight is None:
        raise ValueError("with_weight needs weight (dweight sums grad_out * xhat)")
    acc = _acc_dtype(x.dtype)
    C = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((C if with_weight else 0,), dtype=acc), x.new_empty((C if with_bias else 0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)  # internal: saved for the backward only
    ctx.set_materialize_grads(False)  # no zero-filled gradients for them
    ctx.save_for_backward(x, weight, mean, rstd, bias)  # bias (and eps): for a double backward's recomputation
    ctx.eps = eps


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd, bias = ctx.saved_tensors
    if grad_out is None:  # not reached through the public function, whose only output is out
        grad_out = torch.zeros_like(x)
    # A frozen weight or bias (no grad wanted) costs the kernels no sums.
    with_weight = weight is not None and ctx.needs_input_grad[1]
    with_bias = bias is not None and ctx.needs_input_grad[2]
    dx, dweight, dbias = run_bwd("layer_norm", ops.layer_norm_bwd, grad_out, x, weight, mean, rstd, with_weight,
                                 with_bias)
    # The parameters' gradients in their own dtypes (fp32 parameters under autocast: no copy).
    dweight = dweight.to(weight.dtype) if with_weight else None
    dbias = dbias.to(bias.dtype) if with_bias else None

    def forward(x, weight, bias):
        return reference.layer_norm(x, weight, bias, ctx.eps)
    return (*with_reference_derivative([dx, dweight, dbias], forward, (x, weight, bias), (grad_out,),
                                       ctx.needs_input_grad), None)


register_autograd("layer_norm_fwd", _backward, setup_context=_setup_context)
