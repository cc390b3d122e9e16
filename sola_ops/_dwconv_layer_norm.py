"""depthwise_conv3x3_layer_norm's autograd: a depthwise conv and the LayerNorm of its output as one
autograd node, built from the two ops' kernels (csrc/dwconv, csrc/layer_norm)."""
import torch

from . import reference
from ._ops import ops, run_bwd, with_reference_derivative, without_graph

OP_NAME = "depthwise_conv3x3_layer_norm"  # what a double backward's error (under torch.func) names


class DwconvLayerNorm(torch.autograd.Function):
    """(out, normed) = (depthwise_conv3x3(x, conv_weight, conv_bias, residual), layer_norm(out, ...)).

    A pre-norm block uses out twice, as its residual stream and as the norm's input. Had they been two
    autograd nodes, autograd would sum out's two gradients in a pass of its own (two tensors read, one
    written). As one node the backward gets both: the LayerNorm's backward adds out's own gradient to the
    dx it writes (layer_norm_bwd's addend), and the conv's backward reads that sum."""

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, norm_weight, norm_bias, residual, eps):
        out = without_graph(ops.depthwise_conv3x3_fwd, x, conv_weight, conv_bias, residual)
        normed, mean, rstd = without_graph(ops.layer_norm_fwd, out, norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, conv_weight, out, norm_weight, mean, rstd, conv_bias, norm_bias)
        ctx.residual, ctx.eps = residual, eps
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        return out, normed

    @staticmethod
    def backward(ctx, grad_out, grad_normed):
        # An unused output's gradient is None.
        x, conv_weight, out, norm_weight, mean, rstd, conv_bias, norm_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        # A frozen parameter (no grad wanted) costs the kernels no sums.
        with_norm_weight = norm_weight is not None and need[3]
        with_norm_bias = norm_bias is not None and need[4]
        with_conv_bias = conv_bias is not None and need[2]
        grad, dnorm_weight, dnorm_bias = grad_out, None, None
        if grad_normed is not None:
            grad, dnorm_weight, dnorm_bias = run_bwd(OP_NAME, ops.layer_norm_bwd, grad_normed, out, norm_weight, mean,
                                                     rstd, with_norm_weight, with_norm_bias, grad_out)
        dx = dconv_weight = dconv_bias = None
        if grad is not None and any(need[:3]):  # a frozen conv on an input without grad: no conv backward
            dx, dconv_weight, dconv_bias = run_bwd(OP_NAME, ops.depthwise_conv3x3_bwd, grad, x, conv_weight,
                                                   ctx.residual, with_conv_bias)
        grads = [dx if need[0] else None, dconv_weight if need[1] else None,
                 _param_grad(dconv_bias, with_conv_bias, conv_bias),
                 _param_grad(dnorm_weight, with_norm_weight, norm_weight),
                 _param_grad(dnorm_bias, with_norm_bias, norm_bias)]

        def forward(*inputs):
            return reference.depthwise_conv3x3_layer_norm(*inputs, residual=ctx.residual, eps=ctx.eps)
        grads = with_reference_derivative(grads, forward, (x, conv_weight, conv_bias, norm_weight, norm_bias),
                                          (grad_out, grad_normed), need)
        return (*grads, None, None)


def _param_grad(grad, wanted, param):
    """param's gradient in param's own dtype (fp32 parameters under autocast: no copy), or None."""
    return grad.to(param.dtype) if wanted and grad is not None else None
