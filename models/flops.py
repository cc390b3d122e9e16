"""FLOP counting for SoLA-Vision with torch.utils.flop_counter.FlopCounterMode.

FLOPs follow torch's convention: 2 per multiply-add of the matmul-like work (elementwise ops are not
counted). sola_ops registers its custom ops' formulas with FlopCounterMode (sola_ops/_flops.py); they
match what it counts for the same math in plain PyTorch (MLLA's einsum linear attention, SDPA), so
`attn_impl="sola"` and `"torch"` models count alike. The formulas themselves (`linear_attention_flops`,
...) come from sola_ops when it imports.
"""
from typing import Sequence, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["flops", "linear_attention_flops", "softmax_attention_flops", "depthwise_conv3x3_flops"]


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


try:
    from sola_ops._flops import depthwise_conv3x3_flops, linear_attention_flops, softmax_attention_flops
except ImportError:  # no extension: torch-impl models are counted by FlopCounterMode alone
    linear_attention_flops = softmax_attention_flops = depthwise_conv3x3_flops = None
