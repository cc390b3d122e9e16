"""Loads the compiled extension and gives its ops fake (meta) implementations and autograd.

The schemas live in csrc/sola.cpp; the C++ ops check their arguments in eager mode, the fake
implementations below check the same things so torch.compile reports bad input the same way."""
import functools
import inspect

import torch
from torch.autograd import forward_ad

from . import reference

try:
    from . import _C  # noqa: F401  (registers the sola_ops::* ops)
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sola_ops: the compiled extension sola_ops._C is missing or broken "
        f"({e}). Build it from the repository root with `pip install --no-build-isolation -e .` "
        "(or `make build`), with torch installed first."
    ) from e

ops = torch.ops.sola_ops
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FEATURE_MAPS = ("elu", "relu", "identity")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_like_x(name, t, x):
    """t (an elementwise op's second input, or grad_out) of x's shape (no broadcasting), dtype and device."""
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {list(x.shape)} (no broadcasting), got {list(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def check_channel_param(name, t, x, what="channels"):
    """t a per-channel parameter of x (..., C): (C,), floating, on x's device (any float dtype: used in
    fp32, fp64 for fp64 x). `what` names x's last dim in the message."""
    C = x.shape[-1]
    if tuple(t.shape) != (C,):
        raise ValueError(f"{name} must be (C,) with C = {C} {what} of x, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def _check_tensor(t, name, q):
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dtype != q.dtype:
        raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def register_fake(op_name):
    """torch.library.register_fake for op_name ("sola_ops::..."), then a check that every tensor argument is
    on the device of q (or x): a single meta argument sends an eager call to the fake (the Meta dispatch key)
    even when the others are CPU or CUDA tensors, whose results would be empty tensors on their device. The
    fake's own checks run first, in the order of the C++ ones (dims, dtype, device), so eager and compiled
    calls report bad input alike."""
    def register(fake):
        signature = inspect.signature(fake)

        def checked(*args, **kwargs):
            result = fake(*args, **kwargs)
            tensors = {name: value for name, value in signature.bind(*args, **kwargs).arguments.items()
                       if isinstance(value, torch.Tensor)}
            main = next((name for name in ("q", "x") if name in tensors), next(iter(tensors)))
            for name, t in tensors.items():
                if t.device != tensors[main].device:
                    raise ValueError(f"{name} must be on the device of {main} ({tensors[main].device}), got {t.device}")
            return result

        # _stacklevel 2: torch records the decorated fake's line as where it was registered, not this one
        return torch.library.register_fake(op_name, _stacklevel=2)(functools.wraps(fake)(checked))
    return register


def _heads_interleaved(like):
    """csrc/heads_layout.h's rule: like is (B, N, H, D) in memory (a linear layer's output reshaped and
    transposed), with more than one head and one token; the C++ ops copy a view whose last dim is not
    contiguous (and any empty one) to a contiguous tensor first, so those count as contiguous."""
    return (like is not None and like.dim() == 4 and like.numel() > 0 and like.shape[1] > 1 and like.shape[2] > 1
            and like.stride(1) < like.stride(2) and (like.shape[3] <= 1 or like.stride(3) == 1))


def _new_like_heads(like, shape):
    """A new (B, H, N, D) tensor of like's dtype and device in like's layout (_heads_interleaved): what
    the ops allocate for an output or an input's gradient."""
    B, H, N, D = shape
    if _heads_interleaved(like):
        return like.new_empty((B, N, H, D)).transpose(1, 2)
    return like.new_empty((B, H, N, D))


class _FirstOrderOnly(torch.autograd.Function):
    """A _bwd op run while autograd records (create_graph=True, as torch.func.grad always runs). The
    kernels have no derivative of their own, so the gradients get a node whose backward raises: a
    second-order gradient is an error instead of silent zeros. Outside torch.func the backward functions
    replace this node by the reference's derivative (with_reference_derivative)."""

    generate_vmap_rule = True  # torch.func.vmap over a backward (per-sample gradients)

    @staticmethod
    def forward(name, advice, bwd, *args):
        return bwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name, ctx.advice = inputs[:2]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"double backward of {ctx.name} is not supported under torch.func: its backward kernels "
                           f"have no derivative of their own (torch.autograd with create_graph=True takes it through "
                           f"the PyTorch reference). For higher-order gradients here {ctx.advice}.")


def run_bwd(op_name, bwd, *args, name=None, advice=None):
    """bwd(*args). Grad mode is on inside a backward only with create_graph=True, so a plain backward (and
    the graph torch.compile traces) calls the op directly, at no extra cost. With it, the results get a
    first-order-only node (_FirstOrderOnly), which with_reference_derivative replaces outside torch.func; an
    error from it names sola_ops.<op_name> and its reference, or `name` and `advice`."""
    if torch.is_grad_enabled():
        return _FirstOrderOnly.apply(name or f"sola_ops.{op_name}", advice or f"use sola_ops.reference.{op_name}",
                                     bwd, *args)
    return bwd(*args)


class _ReferenceDerivative(torch.autograd.Function):
    """Its outputs are a backward's kernel gradients (values, no graph of their own); their derivative,
    computed only if a later backward asks for it, is that of the same gradients recomputed through forward
    (the op's sola_ops.reference computation). Inputs: forward, the counts of `inputs` and `grads`, then
    inputs, grads (Nones allowed) and the values."""

    @staticmethod
    def forward(ctx, forward, wanted, n_inputs, n_grads, *tensors):
        ctx.forward, ctx.wanted, ctx.n_inputs = forward, wanted, n_inputs
        ctx.save_for_backward(*tensors[:n_inputs + n_grads])
        ctx.set_materialize_grads(False)
        return tensors[n_inputs + n_grads:]

    @staticmethod
    def backward(ctx, *grad_values):
        saved, n = ctx.saved_tensors, ctx.n_inputs
        needs = ctx.needs_input_grad[4:4 + len(saved)]
        create_graph = torch.is_grad_enabled()  # a third or higher order follows
        with torch.enable_grad():
            # Each saved tensor through a node of its own, whose gradient is the partial derivative for its slot
            # alone (the inputs may depend on each other, k = f(q), and a gradient taken for q itself would count
            # both); the slots link to the tensors' own graphs, so a higher order reaches them too.
            slots = [t.view_as(t) if t is not None and t.requires_grad else t for t in saved]
            outs = ctx.forward(*slots[:n])
            outs = (outs,) if isinstance(outs, torch.Tensor) else outs
            pairs = [(o, g) for o, g in zip(outs, slots[n:]) if g is not None and o.requires_grad]
            firsts = torch.autograd.grad([o for o, _ in pairs], [slots[i] for i in ctx.wanted], [g for _, g in pairs],
                                         create_graph=True, allow_unused=True) if pairs else ()
        terms = [(f, g.to(f.dtype)) for f, g in zip(firsts, grad_values)
                 if f is not None and g is not None and f.requires_grad]
        targets = [i for i, (t, need) in enumerate(zip(slots, needs)) if need and t is not None and t.requires_grad]
        result = [None] * len(saved)
        if terms and targets:
            found = torch.autograd.grad([f for f, _ in terms], [slots[i] for i in targets], [g for _, g in terms],
                                        create_graph=create_graph, allow_unused=True)
            for i, r in zip(targets, found):
                result[i] = None if r is None else r.to(saved[i].dtype)
        return (None, None, None, None, *result, *[None] * len(ctx.wanted))


def with_reference_derivative(kernel_grads, forward, inputs, grads, needs):
    """What a backward returns: kernel_grads (one per input of forward, None where none), and, while autograd
    records the backward (create_graph=True) outside torch.func, each carrying the derivative of the same
    gradient recomputed through forward (the op's sola_ops.reference computation, inputs: the op's saved
    inputs) for the output gradients `grads` (None: unused). So double and higher backward work through
    PyTorch's own derivatives of the reference; the gradients themselves stay bitwise the kernels', and the
    reference runs only when a later backward differentiates them."""
    if not torch.is_grad_enabled() or functorch_active():
        return kernel_grads
    wanted = tuple(i for i, (k, t, n) in enumerate(zip(kernel_grads, inputs, needs)) if k is not None
                   and t is not None and n and t.requires_grad)
    if not wanted:
        return kernel_grads
    values = _ReferenceDerivative.apply(forward, wanted, len(inputs), len(grads), *inputs, *grads,
                                        *(kernel_grads[i].detach() for i in wanted))
    result = list(kernel_grads)
    for i, value in zip(wanted, values):
        result[i] = value
    return result


def functorch_transforms():
    """The names of the torch.func transforms running ("Vmap", "Grad", "Jvp", "Functionalize"); none under
    torch.compile, whose is_compiling() answers first, so dynamo never meets the private queries."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return set()
    return {i.key().name for i in torch._C._functorch.get_interpreter_stack() or ()}


def functorch_active():
    """Whether call() takes the ops' twins: a torch.func transform runs (grad, vjp, jacrev, vmap), and no
    functionalize, which has no rule for an autograd.Function (under it the ops run themselves, as before
    the twins)."""
    transforms = functorch_transforms()
    return bool(transforms) and "Functionalize" not in transforms


class ForwardModeUnsupported(NotImplementedError):
    """Forward-mode AD reached an op (its twin's jvp); the message names the public function `name`."""

    def __init__(self, name):
        super().__init__(f"forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) through sola_ops.{name} "
                         f"is not supported; use reverse mode (grad, vjp, jacrev) or sola_ops.reference.{name}")


def has_forward_tangent(args):
    """Whether an argument is a dual tensor of torch.autograd.forward_ad (a tangent the ops' autograd would
    silently drop: torch.library's register_autograd has no forward mode)."""
    return forward_ad._current_level >= 0 and not torch.compiler.is_compiling() and any(
        isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


# torch.func cannot differentiate an op through torch.library.register_autograd: the autograd.Function
# torch builds from it has no setup_context (pytorch/pytorch#170834). So each op's autograd is also an
# autograd.Function of the same setup_context and backward (its torch.func twin), which call() runs while a
# torch.func transform is active (under vmap the ops inside it run through the batching rules of _vmap.py).
# Plain eager autograd takes a second twin: torch.library's wrapper spends 8-40 us a call in fill_defaults
# (schema.arguments rebuilt per argument: softmax's forward has 4, linear attention's 10), and a Function with a
# setup_context ~10 us in Function.apply binding forward's signature (inspect), so the eager twin is an
# old-style Function whose forward calls setup_context itself. Under torch.compile call() runs the op, which
# it traces as one node with the registered autograd (torch.compile of torch.func.grad over the ops still
# meets torch's Function: eager torch.func only).
_FUNC_TWINS = {}
_EAGER_TWINS = {}


def register_autograd(op_name, backward, setup_context):
    """torch.library.register_autograd for sola_ops::<op_name>, and its twins for call()."""
    torch.library.register_autograd(f"sola_ops::{op_name}", backward, setup_context=setup_context)
    op = getattr(ops, op_name)
    public = op_name.removesuffix("_fwd")

    def jvp(ctx, *tangents):
        raise ForwardModeUnsupported(public)

    _FUNC_TWINS[op_name] = type(f"sola_ops_{op_name}_func", (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(lambda *args: without_graph(op, *args)),  # inside forward autograd records nothing
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })

    def eager_forward(ctx, *args):
        output = without_graph(op, *args)
        setup_context(ctx, args, output)
        return output

    _EAGER_TWINS[op_name] = type(f"sola_ops_{op_name}", (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward),
        "backward": staticmethod(backward),
    })


def call(op_name, *args):
    """ops.<op_name>(*args), differentiable by torch.autograd (in eager mode through the op's eager twin when
    autograd records the call) and, through its torch.func twin, by torch.func."""
    if torch.compiler.is_compiling():
        return getattr(ops, op_name)(*args)
    if functorch_active():
        return _FUNC_TWINS[op_name].apply(*args)
    if has_forward_tangent(args):
        raise ForwardModeUnsupported(op_name.removesuffix("_fwd"))
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return _EAGER_TWINS[op_name].apply(*args)
    return without_graph(getattr(ops, op_name), *args)


def without_graph(op, *args):
    """op(*args). Where autograd records nothing (grad mode off, as inside an autograd.Function's forward, or
    no input requiring grad) the op runs directly below autograd: torch.library's Python autograd wrapper
    would only redispatch it there, at ~3 us a call (inference at small batch is launch-bound). Under
    torch.compile the op itself (dynamo traces no dispatcher guards)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# The CUDA kernels' largest head dim (kMaxCudaHeadDim in csrc/common.h).
MAX_CUDA_HEAD_DIM = int(_C.build_info().get("max_cuda_head_dim", 256))


def check_feature_map(feature_map):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be 'elu', 'relu' or 'identity', got {feature_map!r}")


def check_qkv(q, k, v):
    """The shape rules of both ops (SDPA layout). The C++ ops enforce the same; the public functions
    check here first, so bad input is a ValueError raised from Python on every build and platform."""
    _check_tensor(q, "q", q)
    _check_tensor(k, "k", q)
    _check_tensor(v, "v", q)
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"k and v must have the batch and heads of q {tuple(q.shape)}, got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have the head dim of q ({q.shape[3]}), got {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the sequence length of k ({k.shape[2]}), got {v.shape[2]}")
    if k.shape[2] < 1:
        raise ValueError(f"k must have at least one key (Nk >= 1), got shape {tuple(k.shape)}")
    if q.shape[3] < 1 or v.shape[3] < 1:
        raise ValueError(f"q and v need head dims >= 1, got {q.shape[3]} and {v.shape[3]}")
    if q.device.type == "cuda":
        for name, t in (("q", q), ("v", v)):
            if t.shape[3] > MAX_CUDA_HEAD_DIM:
                raise ValueError(f"{name} head dim {t.shape[3]} exceeds the CUDA kernels' maximum of "
                                 f"{MAX_CUDA_HEAD_DIM}")


def check_linear_args(q, k, v, q_norm, k_norm):
    """check_qkv, and q_norm / k_norm (when given) like q / k."""
    check_qkv(q, k, v)
    for t, name, like in ((q_norm, "q_norm", q), (k_norm, "k_norm", k)):
        if t is not None:
            _check_tensor(t, name, q)
            if t.shape != like.shape:
                raise ValueError(f"{name} must have the shape of {name[0]} {tuple(like.shape)}, got {tuple(t.shape)}")


def check_linear_rope_args(q, k, cos, sin, q_norm=None, k_norm=None):
    """linear_attention's rope tables: both or neither, not with q_norm / k_norm; Nq == Nk, Dk even,
    (N, Dk / 2) each."""
    if (cos is None) != (sin is None):
        raise ValueError("rope_cos and rope_sin must be given together")
    if cos is None:
        return
    if q_norm is not None or k_norm is not None:
        raise ValueError("q_norm and k_norm cannot be combined with rope: the normaliser takes phi(q), phi(k) unrotated")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"rope needs as many queries as keys (one angle table for both), got Nq = {q.shape[2]} "
                         f"and Nk = {k.shape[2]}")
    if q.shape[3] % 2:
        raise ValueError(f"rope needs an even head dim of q and k (channel pairs rotate), got {q.shape[3]}")
    _check_tables(cos, sin, (q.shape[2], q.shape[3] // 2), q, "q", ("rope[0] (cos)", "rope[1] (sin)"))


def _check_tables(cos, sin, want, x, x_name, names):
    for name, t in zip(names, (cos, sin)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be (N, D / 2) = {want} for {x_name} of shape {tuple(x.shape)}, got shape "
                             f"{tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of {x_name} ({x.device}), got {t.device}")


def check_rope_args(x, cos, sin):
    """The shape rules of rope: x (B, H, N, D) with D even, cos and sin (N, D / 2) floating, on x's device."""
    _check_tensor(x, "x", x)
    if x.shape[3] % 2:
        raise ValueError(f"x must have an even head dim (channel pairs rotate), got {x.shape[3]}")
    _check_tables(cos, sin, (x.shape[2], x.shape[3] // 2), x, "x", ("cos", "sin"))


# ---- linear attention ---------------------------------------------------------------------

@register_fake("sola_ops::linear_attention_fwd")
def _linear_attention_fwd_fake(q, k, v, q_norm, k_norm, feature_map, normalize, eps, rope_cos=None, rope_sin=None):
    check_linear_args(q, k, v, q_norm, k_norm)
    check_linear_rope_args(q, k, rope_cos, rope_sin, q_norm, k_norm)
    B, H, Nq, Dk = q.shape
    Dv = v.shape[3]
    acc = _acc_dtype(q.dtype)
    return (_new_like_heads(q, (B, H, Nq, Dv)), q.new_empty((B, H, Dk, Dv), dtype=acc),
            q.new_empty((B, H, Dk), dtype=acc))


@register_fake("sola_ops::linear_attention_bwd")
def _linear_attention_bwd_fake(grad_out, q, k, v, q_norm, k_norm, state, z, feature_map, normalize, eps,
                               rope_cos=None, rope_sin=None):
    check_qkv(q, k, v)
    check_linear_rope_args(q, k, rope_cos, rope_sin, q_norm, k_norm)
    dq_norm = _new_like_heads(q_norm, q.shape) if q_norm is not None else q.new_empty((0,))
    dk_norm = _new_like_heads(k_norm, k.shape) if k_norm is not None else k.new_empty((0,))
    return _new_like_heads(q, q.shape), _new_like_heads(k, k.shape), _new_like_heads(v, v.shape), dq_norm, dk_norm


def _linear_attention_setup_context(ctx, inputs, output):
    q, k, v, q_norm, k_norm, feature_map, normalize, eps, rope_cos, rope_sin = inputs
    _, state, z = output
    ctx.mark_non_differentiable(state, z)  # internal: saved for the backward only
    ctx.set_materialize_grads(False)  # no zero-filled gradients for state and z
    ctx.save_for_backward(q, k, v, q_norm, k_norm, state, z, rope_cos, rope_sin)
    ctx.options = (feature_map, normalize, eps)


def _linear_attention_backward(ctx, grad_out, _grad_state, _grad_z):
    # The rope tables are constants (the public function refuses tables that require grad).
    q, k, v, q_norm, k_norm, state, z, rope_cos, rope_sin = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    dq, dk, dv, dq_norm, dk_norm = run_bwd("linear_attention", ops.linear_attention_bwd,
                                           grad_out, q, k, v, q_norm, k_norm, state, z, *ctx.options,
                                           rope_cos, rope_sin)
    feature_map, normalize, eps = ctx.options
    rope = None if rope_cos is None else (rope_cos, rope_sin)

    def forward(q, k, v, q_norm, k_norm):
        return reference.linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, eps=eps,
                                          q_norm=q_norm, k_norm=k_norm, rope=rope)
    grads = with_reference_derivative(
        [dq, dk, dv, dq_norm if q_norm is not None else None, dk_norm if k_norm is not None else None], forward,
        (q, k, v, q_norm, k_norm), (grad_out,), ctx.needs_input_grad)
    return (*grads, None, None, None, None, None)


register_autograd("linear_attention_fwd", _linear_attention_backward, setup_context=_linear_attention_setup_context)


# ---- softmax attention --------------------------------------------------------------------

@register_fake("sola_ops::softmax_attention_fwd")
def _softmax_attention_fwd_fake(q, k, v, scale):
    check_qkv(q, k, v)
    B, H, Nq, _ = q.shape
    return _new_like_heads(q, (B, H, Nq, v.shape[3])), q.new_empty((B, H, Nq), dtype=_acc_dtype(q.dtype))


@register_fake("sola_ops::softmax_attention_bwd")
def _softmax_attention_bwd_fake(grad_out, q, k, v, out, lse, scale, grad_lse=None):
    check_qkv(q, k, v)
    return tuple(_new_like_heads(t, t.shape) for t in (q, k, v))


def _softmax_attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.set_materialize_grads(False)  # an unused lse's gradient stays None: the kernels skip it, no zeros read
    ctx.scale = scale


def _softmax_attention_backward(ctx, grad_out, grad_lse):
    # lse is differentiable too: d lse_i / d s_ij = P_ij, which the kernels fold into delta.
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = run_bwd("softmax_attention", ops.softmax_attention_bwd, grad_out, q, k, v, out, lse, ctx.scale,
                         grad_lse)

    def forward(q, k, v):
        return reference.softmax_attention(q, k, v, scale=ctx.scale, return_lse=True)
    return (*with_reference_derivative([dq, dk, dv], forward, (q, k, v), (grad_out, grad_lse), ctx.needs_input_grad),
            None)


register_autograd("softmax_attention_fwd", _softmax_attention_backward,
                  setup_context=_softmax_attention_setup_context)


# ---- feature map + rotary embedding --------------------------------------------------------

@register_fake("sola_ops::rope_fwd")
def _rope_fwd_fake(x, cos, sin, feature_map, with_features):
    check_rope_args(x, cos, sin)
    feat = _new_like_heads(x, x.shape) if with_features else x.new_empty((0,))
    return _new_like_heads(x, x.shape), feat


@register_fake("sola_ops::rope_bwd")
def _rope_bwd_fake(grad_rot, grad_feat, x, cos, sin, feature_map):
    check_rope_args(x, cos, sin)
    return _new_like_heads(x, x.shape)


def _rope_setup_context(ctx, inputs, output):
    x, cos, sin, feature_map, with_features = inputs
    ctx.save_for_backward(x, cos, sin)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None rather than zeros
    ctx.feature_map, ctx.with_features = feature_map, with_features


def _rope_backward(ctx, grad_rot, grad_feat):
    # cos and sin are constants (the public function refuses tables that require grad).
    x, cos, sin = ctx.saved_tensors
    if grad_rot is None:
        grad_rot = torch.zeros_like(x)
    grad_feat = grad_feat if ctx.with_features else None
    dx = run_bwd("rope", ops.rope_bwd, grad_rot, grad_feat, x, cos, sin, ctx.feature_map)

    def forward(x):
        return reference.rope(x, cos, sin, feature_map=ctx.feature_map, return_features=True)
    (dx,) = with_reference_derivative([dx], forward, (x,), (grad_rot, grad_feat), ctx.needs_input_grad)
    return dx, None, None, None, None


register_autograd("rope_fwd", _rope_backward, setup_context=_rope_setup_context)
