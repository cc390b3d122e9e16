"""FLOP formulas of the sola_ops custom ops, registered with torch.utils.flop_counter on import, so
FlopCounterMode counts code that calls them (torch counts custom ops as 0 otherwise).

FLOPs follow torch's convention: 2 per multiply-add of the matmul-like work (elementwise ops are not
counted). Each formula matches what FlopCounterMode counts for the same math in plain PyTorch (the
einsum linear attention, SDPA, a depthwise nn.Conv2d), so code on these ops and on PyTorch's counts alike.
"""
from typing import Sequence

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

from ._ops import ops


def linear_attention_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int],
                           normalize: bool = True, backward: bool = False) -> int:
    """state = phi(k)^T v (2 Nk Dk Dv), out = phi(q) state (2 Nq Dk Dv), normaliser phi(qn) z (2 Nq Dk)
    per (batch, head); the backward costs twice the forward (two matmuls per forward matmul)."""
    B, H, Nq, Dk = q_shape
    Nk, Dv = k_shape[2], v_shape[3]
    fwd = 2 * B * H * (Nk * Dk * Dv + Nq * Dk * Dv + (Nq * Dk if normalize else 0))
    return 2 * fwd if backward else fwd


def softmax_attention_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int],
                            backward: bool = False) -> int:
    """Forward q k^T and P v: 2 B H Nq Nk (Dk + Dv). Backward (recomputing the scores, as torch counts
    SDPA's backward): 2 B H Nq Nk (3 Dk + 2 Dv), i.e. 2.5x the forward for Dk == Dv."""
    B, H, Nq, Dk = q_shape
    Nk, Dv = k_shape[2], v_shape[3]
    if backward:
        return 2 * B * H * Nq * Nk * (3 * Dk + 2 * Dv)
    return 2 * B * H * Nq * Nk * (Dk + Dv)


def depthwise_conv3x3_flops(out_shape: Sequence[int], backward: bool = False) -> int:
    """9 multiply-adds per output element (as torch counts a depthwise conv2d) of the (B, OH, OW, C)
    output; the backward is two such convolutions (input and weight gradients)."""
    B, H, W, C = out_shape
    fwd = 2 * 9 * B * H * W * C
    return 2 * fwd if backward else fwd


# The registered formulas get the ops' arguments as shapes; parameter names follow the schemas in
# csrc/sola.cpp, so positional and keyword calls both bind.

def _linear_attention_fwd(q, k, v, q_norm=None, k_norm=None, feature_map="elu", normalize=True, *args,
                          out_shape=None, **kwargs) -> int:
    return linear_attention_flops(q, k, v, normalize=normalize)


def _linear_attention_bwd(grad_out, q, k, v, q_norm=None, k_norm=None, state=None, z=None, feature_map="elu",
                          normalize=True, *args, out_shape=None, **kwargs) -> int:
    return linear_attention_flops(q, k, v, normalize=normalize, backward=True)


def _softmax_attention_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return softmax_attention_flops(q, k, v)


def _softmax_attention_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return softmax_attention_flops(q, k, v, backward=True)


def _depthwise_conv3x3_fwd(x, *args, out_shape=None, **kwargs) -> int:
    return depthwise_conv3x3_flops(x if out_shape is None else out_shape)  # per output: stride 2 has fewer


def _depthwise_conv3x3_bwd(grad_out, *args, out_shape=None, **kwargs) -> int:
    return depthwise_conv3x3_flops(grad_out, backward=True)


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
