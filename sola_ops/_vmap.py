"""torch.func.vmap batching rules: one launch for all samples instead of torch's fallback, which runs an op
once per sample. vmap's dim goes
- into B, the first dim, for the attention ops, rope and the depthwise conv's forward, whose work items are
  independent along it;
- in front, as one more leading dim, for the elementwise ops (any rank);
- into C, the channels, for the backward ops that sum rows into per-channel parameter gradients (depthwise
  conv, bias_gelu): each sample's channels become channels of their own, with the parameters repeated, so
  the kernels' sums come out per sample (per-sample gradients) instead of summed over the samples.
layer_norm's backward normalises over C, so its dx runs with vmap's dim in front and the per-sample weight
and bias gradients are summed here from its saved statistics."""
import torch

from ._ops import ops


def _per_sample(op, size, in_dims, args):
    """The fallback's loop: op once per sample, each output stacked along a new dim 0."""
    outs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack(o) for o in zip(*outs))
    return stacked, (0,) * len(stacked)


def _empty_batch(op, in_dims, args):
    """vmap over 0 samples: the op once on one sample of zeros, for its outputs' shapes; each output with 0
    samples in front."""
    outs = op(*(a if d is None else a.new_zeros(a.shape[:d] + a.shape[d + 1:]) for a, d in zip(args, in_dims)))
    if isinstance(outs, torch.Tensor):
        return outs.new_empty((0, *outs.shape)), 0
    return tuple(o.new_empty((0, *o.shape)) for o in outs), (0,) * len(outs)


def _front(t, in_dim, size):
    """t with vmap's dim first (an unbatched t expanded to every sample)."""
    return t.movedim(in_dim, 0) if in_dim is not None else t.expand(size, *t.shape)


def _to_channels(t, size):
    """(size, ..., C) -> (..., size * C): sample s's channels at s * C + c."""
    return t.movedim(0, -2).flatten(-2)


def _from_channels(t, size):
    """(..., size * C) -> (size, ..., C)."""
    return t.unflatten(-1, (size, t.shape[-1] // size)).movedim(-2, 0)


def _param_to_channels(p, in_dim, size):
    """A per-channel parameter (C, ...) as (size * C, ...): each sample's own, or the shared one repeated."""
    if p is None:
        return None
    return p.movedim(in_dim, 0).flatten(0, 1) if in_dim is not None else p.repeat(size, *(1,) * (p.dim() - 1))


def _rule(op, batched, shared=(), into="B", params=()):
    """A vmap rule for op. batched: the indices of the tensor args that carry the samples' data (an unbatched one
    is copied for every sample where vmap's dim goes into B or C); shared: those that are the same for every
    sample (RoPE tables, per-channel parameters): when vmap batches one, the op runs once per sample. into:
    where vmap's dim goes ("B", "front" or "C", as the module says). params: with into="C", the per-channel
    parameter args and the outputs that are their gradients, (args, outputs)."""
    def rule(info, in_dims, *args):
        size = info.batch_size
        if size == 0:
            return _empty_batch(op, in_dims, args)
        in_dims = tuple(in_dims) + (None,) * 16  # trailing defaults are not passed
        if any(in_dims[i] is not None for i in shared if i < len(args)):
            return _per_sample(op, size, in_dims, args)
        args = list(args)
        for i in batched:
            if i < len(args) and args[i] is not None:
                t = _front(args[i], in_dims[i], size)
                args[i] = t.flatten(0, 1) if into == "B" else _to_channels(t, size) if into == "C" else t
        param_args, param_outs = params
        for i in param_args:
            if i < len(args):
                args[i] = _param_to_channels(args[i], in_dims[i], size)
        outs = op(*args)
        single = isinstance(outs, torch.Tensor)
        outs = (outs,) if single else tuple(outs)
        if into == "B":  # (size * B, ...) -> (size, B, ...); an empty placeholder output (0,) -> (size, 0)
            outs = tuple(o.unflatten(0, (size, o.shape[0] // size)) for o in outs)
        elif into == "C":
            outs = tuple(o.unflatten(0, (size, o.shape[0] // size)) if j in param_outs else _from_channels(o, size)
                         for j, o in enumerate(outs))
        return (outs[0], 0) if single else (outs, (0,) * len(outs))
    return rule


def _layer_norm_bwd_rule(info, in_dims, grad_out, x, weight, mean, rstd, with_weight, with_bias, addend=None):
    """dx with vmap's dim in front (weight shared; a batched weight runs per sample); each sample's dweight =
    sum over its rows of grad_out * xhat and dbias = sum of grad_out, in the statistics' dtype."""
    size = info.batch_size
    args = (grad_out, x, weight, mean, rstd, with_weight, with_bias, addend)
    in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    if size == 0:
        return _empty_batch(ops.layer_norm_bwd, in_dims, args)
    if in_dims[2] is not None:
        return _per_sample(ops.layer_norm_bwd, size, in_dims, args)
    grad_out, x, mean, rstd = (_front(t, in_dims[i], size) for t, i in ((grad_out, 0), (x, 1), (mean, 3), (rstd, 4)))
    if addend is not None:
        addend = _front(addend, in_dims[7], size)
    dx, _, _ = ops.layer_norm_bwd(grad_out, x, weight, mean, rstd, False, False, addend)
    C, acc = x.shape[-1], mean.dtype
    g = grad_out.to(acc).reshape(size, -1, C)
    xhat = ((x.to(acc) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(size, -1, C)
    empty = mean.new_empty((size, 0))
    dweight = (g * xhat).sum(1) if with_weight else empty
    dbias = g.sum(1) if with_bias else empty
    return (dx, dweight, dbias), (0, 0, 0)


_RULES = {
    # op: (batched args, shared args, where vmap's dim goes, (parameter args, their gradient outputs))
    "linear_attention_fwd": ((0, 1, 2, 3, 4), (8, 9), "B", ((), ())),
    "linear_attention_bwd": ((0, 1, 2, 3, 4, 5, 6, 7), (11, 12), "B", ((), ())),
    "softmax_attention_fwd": ((0, 1, 2), (), "B", ((), ())),
    "softmax_attention_bwd": ((0, 1, 2, 3, 4, 5, 7), (), "B", ((), ())),
    "rope_fwd": ((0,), (1, 2), "B", ((), ())),
    "rope_bwd": ((0, 1, 2), (3, 4), "B", ((), ())),
    "depthwise_conv3x3_fwd": ((0, 7), (1, 2), "B", ((), ())),
    "depthwise_conv3x3_bwd": ((0, 1, 8, 10), (), "C", ((2, 5), (1, 2))),
    "layer_norm_fwd": ((0,), (1, 2), "front", ((), ())),
    "silu_mul_fwd": ((0, 1), (), "front", ((), ())),
    "silu_mul_bwd": ((0, 1, 2), (), "front", ((), ())),
    "bias_gelu_fwd": ((0,), (1,), "front", ((), ())),
    "bias_gelu_bwd": ((0, 1), (), "C", ((2,), (1,))),
}

for _name, (_batched, _shared, _into, _params) in _RULES.items():
    torch.library.register_vmap(f"sola_ops::{_name}", _rule(getattr(ops, _name), _batched, _shared, _into, _params))
torch.library.register_vmap("sola_ops::layer_norm_bwd", _layer_norm_bwd_rule)
