"""SoLA-Vision backbones (import package `sola_vision`). Importing it registers the models with timm:

    import sola_vision, timm
    model = timm.create_model("sola_vision_tiny", num_classes=100)           # hybrid linear/softmax
    model = timm.create_model("sola_vision_tiny_linear")                     # all linear attention
    model = timm.create_model("sola_vision_small", layer_pattern="LLL-LLLLLL-" + "L" * 20 + "S-LLLLLS")
    sola_vision.flops(model, 224)
"""
try:
    import timm  # noqa: F401
except ImportError as e:  # pragma: no cover
    raise ImportError("sola_vision needs timm: pip install timm (or pip install 'sola-ops[models]')") from e

from .flops import depthwise_conv3x3_flops, flops, linear_attention_flops, softmax_attention_flops
from .layers import LinearAttention, SoftmaxAttention, SoLABlock, apply_rope, rope_2d_tables
from .sola_vision import VARIANTS, SoLAVision, parse_layer_pattern, set_attn_impl

__all__ = [
    "SoLAVision", "SoLABlock", "LinearAttention", "SoftmaxAttention", "VARIANTS", "parse_layer_pattern",
    "set_attn_impl",
    "apply_rope", "rope_2d_tables", "flops", "linear_attention_flops", "softmax_attention_flops",
    "depthwise_conv3x3_flops",
]
