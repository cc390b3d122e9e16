"""Building blocks of SoLA-Vision: 2-D RoPE, the two token mixers, the block, conv stem/downsample.

Tokens travel through the blocks as (B, H, W, C) ("NHWC"). The blocks' depthwise 3x3 convs (and the
downsample's stride-2 one) run as `sola_ops.depthwise_conv3x3` on them with attn_impl="sola" (the CPE's
residual, the activations and the LePE's sum with the attention output in the same pass), as nn.Conv2d
on channels-last NCHW views (`x.permute(0, 3, 1, 2)`) with "torch": no layout copies either way. The
blocks' LayerNorms run as `sola_ops.layer_norm` with "sola" (in the tokens' dtype under autocast), as
nn.LayerNorm with "torch". "sola" also runs the gate as `sola_ops.silu_mul`, the MLP's fc1 bias and GELU
as `sola_ops.bias_gelu`, in_proj and act_proj as one GEMM, the token mixer as one autograd node (the
gradient of its input written once: attention_node.py), and keeps the attention's q, k, v, outputs and
gradients in the projections' layouts (no copies); same weights. A layer is fused only while calling it
would do nothing more (`runs_as_built`); a replaced or hooked layer (pruning, activation capture) is called.
"""
from collections import OrderedDict
from itertools import chain
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch.nn.utils import parametrize

try:
    import sola_ops
    from .attention_node import AttentionNode
except ImportError:  # the models still build and run with attn_impl="torch"
    sola_ops = AttentionNode = None

ATTN_IMPLS = ("sola", "torch")


def check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be 'sola' (sola_ops kernels) or 'torch' (plain PyTorch), got {attn_impl!r}")
    if attn_impl == "sola" and sola_ops is None:
        raise ImportError("attn_impl='sola' needs the sola_ops extension, which is not importable; build it with "
                          "`pip install --no-build-isolation -e .` or use attn_impl='torch'")
    return attn_impl


def vmap_active() -> bool:
    """Whether torch.func.vmap runs (per-sample gradients); under torch.compile is_compiling() answers first,
    so dynamo never meets the private queries."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return False
    vmap = torch._C._functorch.TransformType.Vmap
    return any(i.key() == vmap for i in torch._C._functorch.get_interpreter_stack() or ())


# ---- 2-D rotary position embedding ----------------------------------------------------------

def rope_2d_angles(height: int, width: int, head_dim: int, base: float = 10000.0, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """Rotation angles (H*W, head_dim // 2) of MLLA's 2-D RoPE applied per head: channel pairs
    (2p, 2p+1) with p < head_dim/4 rotate by row * theta_p, the others by column * theta_(p - head_dim/4),
    theta_k = base ** (-k / (head_dim / 4))."""
    quarter = head_dim // 4
    theta = base ** (-torch.arange(quarter, device=device, dtype=dtype) / quarter)
    rows = torch.outer(torch.arange(height, device=device, dtype=dtype), theta)  # (H, q)
    cols = torch.outer(torch.arange(width, device=device, dtype=dtype), theta)  # (W, q)
    angles = torch.cat([rows[:, None, :].expand(height, width, quarter),
                        cols[None, :, :].expand(height, width, quarter)], dim=-1)
    return angles.reshape(height * width, 2 * quarter)


_ROPE_CACHE: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_ROPE_CACHE_SIZE = 64


def rope_2d_tables(height: int, width: int, head_dim: int, base: float, device, dtype):
    """(cos, sin), each (H*W, head_dim // 2) in `dtype` (angles in fp32, fp64 for fp64). Cached per
    resolution, device and dtype in eager mode; computed inline while torch.compile traces (the compiler
    folds them into the graph)."""
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if torch.compiler.is_compiling():
        angles = rope_2d_angles(height, width, head_dim, base, device, angle_dtype)
        return angles.cos().to(dtype), angles.sin().to(dtype)
    key = (height, width, head_dim, float(base), torch.device(device), dtype)
    tables = _ROPE_CACHE.get(key)
    if tables is None:
        # Plain tensors even when first built under inference_mode: training may reuse them later.
        with torch.inference_mode(False), torch.no_grad():
            angles = rope_2d_angles(height, width, head_dim, base, device, angle_dtype)
            tables = (angles.cos().to(dtype), angles.sin().to(dtype))
        _ROPE_CACHE[key] = tables
        while len(_ROPE_CACHE) > _ROPE_CACHE_SIZE:
            _ROPE_CACHE.popitem(last=False)
    else:
        _ROPE_CACHE.move_to_end(key)
    return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the channel pairs (2p, 2p+1) of x (..., N, D) by the angles behind cos, sin (N, D/2)."""
    xr, xi = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2)


# ---- token mixers ---------------------------------------------------------------------------

def has_hooks(module: nn.Module) -> bool:
    """Whether module has forward / backward hooks of its own, which a call of module would run."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def runs_as_built(module: nn.Module, cls: type) -> bool:
    """Whether calling module would run cls.forward on its parameters as read and nothing else, so the "sola"
    path may read them and fuse the layer into a kernel: a cls as built (or parametrized: weight_norm and
    spectral_norm parametrizations compute the weight when it is read), with no hooks of its own (pruning and
    old-style weight_norm set the weight in a pre-hook; activation or gradient-capture hooks expect the call).
    Otherwise the layer is called as a module. Global module hooks (register_module_forward_hook: ModuleTracker,
    FlopCounterMode) observe the modules that are called and do not turn fusion off."""
    if type(module) is not cls:  # the common case first: is_parametrized costs an attribute miss
        if not (parametrize.is_parametrized(module) and type(module).__bases__[0] is cls):
            return False
    return not has_hooks(module)


class AttentionMixer(nn.Module):
    """Shared part of both token mixers (so parameters do not depend on the layer pattern):
    q, k from one linear layer, v = the mixer input, 2-D RoPE on q and k, LePE (depthwise 3x3 on v).
    Subclasses implement `attend(qk, v, height, width)`: qk (B, 2 heads, N, head_dim) holds q's heads
    then k's, v (B, heads, N, head_dim). With attn_impl="sola" the linear mixer's feature map and RoPE
    run inside the attention kernels (`linear_attention(rope=...)`), the softmax mixer's RoPE as one
    kernel (`sola_ops.rope`) over q and k together, and the qk linear, the attention and LePE form one
    autograd node (`node_forward`); "torch" writes them as MLLA does."""

    letter = "?"
    eps = 0.0  # the linear mixer's normaliser epsilon (LinearAttention's)

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "sola",
                 rope_base: float = 10000.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {self.head_dim}")
        self.rope_base = rope_base
        self.attn_impl = check_attn_impl(attn_impl)
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if self.attn_impl == "sola" and self.node_applies(x):
            return self.node_forward(x)
        B, H, W, C = x.shape
        N, nh, hd = H * W, self.num_heads, self.head_dim
        qk = self.qk(x).reshape(B, N, 2 * nh, hd).transpose(1, 2)  # a view, last dim contiguous
        v = x.reshape(B, N, nh, hd).transpose(1, 2).to(qk.dtype)
        out = self.attend(qk, v, H, W)
        # a view for sola_ops' outputs, which take the layout of q (here (B, N, nh, hd) in memory)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return depthwise_conv(self.lepe, x, self.attn_impl, addend=out)  # out + LePE(v)

    def node_applies(self, x: torch.Tensor) -> bool:
        """Whether node_forward computes what forward() would: the mixer as built here (not a subclass, which
        may override attend) and its qk and LePE layers as runs_as_built says. Not under a torch.func transform
        (per-sample gradients): the node is an autograd.Function without torch.func rules; the ops have them.
        Nor for forward_ad dual tensors: the node has no jvp, and the ops' error names the public function."""
        return (type(self) in MIXERS.values() and runs_as_built(self.qk, nn.Linear)
                and runs_as_built(self.lepe, nn.Conv2d) and not sola_ops._ops.functorch_active()
                and not sola_ops._ops.has_forward_tangent(chain((x,), self.qk.parameters(), self.lepe.parameters())))

    def node_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward() for "sola" with the layers as built here: the qk linear, the attention and LePE as one
        autograd node (models/attention_node.py), which writes the gradient of x, their shared input, once.
        x and the qk weights are cast to the compute dtype as autocast casts them for the linear layer (as
        sola_ops casts its ops' inputs). eps goes in as a Python float: under torch.compile(dynamic=True) a
        symbolic float handed to an autograd.Function (and kept on its ctx) fails to trace."""
        (x,) = sola_ops._autocast(x)
        dtype = x.dtype
        bias = None if self.qk.bias is None else self.qk.bias.to(dtype)
        cos, sin = self.kernel_tables(x, x.shape[1], x.shape[2])
        return AttentionNode.apply(x, self.qk.weight.to(dtype), bias, self.lepe.weight, self.lepe.bias, self.letter,
                                   self.num_heads, cos, sin, float(self.eps))

    def kernel_tables(self, qk: torch.Tensor, height: int, width: int):
        """(cos, sin) as the sola_ops kernels compute with them: fp32 (fp64 for fp64 inputs)."""
        dtype = torch.float64 if qk.dtype == torch.float64 else torch.float32
        return rope_2d_tables(height, width, self.head_dim, self.rope_base, qk.device, dtype)

    def rope(self, qk: torch.Tensor, height: int, width: int, feature_map: str = "identity"):
        """(rope(phi(qk)), phi(qk)), each split into its q and k halves: ((q_rope, k_rope), (q, k))."""
        if self.attn_impl == "sola":  # one kernel
            cos, sin = self.kernel_tables(qk, height, width)
            if feature_map == "identity":  # phi(qk) is qk: no second output to write
                rot, feat = sola_ops.rope(qk, cos, sin), qk
            else:
                rot, feat = sola_ops.rope(qk, cos, sin, feature_map=feature_map, return_features=True)
        else:
            cos, sin = rope_2d_tables(height, width, self.head_dim, self.rope_base, qk.device, qk.dtype)
            feat = F.elu(qk) + 1.0 if feature_map == "elu" else qk
            rot = apply_rope(feat, cos, sin)
        return rot.chunk(2, dim=1), feat.chunk(2, dim=1)

    def attend(self, qk, v, height, width):
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, attn_impl={self.attn_impl!r}"


def split_qk(qk: torch.Tensor):
    """q and k, (B, nh, N, hd) views of qk, the (B, 2 nh, N, hd) view of the qk linear's (B, N, 2 nh hd)
    output. Split through unbind, whose backward stacks the gradients of q and k into (B, N, 2, nh, hd):
    the linear's own layout, so its backward takes them as they are. (chunk's backward concatenates them
    along the heads, which the linear's backward would then copy once more.)"""
    B, heads, N, hd = qk.shape
    q, k = qk.transpose(1, 2).reshape(B, N, 2, heads // 2, hd).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2)


class LinearAttention(AttentionMixer):
    """MLLA's linear attention: phi = elu + 1 on q, k; RoPE-rotated phi(q), phi(k) in the numerator,
    unrotated in the normaliser; out_i = phi(q)_i^T S / (phi(q)_i^T z + eps) with the mean-form state
    S = mean_j rope(phi(k_j)) v_j^T, z = mean_j phi(k_j)."""

    letter = "L"
    eps = 1e-6

    def attend(self, qk, v, height, width):
        if self.attn_impl == "sola":  # feature map and RoPE inside the kernels: q, k read once each
            q, k = split_qk(qk)
            return sola_ops.linear_attention(q, k, v, feature_map="elu", eps=self.eps,
                                             rope=self.kernel_tables(qk, height, width))
        # Plain PyTorch, as MLLA writes it.
        (q_rope, k_rope), (q, k) = self.rope(qk, height, width, feature_map="elu")
        n = k.shape[-2]
        z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + self.eps)
        kv = (k_rope.transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
        return q_rope @ kv * z


class SoftmaxAttention(AttentionMixer):
    """Global softmax attention on RoPE-rotated q, k (scale 1/sqrt(head_dim))."""

    letter = "S"

    def attend(self, qk, v, height, width):
        (q_rope, k_rope), _ = self.rope(qk, height, width)
        if self.attn_impl == "sola":
            return sola_ops.softmax_attention(q_rope, k_rope, v)
        return F.scaled_dot_product_attention(q_rope, k_rope, v)


MIXERS = {"L": LinearAttention, "S": SoftmaxAttention}


# ---- block ----------------------------------------------------------------------------------

def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor, attn_impl: str, residual: bool = False,
                   silu: bool = False, addend: torch.Tensor = None) -> torch.Tensor:
    """A depthwise 3x3 conv (its weight and bias) on (B, H, W, C) tokens, then SiLU when silu, plus x
    when residual, plus addend when given: one sola_ops kernel for "sola" (the sums never written
    apart), nn.Conv2d through channels-last views for "torch" (and for a conv that runs_as_built refuses)."""
    if attn_impl == "sola" and runs_as_built(conv, nn.Conv2d):
        return sola_ops.depthwise_conv3x3(x, conv.weight, conv.bias, residual=residual,
                                          activation="silu" if silu else None, addend=addend)
    y = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    y = F.silu(y) if silu else y
    y = x + y if residual else y
    return y if addend is None else addend + y


def layer_norm(norm: nn.Module, x: torch.Tensor, attn_impl: str) -> torch.Tensor:
    """norm(x) over the channels. For "sola" an nn.LayerNorm runs as one sola_ops kernel in x's dtype:
    under autocast torch runs layer_norm in fp32 (a cast of x in, an fp32 output, then a cast back per
    consumer), about a sixth of the bytes a bf16 training step moves. Other norm layers run as they are
    (subclasses too: timm's LayerNorm2d normalises another dim)."""
    if sola_layer_norm(norm, attn_impl):
        return sola_ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return norm(x)


def sola_layer_norm(norm: nn.Module, attn_impl: str) -> bool:
    """Whether norm runs as sola_ops' LayerNorm: an nn.LayerNorm over the last dim (runs_as_built), "sola" impl."""
    return attn_impl == "sola" and runs_as_built(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1


def cpe_and_norm(cpe: nn.Conv2d, norm: nn.Module, x: torch.Tensor, attn_impl: str):
    """(x, norm(x)) for x = x + CPE(x), the block's residual stream and its normalised branch input. For
    "sola" with an nn.LayerNorm one sola_ops.depthwise_conv3x3_layer_norm: the same two kernels forward,
    and the stream's two gradients (the residual's and the norm's) summed inside the norm's backward."""
    if sola_layer_norm(norm, attn_impl) and runs_as_built(cpe, nn.Conv2d):
        return sola_ops.depthwise_conv3x3_layer_norm(x, cpe.weight, cpe.bias, norm.weight, norm.bias,
                                                     residual=True, eps=norm.eps)
    x = depthwise_conv(cpe, x, attn_impl, residual=True)
    return x, layer_norm(norm, x, attn_impl)


class SoLABlock(nn.Module):
    """MLLA block with a swappable token mixer (`mixer`: "L" linear, "S" softmax), on (B, H, W, C):

        x = x + CPE(x)
        x = x + drop_path(out_proj(mixer(SiLU(DWConv(in_proj(norm1(x))))) * SiLU(act_proj(norm1(x)))))
        x = x + CPE2(x)
        x = x + drop_path(MLP(norm2(x)))
    """

    def __init__(self, dim: int, num_heads: int, mixer: str = "L", mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, drop_path: float = 0.0, attn_impl: str = "sola", rope_base: float = 10000.0,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {mixer!r}")
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.SiLU()
        self.attn = MIXERS[mixer](dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl, rope_base=rope_base)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def in_and_act_proj(self, y: torch.Tensor, impl: str):
        """(in_proj(y), act_proj(y)). For "sola" one GEMM over the two layers' stacked weights: y is read
        once, and its gradient is one GEMM's output rather than the sum of two. The halves are channel
        slices of one (B, H, W, 2C) tensor, which the depthwise conv and SiLU read in place."""
        a, b = self.in_proj, self.act_proj
        fused = impl == "sola" and runs_as_built(a, nn.Linear) and runs_as_built(b, nn.Linear)
        if not fused or a.bias is None or b.bias is None:
            return a(y), b(y)
        both = F.linear(y, torch.cat((a.weight, b.weight)), torch.cat((a.bias, b.bias)))
        return both.split(a.out_features, dim=-1)

    def gated(self, y: torch.Tensor, gate: torch.Tensor, impl: str) -> torch.Tensor:
        """y * act(gate). For "sola" with SiLU one sola_ops kernel each way: SiLU(gate) is never stored, and
        the backward reads y and gate once for both gradients."""
        if impl == "sola" and runs_as_built(self.act, nn.SiLU):
            return sola_ops.silu_mul(y, gate)
        return y * self.act(gate)

    def mlp_forward(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        """self.mlp(x). For "sola" with timm's Mlp as built here (fc1 with a bias, GELU): fc1's GEMM without
        its bias, then the bias add and GELU as one sola_ops.bias_gelu, whose backward sums the bias gradient
        as it writes dx (no separate reduction over the 4C-wide gradient); same weights."""
        m = self.mlp
        fused = (impl == "sola" and runs_as_built(m, Mlp) and runs_as_built(m.fc1, nn.Linear)
                 and runs_as_built(m.act, nn.GELU))
        if not fused or m.fc1.bias is None:  # a replaced MLP (any module), hooks: run as it is
            return m(x)
        h = sola_ops.bias_gelu(F.linear(x, m.fc1.weight), m.fc1.bias, approximate=m.act.approximate)
        return m.drop2(m.fc2(m.norm(m.drop1(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.attn.attn_impl  # the block's convs follow its mixer (SoLAVision.set_attn_impl)
        x, y = cpe_and_norm(self.cpe1, self.norm1, x, impl)
        y, gate = self.in_and_act_proj(y, impl)
        if runs_as_built(self.act, nn.SiLU):
            y = depthwise_conv(self.dwc, y, impl, silu=True)  # SiLU(DWConv(...)), one pass in sola
        else:  # a replaced or hooked activation
            y = self.act(depthwise_conv(self.dwc, y, impl))
        y = self.attn(y)
        x = x + self.drop_path(self.out_proj(self.gated(y, gate, impl)))
        x, y = cpe_and_norm(self.cpe2, self.norm2, x, impl)
        x = x + self.drop_path(self.mlp_forward(y, impl))
        return x


# ---- convolutional stem and downsampling ------------------------------------------------------

class ConvLayer(nn.Module):
    """Conv2d -> optional BatchNorm -> optional ReLU (MLLA's ConvLayer)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 bias: bool = True, norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_chs) if norm else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Stem(nn.Module):
    """Stride-4 conv stem: 3x3/2 conv, a residual pair of 3x3 convs, 3x3/2 conv (to 4x width), 1x1 conv."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.conv1 = ConvLayer(in_chans, half, 3, stride=2, bias=False)
        self.conv2 = nn.Sequential(ConvLayer(half, half, 3, bias=False),
                                   ConvLayer(half, half, 3, bias=False, act=False))
        self.conv3 = nn.Sequential(ConvLayer(half, 4 * dim, 3, stride=2, bias=False),
                                   ConvLayer(4 * dim, dim, 1, bias=False, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last copy of the image (none if it is one already): the convs then run in cuDNN's
        # NHWC layout, the one its tensor-core kernels take, and stage 0 gets its (B, H, W, C) tokens
        # contiguous, the layout every stage keeps (features_only runs this module directly).
        # torch.func.vmap cannot re-stride a batched tensor (NYI): there the image stays as it is.
        x = self.conv1(x if vmap_active() else x.contiguous(memory_format=torch.channels_last))
        x = self.conv2(x) + x
        return self.conv3(x)


def conv_relu(layer: nn.Module) -> bool:
    """Whether layer computes relu(layer.conv(x)): a ConvLayer without a norm, with a ReLU, all runs_as_built."""
    return (runs_as_built(layer, ConvLayer) and runs_as_built(layer.norm, nn.Identity)
            and runs_as_built(layer.act, nn.ReLU))


class Downsample(nn.Module):
    """Stride-2 inverted bottleneck between stages: 1x1 expand (to 4x out), 3x3 depthwise /2, 1x1 project + BN.
    With attn_impl="sola" the depthwise conv, its ReLU and the expand's ReLU before it run as one
    `sola_ops.depthwise_conv3x3` on the channels-last view (the expanded tensor is the largest of the stage: 4x
    its width at twice its resolution), else as nn.Conv2d; same weights either way (`fusable`)."""

    def __init__(self, in_chs: int, out_chs: int, ratio: float = 4.0, attn_impl: str = "sola"):
        super().__init__()
        hidden = int(out_chs * ratio)
        self.attn_impl = check_attn_impl(attn_impl)
        self.conv = nn.Sequential(
            ConvLayer(in_chs, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, stride=2, groups=hidden, norm=False),
            ConvLayer(hidden, out_chs, 1, bias=False, act=False),  # no bias: BN follows
        )

    def fusable(self) -> bool:
        """Whether the depthwise stage runs as sola_ops: "sola", and it and the Sequential around it as built
        (runs_as_built: no hooks, a ConvLayer whose norm is an Identity and whose activation a ReLU)."""
        depthwise = self.conv[1]
        return (self.attn_impl == "sola" and runs_as_built(self.conv, nn.Sequential) and len(self.conv) == 3
                and conv_relu(depthwise) and runs_as_built(depthwise.conv, nn.Conv2d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fusable():
            return self.conv(x)
        expand, depthwise, project = self.conv
        if conv_relu(expand):
            # the expand's ReLU is read inside the depthwise conv: relu(expand(x)), 4x the stage's width at
            # twice its resolution, is never written, and its backward mask is applied as dx is written
            x, relu_input = expand.conv(x), "relu"
        else:
            x, relu_input = expand(x), None
        x = x.permute(0, 2, 3, 1)  # channels-last NCHW in, so (B, H, W, C) contiguous
        x = sola_ops.depthwise_conv3x3(x, depthwise.conv.weight, depthwise.conv.bias, stride=2, activation="relu",
                                       input_activation=relu_input)
        return project(x.permute(0, 3, 1, 2))
