"""Registers FLOP formulas of the sola_ops custom ops with torch.utils.flop_counter, so FlopCounterMode
counts models that use them. Imported by flops.py only when the sola_ops extension is importable."""
import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

import sola_ops  # noqa: F401  (loads torch.ops.sola_ops.*)

from .flops import depthwise_conv3x3_flops, linear_attention_flops, softmax_attention_flops

_ops = torch.ops.sola_ops

# Parameter names follow the schemas in csrc/sola.cpp, so positional and keyword calls both bind.


def linear_attention_fwd_flop(q, k, v, q_norm=None, k_norm=None, feature_map="elu", normalize=True, eps=1e-6,
                              *args, out_shape=None, **kwargs) -> int:
    return linear_attention_flops(q, k, v, normalize=normalize)


def linear_attention_bwd_flop(grad_out, q, k, v, q_norm=None, k_norm=None, state=None, z=None, feature_map="elu",
                              normalize=True, eps=1e-6, *args, out_shape=None, **kwargs) -> int:
    return linear_attention_flops(q, k, v, normalize=normalize, backward=True)


def softmax_attention_fwd_flop(q, k, v, scale=None, *args, out_shape=None, **kwargs) -> int:
    return softmax_attention_flops(q, k, v)


def softmax_attention_bwd_flop(grad_out, q, k, v, out=None, lse=None, scale=None, *args, out_shape=None,
                               **kwargs) -> int:
    return softmax_attention_flops(q, k, v, backward=True)


def depthwise_conv3x3_fwd_flop(x, weight=None, bias=None, residual=False, *args, out_shape=None, **kwargs) -> int:
    return depthwise_conv3x3_flops(x if out_shape is None else out_shape)  # per output: stride 2 has fewer


def depthwise_conv3x3_bwd_flop(grad_out, x=None, weight=None, residual=False, with_bias=False, *args, out_shape=None,
                               **kwargs) -> int:
    return depthwise_conv3x3_flops(grad_out, backward=True)


def _register(op, formula, get_raw=False) -> None:
    if op not in flop_registry:  # importing twice (or sola_ops registering its own) must not fail
        register_flop_formula(op, get_raw=get_raw)(formula)


_register(_ops.linear_attention_fwd, linear_attention_fwd_flop)
_register(_ops.linear_attention_bwd, linear_attention_bwd_flop)
_register(_ops.softmax_attention_fwd, softmax_attention_fwd_flop)
_register(_ops.softmax_attention_bwd, softmax_attention_bwd_flop)
_register(_ops.depthwise_conv3x3_fwd, depthwise_conv3x3_fwd_flop)
_register(_ops.depthwise_conv3x3_bwd, depthwise_conv3x3_bwd_flop)
# The token mixer's backward (attention_node.py) accumulates its GEMMs in place (addmm_), which torch's
# registry leaves uncounted; addmm's formula (already shape-wrapped) counts it.
_register(torch.ops.aten.addmm_, flop_registry[torch.ops.aten.addmm], get_raw=True)
