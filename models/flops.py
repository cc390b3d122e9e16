"""FLOP counting for SoLA-Vision with torch.utils.flop_counter.FlopCounterMode.

FLOPs follow torch's convention: 2 per multiply-add of the matmul-like work (elementwise ops are not
counted). The formulas of the sola_ops custom ops match what FlopCounterMode counts for the same math
in plain PyTorch (MLLA's einsum linear attention, SDPA), so `attn_impl="sola"` and `"torch"` models
count alike (but for torch's depthwise weight gradient, which FlopCounterMode counts as an ungrouped conv's;
this module gives torch's CPU SDPA kernel the formulas of its CUDA ones). sola_ops registers its ops' counts with FlopCounterMode itself (sola_ops/_flops.py); these
formulas need no extension (the placement explorer uses them either way).
"""
from typing import Sequence, Union

import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

__all__ = ["flops", "linear_attention_flops", "softmax_attention_flops", "depthwise_conv3x3_flops"]


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


def flops(model: torch.nn.Module, img_size: Union[int, Sequence[int]] = 224, *, batch_size: int = 1,
          backward: bool = False) -> int:
    """Total FLOPs of one forward (and, with backward=True, the backward to all parameters) of `model`
    on a (batch_size, in_chans, H, W) input, counted by FlopCounterMode on the model's device and dtype.
    The model runs in eval mode; no .grad is written."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    param = next(model.parameters())
    x = torch.randn(batch_size, getattr(model, "in_chans", 3), h, w, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            with torch.set_grad_enabled(backward):
                out = model(x)
                if backward:
                    outs = out if isinstance(out, (list, tuple)) else [out]
                    params = [p for p in model.parameters() if p.requires_grad]
                    torch.autograd.grad(sum(o.float().sum() for o in outs), params, allow_unused=True)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def _cpu_sdpa_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts its CUDA SDPA kernels but not the CPU one F.scaled_dot_product_attention runs (torch 2.14), so
# attn_impl="torch" softmax layers counted 0 on the CPU; the same formulas as the CUDA kernels'.
for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, _cpu_sdpa_fwd),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, _cpu_sdpa_bwd)):
    if _op not in flop_registry:
        register_flop_formula(_op)(_formula)
