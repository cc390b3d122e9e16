"""FLOP accounting of the placement explorer (sola_vision.explore): each pattern's model, its forward FLOPs
and the share of them in the softmax-attention ops, counted or from the per-block formulas."""
import argparse
import contextlib
from typing import Dict, List, Tuple

import timm
import torch

from . import placement as P
from .explore_report import Result
from .flops import flops as model_flops
from .flops import linear_attention_flops, softmax_attention_flops
from .layers import sola_ops
from .sola_vision import SoLAVision

# FLOPs are counted with our ops when the extension imports (their formulas are registered then); torch's
# own count of the plain-PyTorch mixers is the same (tests/test_models.py checks it).
FLOP_IMPL = "sola" if sola_ops is not None else "torch"


# ---- models -------------------------------------------------------------------------------------

def build_model(name: str, pattern: str, attn_impl: str, device: torch.device) -> SoLAVision:
    """The registered variant with `pattern` as its layer_pattern. weight_init="skip" keeps PyTorch's default
    init: the truncated-normal one takes seconds per build on a small CPU, and neither FLOPs nor time nor
    memory depend on the weight values."""
    model = timm.create_model(name, layer_pattern=pattern, attn_impl=attn_impl, weight_init="skip")
    return model.to(device)


# ---- FLOPs --------------------------------------------------------------------------------------

@contextlib.contextmanager
def record_attention_shapes(model: SoLAVision):
    """Yields {(stage, block): q shape (B, heads, N, head_dim)}, filled by the next forward pass."""
    shapes, handles = {}, []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            def hook(mixer, inputs, key=(i, j)):
                b, h, w, _ = inputs[0].shape  # the mixer takes (B, H, W, C) tokens
                shapes[key] = (b, mixer.num_heads, h * w, mixer.head_dim)
            handles.append(block.attn.register_forward_pre_hook(hook))
    try:
        yield shapes
    finally:
        for handle in handles:
            handle.remove()


def count_flops(model: SoLAVision, img_size: int) -> Tuple[int, Dict[Tuple[int, int], tuple]]:
    """(forward FLOPs of one image, attention shapes per block), counted by sola_vision.flops."""
    with record_attention_shapes(model) as shapes:
        total = model_flops(model, img_size, batch_size=1)
    return total, dict(shapes)


def attention_flops(shapes: Dict[Tuple[int, int], tuple], pattern: str) -> Tuple[int, int]:
    """(softmax-attention FLOPs, linear-attention FLOPs) of the pattern's blocks, by the formulas that are
    registered for the sola_ops custom ops (q, k, v all have the block's shape; MLLA normalises)."""
    softmax = set(P.softmax_blocks(pattern))
    sm = sum(softmax_attention_flops(s, s, s) for key, s in shapes.items() if key in softmax)
    lin = sum(linear_attention_flops(s, s, s) for key, s in shapes.items() if key not in softmax)
    return sm, lin


def add_flops(results: List[Result], args: argparse.Namespace, models: Dict[str, SoLAVision], log) -> None:
    """Fills flops / softmax_flops / attn_flops for every size. The all-linear model is counted at each size
    (which also records the token grid of every block); a pattern's count is then either its own model's
    (args.flops == "count", on the meta device) or the all-linear count with the swapped blocks' formula
    difference added ("analytic": exact, as each block's FLOPs do not depend on the other blocks)."""
    linear = P.linear_pattern(args.depths)
    base_model = models.get(linear)
    if base_model is None:
        base_model = build_model(args.model, linear, FLOP_IMPL, torch.device("cpu"))
    base_model = base_model.to("meta").set_attn_impl(FLOP_IMPL)
    base, shapes, lin_all = {}, {}, {}
    for size in args.sizes:
        base[size], shapes[size] = count_flops(base_model, size)
        lin_all[size] = attention_flops(shapes[size], linear)[1]
    for n, r in enumerate(results, 1):
        model = None
        if args.flops == "count" and r.pattern != linear:
            model = models.pop(r.pattern, None)
            if model is None:
                model = build_model(args.model, r.pattern, FLOP_IMPL, torch.device("cpu"))
            model = model.to("meta").set_attn_impl(FLOP_IMPL)
            r.params = r.params or sum(p.numel() for p in model.parameters())
        for size in args.sizes:
            sm, lin = attention_flops(shapes[size], r.pattern)
            total = base[size] - lin_all[size] + sm + lin
            if model is not None:
                counted = count_flops(model, size)[0]
                if counted != total:  # the formulas and the counter disagree: report, trust the counter
                    log(f"  note: {r.pattern} at {size}px: counted {counted} FLOPs, formulas give {total}")
                total = counted
            r.flops[size], r.softmax_flops[size], r.attn_flops[size] = total, sm, sm + lin
        if r.params is None:
            r.params = sum(p.numel() for p in base_model.parameters())
        if model is not None:
            log(f"  [{n}/{len(results)}] FLOPs counted: {r.pattern}")
        del model
