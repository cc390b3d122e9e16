"""torch.func.vmap batching rules: one launch for all samples instead of torch's fallback, which runs an op
once per sample. The attention ops' and the depthwise conv's work items are independent along their first
dim (B), so vmap's dim is folded into it; the elementwise ops take any rank, so vmap's dim is one more
leading dim. The backward ops that sum over rows into a parameter gradient (depthwise_conv3x3_bwd,
layer_norm_bwd, bias_gelu_bwd) keep the fallback: a fold would sum over the samples too."""
import torch

from ._ops import ops


def _per_sample(op, size, in_dims, args):
    """The fallback's loop: op once per sample, each output stacked along a new dim 0."""
    outs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack(o) for o in zip(*outs))
    return stacked, (0,) * len(stacked)


def _rule(op, batched, shared=(), fold=True):
    """A vmap rule for op. batched: the indices of the tensor args that carry the samples' data (an unbatched
    one is expanded to every sample); shared: per-channel parameters or RoPE tables, the same for every
    sample: when vmap batches one of them, the op runs once per sample. fold: vmap's dim goes into the
    first dim of the batched args and outputs (B, ...), else it is a new leading dim (elementwise ops)."""
    def rule(info, in_dims, *args):
        size = info.batch_size
        if any(i < len(args) and in_dims[i] is not None for i in shared):  # trailing defaults are not passed
            return _per_sample(op, size, in_dims, args)
        args = list(args)
        for i in batched:
            t = args[i] if i < len(args) else None
            if t is None:
                continue
            t = t.movedim(in_dims[i], 0) if in_dims[i] is not None else t.expand(size, *t.shape)
            args[i] = t.flatten(0, 1) if fold else t
        outs = op(*args)
        single = isinstance(outs, torch.Tensor)
        outs = (outs,) if single else tuple(outs)
        if fold:  # (size * B, ...) -> (size, B, ...); an empty placeholder output (0,) -> (size, 0)
            outs = tuple(o.unflatten(0, (size, o.shape[0] // size)) for o in outs)
        return (outs[0], 0) if single else (outs, (0,) * len(outs))
    return rule


_RULES = {
    # op: (batched args, shared args, fold)
    "linear_attention_fwd": ((0, 1, 2, 3, 4), (8, 9), True),
    "linear_attention_bwd": ((0, 1, 2, 3, 4, 5, 6, 7), (11, 12), True),
    "softmax_attention_fwd": ((0, 1, 2), (), True),
    "softmax_attention_bwd": ((0, 1, 2, 3, 4, 5, 7), (), True),
    "rope_fwd": ((0,), (1, 2), True),
    "rope_bwd": ((0, 1, 2), (3, 4), True),
    "depthwise_conv3x3_fwd": ((0, 7), (1, 2), True),
    "layer_norm_fwd": ((0,), (1, 2), False),
    "silu_mul_fwd": ((0, 1), (), False),
    "silu_mul_bwd": ((0, 1, 2), (), False),
    "bias_gelu_fwd": ((0,), (1,), False),
}

for _name, (_batched, _shared, _fold) in _RULES.items():
    _op = getattr(ops, _name)
    torch.library.register_vmap(f"sola_ops::{_name}", _rule(_op, _batched, _shared, _fold))
