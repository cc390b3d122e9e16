"""depthwise_conv3x3's argument checks, fake (meta) implementations and autograd; the op itself is in
csrc/dwconv (schema in csrc/sola.cpp)."""
import operator

import torch

from . import reference
from ._ops import (_FLOAT_DTYPES, _acc_dtype, check_like_x, ops, register_autograd, register_fake, run_bwd,
                   with_reference_derivative)


ACTIVATIONS = ("none", "silu", "relu")
INPUT_ACTIVATIONS = ("none", "relu")


def check_stride(stride):
    """stride as a Python int: 1 or 2 (any integer type, not a bool or a float)."""
    try:
        value = operator.index(stride)
    except TypeError:
        value = None
    if isinstance(stride, bool) or value not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r} ({type(stride).__name__})")
    return value


def check_activation(activation, residual, stride=1):
    """activation one of ACTIVATIONS, stride 1 or 2 (an int), residual only without either."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'none', 'silu' or 'relu', got {activation!r}")
    stride = check_stride(stride)
    if activation != "none" and residual:
        raise ValueError(f"residual and activation={activation!r} cannot be combined")
    if residual and stride != 1:
        raise ValueError(f"residual needs stride 1 (out = x + conv(x)), got stride {stride}")


def check_input_activation(input_activation, residual):
    """input_activation one of INPUT_ACTIVATIONS; "relu" not with residual (x + conv(relu(x)) would add
    x, not relu(x): neither is a layer of the model, so neither is guessed)."""
    if input_activation not in INPUT_ACTIVATIONS:
        raise ValueError(f"input_activation must be 'none' or 'relu', got {input_activation!r}")
    if input_activation != "none" and residual:
        raise ValueError(f"residual and input_activation={input_activation!r} cannot be combined")


def check_addend(addend, x, stride, activation):
    """addend None, or of the output's shape with x's dtype and device; not with activation "relu"."""
    if addend is None:
        return
    if activation == "relu":
        raise ValueError("addend and activation='relu' cannot be combined (relu's backward masks the gradient "
                         "by the output, which would include the addend)")
    want = output_shape(x, stride)
    if tuple(addend.shape) != want:
        raise ValueError(f"addend must have the output's shape (B, OH, OW, C) = {want}, got {tuple(addend.shape)}")
    if addend.dtype != x.dtype:
        raise ValueError(f"addend must have the dtype of x ({x.dtype}), got {addend.dtype}")
    if addend.device != x.device:
        raise ValueError(f"addend must be on the device of x ({x.device}), got {addend.device}")


def check_dx_addend(dx_addend, x, stride, input_activation):
    """dx_addend None, or of x's shape, dtype and device; stride 1, input_activation "none" (the kernel that
    adds it, the reversed convolution, masks after adding)."""
    if dx_addend is None:
        return
    if stride != 1:
        raise ValueError(f"dx_addend needs stride 1, got stride {stride}")
    if input_activation != "none":
        raise ValueError(f"dx_addend and input_activation={input_activation!r} cannot be combined")
    check_like_x("dx_addend", dx_addend, x)


def output_shape(x, stride):
    B, H, W, C = x.shape
    return (B, (H + stride - 1) // stride, (W + stride - 1) // stride, C)


def check_dwconv_args(x, weight, bias, prefix=""):
    """x (B, H, W, C) float; weight (C, 1, 3, 3) or (C, 3, 3), bias (C,) or None, floating, on x's device.
    prefix: put before "weight" and "bias" in the messages (the fused op's conv_weight, conv_bias)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, H, W, C), channels last, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    C = x.shape[3]
    if tuple(weight.shape) not in ((C, 1, 3, 3), (C, 3, 3)):
        raise ValueError(f"{prefix}weight must be (C, 1, 3, 3) (a depthwise nn.Conv2d's) or (C, 3, 3) with C = {C} "
                         f"channels of x, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"{prefix}bias must be (C,) with C = {C} channels of x, got shape {tuple(bias.shape)}")
    for name, t in ((prefix + "weight", weight), (prefix + "bias", bias)):
        if t is None:
            continue
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


@register_fake("sola_ops::depthwise_conv3x3_fwd")
def _depthwise_conv3x3_fwd_fake(x, weight, bias, residual, activation="none", stride=1, input_activation="none",
                                addend=None):
    check_dwconv_args(x, weight, bias)
    check_activation(activation, residual, stride)
    check_input_activation(input_activation, residual)
    check_addend(addend, x, stride, activation)
    return x.new_empty(output_shape(x, stride))


@register_fake("sola_ops::depthwise_conv3x3_bwd")
def _depthwise_conv3x3_bwd_fake(grad_out, x, weight, residual, with_bias, bias=None, activation="none", stride=1,
                                out=None, input_activation="none", dx_addend=None):
    check_dwconv_args(x, weight, bias)
    check_activation(activation, residual, stride)
    check_input_activation(input_activation, residual)
    if activation == "relu" and out is None:
        raise ValueError("activation='relu' needs out (the forward's result) for its backward")
    check_dx_addend(dx_addend, x, stride, input_activation)
    dbias = x.new_empty((x.shape[3],) if with_bias else (0,), dtype=_acc_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(weight.shape), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, stride, input_activation, addend = inputs
    # bias: the silu backward recomputes conv(x) + bias, and a double backward recomputes the whole op (a
    # parameter: saving it costs no memory); relu: the output's mask (the next layer keeps the output anyway).
    # input_activation="relu": x itself, as always (the backward reads relu(x) from it and masks dx by x > 0).
    ctx.save_for_backward(x, weight, bias, output if activation == "relu" else None)
    ctx.residual, ctx.activation, ctx.stride, ctx.input_activation = residual, activation, stride, input_activation
    ctx.with_addend = addend is not None


def _backward(ctx, grad_out):
    x, weight, bias, out = ctx.saved_tensors
    with_bias = bias is not None
    dx, dweight, dbias = run_bwd("depthwise_conv3x3", ops.depthwise_conv3x3_bwd, grad_out, x, weight, ctx.residual,
                                 with_bias, bias if ctx.activation == "silu" else None, ctx.activation, ctx.stride,
                                 out, ctx.input_activation)
    dbias = dbias.to(bias.dtype) if with_bias else None

    def forward(x, weight, bias):
        return reference.depthwise_conv3x3(x, weight, bias, residual=ctx.residual, activation=ctx.activation,
                                           stride=ctx.stride, input_activation=ctx.input_activation)
    dx, dweight, dbias = with_reference_derivative([dx, dweight, dbias], forward, (x, weight, bias), (grad_out,),
                                                   ctx.needs_input_grad)
    # the addend's gradient is the output's, as an add's is
    return dx, dweight, dbias, None, None, None, None, grad_out if ctx.with_addend else None


register_autograd("depthwise_conv3x3_fwd", _backward, setup_context=_setup_context)
