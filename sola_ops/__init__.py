"""sola_ops: CUDA and C++ kernels for non-causal linear attention and flash-style softmax attention.

    out = sola_ops.linear_attention(q, k, v)            # q, k, v: (B, H, N, D)
    out = sola_ops.softmax_attention(q, k, v)
    out, lse = sola_ops.softmax_attention(q, k, v, return_lse=True)
    rot = sola_ops.rope(x, cos, sin)                     # rotary embedding, x: (B, H, N, D)
    y = sola_ops.depthwise_conv3x3(x, weight, bias)      # channels-last tokens, x: (B, H, W, C)
    y = sola_ops.layer_norm(x, weight, bias)              # over the last dim, output in x's dtype
    y, n = sola_ops.depthwise_conv3x3_layer_norm(x, cw, cb, nw, nb, residual=True)  # a CPE and its norm
    y = sola_ops.silu_mul(x, gate)                        # x * silu(gate), fused, forward and backward
    y = sola_ops.bias_gelu(x, bias)                       # gelu(x + bias), fused, with the bias gradient
"""

import contextlib
import math

import torch

from . import reference
from ._ops import FEATURE_MAPS  # noqa: F401  (sola_ops.FEATURE_MAPS: the names feature_map takes)
from ._dwconv import check_activation, check_addend, check_dwconv_args, check_input_activation, check_stride
from ._bias_gelu import check_approximate, check_bias_gelu_args
from ._layer_norm import check_layer_norm_args
from ._dwconv_layer_norm import DwconvLayerNorm
from . import _flops  # noqa: F401  (registers the ops' FLOP formulas with FlopCounterMode)
from . import _vmap  # noqa: F401  (registers the ops' torch.func.vmap batching rules)
from ._silu_mul import check_silu_mul_args
from ._ops import (_C, ForwardModeUnsupported, call, check_feature_map, check_linear_args, check_linear_rope_args,
                   check_qkv, check_rope_args, functorch_transforms, has_forward_tangent)

__all__ = ["linear_attention", "softmax_attention", "rope", "depthwise_conv3x3", "layer_norm",
           "depthwise_conv3x3_layer_norm", "silu_mul", "bias_gelu", "reference", "build_info", "debug_nan_fill"]
__version__ = "0.1.0"


def linear_attention(q, k, v, *, feature_map="elu", normalize=True, eps=1e-6, q_norm=None, k_norm=None,
                     rope=None):
    """Non-causal linear attention in the mean form, with phi the feature map applied in-kernel:

        S = mean_j phi(k_j) v_j^T,  z = mean_j phi(kn_j)   (kn = k_norm if given else k)
        out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps)      (qn = q_norm if given else q)
        normalize=False: out_i = phi(q_i)^T S

    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv) -> (B, H, Nq, Dv). feature_map is
    "elu" (elu(x) + 1), "relu" or "identity". State and sums are fp32 (fp64 for fp64 inputs).
    Under torch.autocast the inputs are cast as for SDPA. Double backward goes through the reference's derivatives.

    rope=(cos, sin), each (N, Dk / 2) with N = Nq = Nk and Dk even: rotary position embedding fused
    into the kernels, as MLLA / SoLA-Vision use it. The numerator takes phi(q_i), phi(k_j) with their
    channel pairs (2p, 2p + 1) rotated by row i's / j's angles (as `sola_ops.rope` rotates), the
    normaliser takes them unrotated; the same as

        linear_attention(rope(q, cos, sin, feature_map=fm), rope(k, cos, sin, feature_map=fm), v,
                         feature_map="identity", q_norm=phi(q), k_norm=phi(k))

    without the four intermediate tensors (on the CPU, and for fp16 / bf16 on sm_80+ GPUs with Dk, Dv <= 128;
    elsewhere the op runs those rope kernels itself). Not combined with q_norm / k_norm. The angles are
    constants: cos and sin get no gradient.
    """
    _check_tensors(q=q, k=k, v=v)
    _check_tensors(optional=True, q_norm=q_norm, k_norm=k_norm)
    eps = _as_float(eps, "eps")
    if not (_finite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    check_feature_map(feature_map)
    normalize = _as_bool(normalize, "normalize")
    if not normalize and (q_norm is not None or k_norm is not None):
        raise ValueError("q_norm and k_norm are only used with normalize=True")
    rope_cos, rope_sin = _rope_tables(rope)
    q, k, v, q_norm, k_norm = _autocast(q, k, v, q_norm, k_norm)
    check_linear_args(q, k, v, q_norm, k_norm)
    _check_fits_accumulation(eps, "eps", q)
    check_linear_rope_args(q, k, rope_cos, rope_sin, q_norm, k_norm)
    out, _, _ = call("linear_attention_fwd", q, k, v, q_norm, k_norm, feature_map, normalize, eps, rope_cos, rope_sin)
    return out


def _rope_tables(rope):
    """linear_attention's rope argument as (cos, sin), or (None, None)."""
    if rope is None:
        return None, None
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError(f"rope must be a (cos, sin) pair of tensors or None, got {type(rope).__name__}")
    cos, sin = rope
    _check_tensors(**{"rope[0] (cos)": cos, "rope[1] (sin)": sin})
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope's cos and sin require grad, but linear_attention takes them as constants and would "
                         "not differentiate them; pass detached tables (or use sola_ops.reference.linear_attention)")
    return cos, sin


def softmax_attention(q, k, v, *, scale=None, return_lse=False):
    """Non-causal softmax attention, out = softmax(scale * q k^T) v, tiled with an online softmax.

    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv) -> (B, H, Nq, Dv). scale defaults to
    1/sqrt(Dk); 0.0 is a valid scale. With return_lse=True also returns the row log-sum-exp of
    the scaled scores, (B, H, Nq), fp32 (fp64 for fp64 inputs). Under torch.autocast the inputs
    are cast as for SDPA. Double backward goes through the reference's derivatives.
    """
    _check_tensors(q=q, k=k, v=v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() == 4 and q.shape[-1] > 0 else 1.0
    scale = _as_float(scale, "scale")
    if not _finite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return_lse = _as_bool(return_lse, "return_lse")
    q, k, v = _autocast(q, k, v)
    check_qkv(q, k, v)
    _check_fits_accumulation(scale, "scale", q)
    out, lse = call("softmax_attention_fwd", q, k, v, scale)
    return (out, lse) if return_lse else out


def rope(x, cos, sin, *, feature_map="identity", return_features=False):
    """Rotary position embedding of phi(x), with the feature map fused into the same pass:

        f = phi(x),  rot[..., 2p]     = f[2p] cos[n, p] - f[2p+1] sin[n, p]
                     rot[..., 2p + 1] = f[2p] sin[n, p] + f[2p+1] cos[n, p]

    x (B, H, N, D), D even (any strides with the last dim contiguous); cos, sin (N, D / 2) of any
    float dtype, used in fp32 (fp64 for fp64 x). Returns rot (B, H, N, D) in x's dtype, or with
    return_features=True (rot, phi(x)): SoLA-Vision's linear layers rotate phi(q), phi(k) in the
    numerator and take them unrotated in the normaliser (linear_attention's q_norm / k_norm).
    feature_map as linear_attention's ("identity" by default). The angles are constants: cos and
    sin get no gradient. Double backward goes through the reference's derivatives.
    """
    _check_tensors(x=x, cos=cos, sin=sin)
    check_feature_map(feature_map)
    return_features = _as_bool(return_features, "return_features")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos and sin require grad, but rope takes them as constants and would not "
                         "differentiate them; pass detached tables (or use sola_ops.reference.rope)")
    check_rope_args(x, cos, sin)
    rot, feat = call("rope_fwd", x, cos, sin, feature_map, return_features)
    return (rot, feat) if return_features else rot


def depthwise_conv3x3(x, weight, bias=None, *, residual=False, activation=None, stride=1, input_activation=None,
                      addend=None):
    """Depthwise 3x3 convolution of channels-last tokens x (B, H, W, C): zero padding 1, stride 1 or 2,
    one 3x3 filter per channel. The same as nn.Conv2d(C, C, 3, stride, padding=1, groups=C) applied to
    x.permute(0, 3, 1, 2) and permuted back (its weight (C, 1, 3, 3) and bias (C,) go in as they are),
    without layout copies or a cuDNN weight-gradient kernel. residual=True returns x + conv(x) (a
    conditional position encoding) from the same pass (stride 1 only). activation="silu" / "relu"
    returns silu / relu of conv(x) + bias (SoLA-Vision's in-block conv and its activation, its
    downsample's stride-2 conv and its ReLU); silu's backward recomputes the sum from x rather than
    keeping it, relu's masks the gradient with the output. Neither combines with residual.
    input_activation="relu" convolves relu(x) instead of x (SoLA-Vision's downsample: expand conv ->
    ReLU -> this conv), without writing relu(x): the backward reads relu(x) from x for the weight
    gradient and writes dx masked as torch.relu's backward masks it (the gradient where x > 0, else 0;
    a NaN x passes it). Any stride and activation; not with residual.
    addend (the output's shape and x's dtype) is added to the result as it is written: addend + conv(x)
    in one pass (SoLA-Vision's attention output plus its LePE conv), the sum rounded once; its gradient
    is the output's. Any stride, residual or input activation; not with activation="relu" (whose
    backward masks by the output).

    x: any strides with the last dim contiguous (others are copied); float16, bfloat16, float32 or
    float64, on CPU or CUDA. weight, bias: any float dtype, used in fp32 (fp64 for fp64 x); their
    gradients come back in their own dtypes. Returns (B, ceil(H / stride), ceil(W / stride), C) in x's
    dtype (under autocast, the autocast dtype, as for conv2d). Backward is deterministic (bitwise equal
    across runs). Double backward goes through the reference's derivatives.
    """
    _check_tensors(x=x, weight=weight)
    _check_tensors(optional=True, bias=bias, addend=addend)
    x, addend = _autocast(x, addend)
    check_dwconv_args(x, weight, bias)
    activation = "none" if activation is None else activation
    stride = check_stride(stride)
    residual = _as_bool(residual, "residual")
    check_activation(activation, residual, stride)
    input_activation = "none" if input_activation is None else input_activation
    check_input_activation(input_activation, residual)
    check_addend(addend, x, stride, activation)
    return call("depthwise_conv3x3_fwd", x, weight, bias, residual, activation, stride, input_activation, addend)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dim of x (..., C): F.layer_norm(x, (C,), weight, bias, eps), statistics,
    weight and bias in fp32 (fp64 for fp64 x), the output in x's dtype. Under autocast torch runs
    layer_norm in fp32 and returns fp32 (each consumer then casts it back); this op keeps x's dtype, as
    a fused LayerNorm does: a bf16 x is read once and written once, and so is its gradient.

    x: float16, bfloat16, float32 or float64, any shape with a last dim >= 1 (non-contiguous x is
    copied), on CPU or CUDA. weight, bias: (C,) of any float dtype, or None; their gradients come back in
    their own dtypes. Backward is deterministic (bitwise equal across runs). Double backward goes through
    the reference's derivatives. A row whose squared deviations overflow the fp32 statistics comes out NaN.
    """
    _check_tensors(x=x)
    _check_tensors(optional=True, weight=weight, bias=bias)
    eps = _as_float(eps, "eps")
    check_layer_norm_args(x, weight, bias, eps)
    return call("layer_norm_fwd", x, weight, bias, eps)[0]


def depthwise_conv3x3_layer_norm(x, conv_weight, conv_bias=None, norm_weight=None, norm_bias=None, *,
                                 residual=False, eps=1e-5):
    """(out, normed) with out = depthwise_conv3x3(x, conv_weight, conv_bias, residual=residual) and
    normed = layer_norm(out, norm_weight, norm_bias, eps): the same kernels as the two calls, and the same
    results forward, as one autograd node. A pre-norm block keeps out as its residual stream and normalises
    it (SoLA-Vision's CPE, then the norm of the branch after it); with two ops autograd would sum out's two
    gradients in a pass of its own (two tensors read, one written). Here the LayerNorm's backward adds out's
    gradient to the input gradient it writes (in fp32, fp64 for fp64 x, rounded once; the two calls round
    the norm's part first, so low-precision gradients may differ from theirs in the last bit), and the
    conv's backward reads that sum.

    x, conv_weight, conv_bias, residual: as depthwise_conv3x3's (stride 1, no activation; autocast casts x
    as it does there). norm_weight, norm_bias, eps: as layer_norm's weight, bias and eps, over out's C
    channels. Backward is deterministic (bitwise equal across runs). Double backward goes through the
    reference's derivatives.
    """
    _check_tensors(x=x, conv_weight=conv_weight)
    _check_tensors(optional=True, conv_bias=conv_bias, norm_weight=norm_weight, norm_bias=norm_bias)
    (x,) = _autocast(x)
    check_dwconv_args(x, conv_weight, conv_bias, prefix="conv_")
    residual = _as_bool(residual, "residual")
    eps = _as_float(eps, "eps")
    check_layer_norm_args(x, norm_weight, norm_bias, eps, prefix="norm_")
    if has_forward_tangent((x, conv_weight, conv_bias, norm_weight, norm_bias)):
        raise ForwardModeUnsupported("depthwise_conv3x3_layer_norm")
    if functorch_transforms():  # DwconvLayerNorm has no torch.func rules (functionalize included): the two ops
        try:
            out = call("depthwise_conv3x3_fwd", x, conv_weight, conv_bias, residual, "none", 1, "none", None)
            return out, call("layer_norm_fwd", out, norm_weight, norm_bias, eps)[0]
        except ForwardModeUnsupported:  # named as the function called, not the op inside it
            raise ForwardModeUnsupported("depthwise_conv3x3_layer_norm") from None
    tensors = _distinct(x, conv_weight, conv_bias, norm_weight, norm_bias)
    return DwconvLayerNorm.apply(*tensors, residual, eps)


def _distinct(*tensors):
    """tensors, each one passed again replaced by a view of itself: torch.compile refuses an autograd.Function
    given one tensor twice (e.g. one parameter as two biases); a view is a tensor of its own, and autograd
    sums the gradients of the two uses into the one tensor as it would."""
    out = []
    for t in tensors:
        out.append(t.view_as(t) if t is not None and any(t is u for u in out) else t)
    return out


def silu_mul(x, gate):
    """x * F.silu(gate) in one pass: SoLA-Vision's gated output, out_proj(y * SiLU(gate)). The forward
    reads x and gate and writes the output, the backward reads the gradient, x and gate and writes dx and
    dgate; silu(gate) is never stored (eagerly: 13 tensor passes, fused: 8). Computed in fp32 (fp64 for
    fp64 inputs) with torch's silu and silu_backward formulas and rounded once; NaN / inf give what
    torch gives (silu(-inf) is NaN, silu'(+-inf) NaN).

    x, gate: the same shape (any rank >= 1, no broadcasting) and dtype (float16, bfloat16, float32 or
    float64), on CPU or CUDA. Each is read in place when its last dim is contiguous and its leading dims
    collapse to one row stride (a channel slice y[..., :C] of a (..., 2C) tensor), else copied. Returns a
    contiguous tensor of x's shape and dtype. Under torch.autocast float16 / bfloat16 / float32 inputs are
    cast to the autocast dtype first, as for SDPA, linear_attention and depthwise_conv3x3 (float64 stays),
    so the output comes in the autocast dtype; torch's own x * F.silu(gate) would promote a mixed pair to
    the wider dtype instead. Double backward goes through the reference's derivatives.
    """
    _check_tensors(x=x, gate=gate)
    x, gate = _autocast(x, gate)
    check_silu_mul_args(x, gate)
    return call("silu_mul_fwd", x, gate)


def bias_gelu(x, bias=None, approximate="none"):
    """F.gelu(x + bias, approximate=approximate) in one pass each way: SoLA-Vision's MLP calls
    bias_gelu(F.linear(y, fc1.weight), fc1.bias), so fc1's bias add costs no pass of its own, and the
    backward writes dx = grad * gelu'(x + bias) and sums it over all rows into the bias gradient in the same
    pass (no separate reduction re-reading the 4C-wide gradient). Computed in fp32 (fp64 for fp64 x) with
    torch's gelu and gelu_backward formulas ("none": erf, "tanh": torch's tanh approximation) and rounded
    once; NaN / inf give what torch's gelu formula gives on x + bias: gelu(+inf) = +inf (as torch's fp64 and
    scalar paths; its vectorised fp32 CPU path gives NaN), gelu(-inf) NaN, gelu'(+-inf) NaN.

    x: any rank >= 1, (..., C), float16, bfloat16, float32 or float64, on CPU or CUDA; read in place when its
    last dim is contiguous and its leading dims collapse to one row stride (a channel slice), else copied.
    bias: (C,) of any float dtype, used in fp32 (fp64 for fp64 x), or None (plain GELU). Returns a contiguous
    tensor of x's shape and dtype. Under torch.autocast x is cast to the autocast dtype first, as for SDPA
    (float64 stays); the bias is read as it is, in fp32, as layer_norm's weight. The bias gradient is the
    column sum of the fp32 (fp64) dx values before their rounding, summed in a fixed order (bitwise
    reproducible), and comes back in the bias's own dtype. Double backward goes through the reference's derivatives.
    """
    _check_tensors(x=x)
    _check_tensors(optional=True, bias=bias)
    check_approximate(approximate)
    (x,) = _autocast(x)
    check_bias_gelu_args(x, bias, approximate)
    return call("bias_gelu_fwd", x, bias, approximate)


def _check_tensors(optional=False, **tensors):
    """Non-tensors and sparse / quantized / nested tensors would fail deep in the schema or the
    dispatcher, with a message that names neither the argument nor what is wrong."""
    for name, t in tensors.items():
        if t is None and optional:
            continue
        if not isinstance(t, torch.Tensor):
            expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
            raise TypeError(f"{name} must be {expected}, got {type(t).__name__}")
        if t.is_nested or t.is_quantized or t.layout != torch.strided:
            kind = "nested" if t.is_nested else "quantized" if t.is_quantized else str(t.layout)
            raise ValueError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")


def _check_fits_accumulation(value, name, q):
    """value (eps, scale) within half fp32's range but for fp64 q: the kernels compute in fp32, where past it
    they would meet inf (linear attention all 0, softmax NaN; the tensor-core kernels take scale * log2(e))."""
    if q.dtype != torch.float64 and abs(value) > torch.finfo(torch.float32).max / 2:
        raise ValueError(f"{name} must be at most 1.7e38 in magnitude for {q.dtype} inputs (the kernels compute "
                         f"in float32), got {value}")


def _finite(x):
    """math.isfinite, in comparisons that torch.compile can trace on a symbolic float (the default scale
    of a dynamic head dim, a float argument that changes between calls)."""
    return x == x and abs(x) != math.inf


def _as_float(x, name):
    """float(x), with errors that name the argument (float()'s own say neither which nor why)."""
    if isinstance(x, torch.Tensor) and x.requires_grad:
        # float() would drop its gradient without a word (a learned temperature, as Swin v2's).
        raise ValueError(f"{name} is a tensor that requires grad; the kernels take it as a number and "
                         f"would not differentiate it" + (": scale q by it instead, e.g. "
                         "softmax_attention(q * scale, k, v, scale=1.0)" if name == "scale" else ""))
    if isinstance(x, (str, bytes)):  # float() would parse "0.1"
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float (a 64-bit double)") from None
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}") from None


def _as_bool(x, name):
    """x as a bool: True / False (or a numpy bool, or the ints 0 and 1). bool() would take any object, and a
    string such as "no" or "False" as True."""
    numpy_bool = type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_")
    if isinstance(x, bool) or numpy_bool or (isinstance(x, int) and x in (0, 1)):
        return bool(x)
    raise TypeError(f"{name} must be True or False, got {x!r} ({type(x).__name__})")


_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The device types with kernels here. Others (meta under FlopCounterMode) never autocast: asking
# torch.is_autocast_enabled about a type without autocast raises, and torch.amp.is_autocast_available
# would say so but breaks torch.compile(fullgraph=True) on torch 2.11 (Dynamo cannot trace it).
_KERNEL_DEVICE_TYPES = ("cpu", "cuda")


def _autocast(q, *tensors):
    """What autocast does to torch SDPA (a lower-precision op): float16/bfloat16/float32 inputs go to
    the autocast dtype of their device type, float64 stays. All inputs must share q's device anyway,
    so one look at q's decides (the common case, autocast off, costs one call)."""
    device = q.device.type
    if device not in _KERNEL_DEVICE_TYPES or not torch.is_autocast_enabled(device):
        return (q, *tensors)
    dtype = torch.get_autocast_dtype(device)
    given = [t for t in (q, *tensors) if t is not None]
    if any(t.dtype == torch.float64 for t in given) and any(t.dtype in _AUTOCAST_DTYPES and t.dtype != dtype
                                                            for t in given):
        # else the dtype check would name the dtype autocast cast one to, which the caller never passed
        raise ValueError(f"under torch.autocast float64 inputs stay float64 and float16/bfloat16/float32 ones go to "
                         f"{dtype}, so they cannot be mixed: got {', '.join(str(t.dtype) for t in given)}")
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_DTYPES else t for t in (q, *tensors))


def build_info():
    """Which backends were compiled in: {"cpu": True, "cuda": bool, "cuda_archs": [...], ...}."""
    return dict(_C.build_info())


@contextlib.contextmanager
def debug_nan_fill(enabled=True):
    """Pre-fill every kernel output with NaN so an element a kernel forgets to write shows up."""
    before = _C.debug_nan_fill()
    _C.set_debug_nan_fill(enabled)
    try:
        yield
    finally:
        _C.set_debug_nan_fill(before)
