"""SoLA-Vision: a hierarchical MLLA-style backbone whose blocks use linear or global softmax attention
layer by layer ("Fine-grained Layer-wise Linear Softmax Hybrid Attention", arXiv 2601.11164).

    model = timm.create_model("sola_vision_tiny", num_classes=10, layer_pattern="LL-LLLL-LLLSLLLS-LLLS")

`layer_pattern` has one letter per block, stages separated by "-": "L" linear attention, "S" softmax
attention. Parameters do not depend on the pattern, so one checkpoint serves every pattern.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .layers import AttentionMixer, Downsample, SoLABlock, Stem, check_attn_impl

__all__ = ["SoLAVision", "parse_layer_pattern", "set_attn_impl", "VARIANTS"]

# timm's FX feature extraction (features_only=True, feature_cls="fx") keeps these as leaf modules: their
# forwards pick kernels by their inputs' dtype and read RoPE tables per resolution, which FX cannot trace.
register_notrace_module(SoLABlock)
register_notrace_module(Downsample)


def parse_layer_pattern(layer_pattern: Optional[str], depths: Sequence[int]) -> Tuple[str, ...]:
    """"LL-LLLL-LLLSLLLS-LLLS" -> ("LL", "LLLL", "LLLSLLLS", "LLLS"), checked against `depths`.
    None means all linear. Letters are case-insensitive."""
    depths = tuple(depths)
    if layer_pattern is None:
        return tuple("L" * d for d in depths)
    example = "-".join("L" * d for d in depths)
    if not isinstance(layer_pattern, str):
        raise ValueError(f"layer_pattern must be a string such as {example!r}, got {type(layer_pattern).__name__}")
    stages = layer_pattern.strip().upper().split("-")
    if len(stages) != len(depths):
        raise ValueError(f"layer_pattern {layer_pattern!r} has {len(stages)} stage(s) separated by '-', but the "
                         f"model has {len(depths)} stages with depths {depths} (e.g. {example!r})")
    for i, (stage, depth) in enumerate(zip(stages, depths), start=1):  # "stage 3 of 4" counts from 1
        bad = sorted(set(stage) - {"L", "S"})
        if bad:
            raise ValueError(f"layer_pattern {layer_pattern!r}: stage {i} of {len(depths)} ({stage!r}) has unknown "
                             f"letter(s) {bad}; use 'L' "
                             f"(linear attention) or 'S' (softmax attention), stages separated by '-'")
        if len(stage) != depth:
            raise ValueError(f"layer_pattern {layer_pattern!r}: stage {i} of {len(depths)} ({stage!r}) has "
                             f"{len(stage)} letter(s) but depth {depth} (depths {depths})")
    return tuple(stages)


class SoLAStage(nn.Module):
    """Optional stride-2 downsample, then blocks. NCHW in and out; (B, H, W, C) inside."""

    def __init__(self, in_dim: int, dim: int, num_heads: int, pattern: str, downsample: bool,
                 drop_path: Sequence[float], **block_kwargs):
        super().__init__()
        self.downsample = (Downsample(in_dim, dim, attn_impl=block_kwargs.get("attn_impl", "sola")) if downsample
                           else nn.Identity())
        self.blocks = nn.Sequential(*[SoLABlock(dim, num_heads, mixer=letter, drop_path=dp, **block_kwargs)
                                      for letter, dp in zip(pattern, drop_path)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x.permute(0, 3, 1, 2)


class SoLAVision(nn.Module):
    """Four stages at stride 4/8/16/32 (conv stem, conv downsamples), MLLA blocks with a linear or softmax
    token mixer per block, final LayerNorm, pooled classifier head. Any input size works (RoPE tables are
    built per resolution); sizes divisible by 32 give exact stride-32 features.

    Args:
        in_chans, num_classes, global_pool: as in timm.
        drop_rate: dropout before the classifier (timm's head dropout).
        proj_drop_rate: dropout in every block's MLP (after its activation and after fc2; timm's ViT name).
        embed_dims, depths, num_heads: per stage.
        layer_pattern: one letter per block ("L" linear, "S" softmax), stages split by "-"; None = all linear.
            (timm.create_model drops None kwargs, so there None keeps the registered variant's pattern: use a
            `*_linear` variant for all-linear.)
        mlp_ratio, qkv_bias: MLP width ratio, bias of the q/k projection.
        drop_path_rate: stochastic depth, increasing linearly over the blocks up to this rate.
        attn_impl: "sola" (sola_ops kernels) or "torch" (plain PyTorch: MLLA's einsum linear attention,
            torch SDPA softmax); same weights, switch later with `set_attn_impl`.
        rope_base: base of the 2-D RoPE frequencies.
        weight_init: "" (truncated-normal linear weights) or "skip" (PyTorch's default init, as timm's ViT:
            faster to build when the values do not matter, e.g. for FLOP counts and timings).
        img_size: accepted for timm compatibility; the model has no fixed input size.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (2, 4, 8, 4),
                 num_heads: Sequence[int] = (2, 4, 8, 16), layer_pattern: Optional[str] = None,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, attn_impl: str = "sola", rope_base: float = 10000.0, weight_init: str = "", img_size=None):
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_heads):
            raise ValueError(f"embed_dims {embed_dims}, depths {depths} and num_heads {num_heads} "
                             "must have one entry per stage")
        check_attn_impl(attn_impl)
        pattern = parse_layer_pattern(layer_pattern, depths)
        self.layer_pattern = "-".join(pattern)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under a meta default device
        stages, self.feature_info, prev, start = [], [], embed_dims[0], 0
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            stages.append(SoLAStage(prev, dim, heads, pattern[i], downsample=i > 0, drop_path=dpr[start:start + depth],
                                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=proj_drop_rate, attn_impl=attn_impl,
                                    rope_base=rope_base))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
            prev, start = dim, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.norm = LayerNorm2d(prev)
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        if weight_init not in ("", "skip"):
            raise ValueError(f"weight_init must be '' or 'skip', got {weight_init!r}")
        if weight_init != "skip":
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: say plainly that the model is not scriptable (its blocks pick
        kernels at run time and its "sola" path uses custom autograd Functions) and what works instead."""
        raise RuntimeError("SoLAVision cannot be compiled with torch.jit.script; use torch.compile, torch.export "
                           "or torch.jit.trace")

    # ---- attention implementation --------------------------------------------------------------

    @property
    def attn_impl(self) -> str:
        impls = {m.attn_impl for m in _impl_modules(self)}
        return impls.pop() if len(impls) == 1 else "mixed"

    def set_attn_impl(self, attn_impl: str) -> "SoLAVision":
        """Runs the same weights with the sola_ops kernels ("sola") or plain PyTorch ("torch")."""
        return set_attn_impl(self, attn_impl)

    # ---- timm interface --------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW). indices: last n stages if int, all if None, else the listed ones.
        norm applies the final norm to the last stage's output."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        feat_idx = -1
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the stages (and norm / head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
            self.num_classes = 0
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, num_features, H/32, W/32), normalised."""
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- variants ---------------------------------------------------------------------------------

def _impl_modules(module: nn.Module):
    """The modules with an attn_impl: token mixers (their blocks' convs follow them), downsamples."""
    return [m for m in module.modules() if isinstance(m, (AttentionMixer, Downsample))]


def set_attn_impl(module: nn.Module, attn_impl: str) -> nn.Module:
    """SoLAVision.set_attn_impl for any module holding SoLA-Vision layers: a features_only wrapper (timm's
    feature classes have no such method), a detector's backbone, a DDP-wrapped model. Returns module."""
    check_attn_impl(attn_impl)
    layers = _impl_modules(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no SoLA-Vision layers whose attn_impl could be set")
    for m in layers:
        m.attn_impl = attn_impl
    return module


def _hybrid(depths: Sequence[int]) -> str:
    """Default hybrid pattern: every 4th block of stages 3 and 4 is softmax attention."""
    return "-".join("".join("S" if i >= 2 and j % 4 == 3 else "L" for j in range(d)) for i, d in enumerate(depths))


_ARCHS = {
    # nano is not in the paper: a quarter-size model for CPU demos and tests (head dim 32 like the others)
    "nano": dict(embed_dims=(32, 64, 128, 256), depths=(1, 2, 4, 2), num_heads=(1, 2, 4, 8)),
    "tiny": dict(embed_dims=(64, 128, 256, 512), depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16)),
    "small": dict(embed_dims=(64, 128, 256, 512), depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16)),
    "base": dict(embed_dims=(96, 192, 384, 768), depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24)),
}

# name -> model kwargs of every registered model: sola_vision_{size} (hybrid) and sola_vision_{size}_linear
VARIANTS: Dict[str, dict] = {}
for _size, _arch in _ARCHS.items():
    VARIANTS[f"sola_vision_{_size}"] = dict(_arch, layer_pattern=_hybrid(_arch["depths"]))
    VARIANTS[f"sola_vision_{_size}_linear"] = dict(_arch, layer_pattern=None)


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv", "classifier": "head.fc",
        "license": "apache-2.0", "paper_ids": "arXiv:2601.11164", **kwargs,
    }


# No weights are published: pretrained_cfg carries preprocessing metadata only, nothing is downloaded.
default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


def _create_sola_vision(variant: str, pretrained: bool = False, **kwargs) -> SoLAVision:
    model_args = dict(VARIANTS[variant], **kwargs)
    if "depths" in kwargs and "layer_pattern" not in kwargs and not variant.endswith("_linear"):
        model_args["layer_pattern"] = _hybrid(kwargs["depths"])  # the variant's placement for the new depths
    return build_model_with_cfg(
        SoLAVision, variant, pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **model_args)


@register_model
def sola_vision_nano(pretrained: bool = False, **kwargs) -> SoLAVision:
    return _create_sola_vision("sola_vision_nano", pretrained, **kwargs)


@register_model
def sola_vision_nano_linear(pretrained: bool = False, **kwargs) -> SoLAVision:
    return _create_sola_vision("sola_vision_nano_linear", pretrained, **kwargs)


@register_model
def sola_vision_tiny(pretrained: bool = False, **kwargs) -> SoLAVision:
    return _create_sola_vision("sola_vision_tiny", pretrained, **kwargs)


@register_model
def sola_vision_tiny_linear(pretrained: bool = False, **kwargs) -> SoLAVision:
    return _create_sola_vision("sola_vision_tiny_linear", pretrained, **kwargs)


@register_model
def sola_vision_small(pretrained: bool = False, **kwargs) -> SoLAVision:
    return _create_sola_vision("sola_vision_small", pretrained, **kwargs)


@register_model
def sola_vision_small_linear(pretrained: bool = False, **kwargs) -> SoLAVision:
    return _create_sola_vision("sola_vision_small_linear", pretrained, **kwargs)


@register_model
def sola_vision_base(pretrained: bool = False, **kwargs) -> SoLAVision:
    return _create_sola_vision("sola_vision_base", pretrained, **kwargs)


@register_model
def sola_vision_base_linear(pretrained: bool = False, **kwargs) -> SoLAVision:
    return _create_sola_vision("sola_vision_base_linear", pretrained, **kwargs)
