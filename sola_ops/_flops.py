"""FLOP counts of the sola_ops custom ops, registered with torch.utils.flop_counter on import, so
FlopCounterMode counts code that calls them (it counts custom ops as 0 otherwise).

FLOPs follow torch's convention: 2 per multiply-add of the matmul-like work (elementwise ops are not
counted), and each count is what FlopCounterMode counts for the same math in plain PyTorch: torch's own
SDPA formulas for softmax attention, a depthwise conv2d's 9 multiply-adds per output, and for linear
attention its einsum form's matmuls (sola_vision.linear_attention_flops, tests/test_models.py).
"""
import math

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from ._ops import ops


def _linear_attention(q, k, v, normalize):
    """phi(k)^T v and phi(q) S per (batch, head), plus phi(qn) z with normalize: 2 flops per multiply-add."""
    B, H, Nq, Dk = q
    return 2 * B * H * ((k[2] + Nq) * Dk * v[3] + (Nq * Dk if normalize else 0))


# Parameter names follow the schemas in csrc/sola.cpp, so positional and keyword calls both bind; tensors
# arrive as their shapes. Backward: the linear op's costs twice its forward (two matmuls per matmul).

def _linear_attention_fwd(q, k, v, q_norm=None, k_norm=None, feature_map="elu", normalize=True, *args,
                          out_shape=None, **kwargs) -> int:
    return _linear_attention(q, k, v, normalize)


def _linear_attention_bwd(grad_out, q, k, v, q_norm=None, k_norm=None, state=None, z=None, feature_map="elu",
                          normalize=True, *args, out_shape=None, **kwargs) -> int:
    return 2 * _linear_attention(q, k, v, normalize)


def _softmax_attention_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _softmax_attention_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def _depthwise_conv3x3_fwd(x, *args, out_shape=None, **kwargs) -> int:
    return 2 * 9 * math.prod(x if out_shape is None else out_shape)  # per output: stride 2 has fewer


def _depthwise_conv3x3_bwd(grad_out, *args, out_shape=None, **kwargs) -> int:
    return 2 * 2 * 9 * math.prod(grad_out)  # the input's and the weight's gradients: two such convolutions


def register(op, formula, get_raw=False) -> None:
    """register_flop_formula once (importing twice, or a formula torch adds itself, must not fail)."""
    if op not in flop_registry:
        register_flop_formula(op, get_raw=get_raw)(formula)


for _op, _formula in ((ops.linear_attention_fwd, _linear_attention_fwd),
                      (ops.linear_attention_bwd, _linear_attention_bwd),
                      (ops.softmax_attention_fwd, _softmax_attention_fwd),
                      (ops.softmax_attention_bwd, _softmax_attention_bwd),
                      (ops.depthwise_conv3x3_fwd, _depthwise_conv3x3_fwd),
                      (ops.depthwise_conv3x3_bwd, _depthwise_conv3x3_bwd)):
    register(_op, _formula)
