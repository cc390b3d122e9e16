"""SoLA-Vision models (import package sola_vision): timm integration, layer patterns, sola vs torch
attention agreement, features, FLOP counting, torch.compile. CPU, small inputs; one mixer test on CUDA
(the fused-RoPE kernels), skipped without a GPU."""
import math

import pytest
import torch

timm = pytest.importorskip("timm")
import sola_vision  # noqa: E402
from sola_vision import SoLAVision, parse_layer_pattern  # noqa: E402
from sola_vision.layers import LinearAttention, SoftmaxAttention, SoLABlock, apply_rope, rope_2d_tables  # noqa: E402

try:
    import sola_ops
    from sola_vision.attention_node import AttentionNode
    HAS_SOLA = True
except ImportError:
    HAS_SOLA = False
IMPL = "sola" if HAS_SOLA else "torch"  # model smoke tests run either way
needs_sola = pytest.mark.skipif(not HAS_SOLA, reason="needs the sola_ops extension")

NAMES = [f"sola_vision_{size}{suffix}" for size in ("nano", "tiny", "small", "base") for suffix in ("", "_linear")]
TINY = dict(embed_dims=(64, 128, 256, 512), depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16))
MIXED = "LS-LSLS-LLLSLLLS-LSLS"  # softmax and linear blocks in every stage
ALL_L = "LL-LLLL-LLLLLLLL-LLLL"  # (timm.create_model drops None kwargs: layer_pattern=None means the default)


def image(b=1, h=64, w=64, seed=0, dtype=torch.float32):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tiny(layer_pattern=MIXED, attn_impl=IMPL, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("sola_vision_tiny", layer_pattern=layer_pattern, attn_impl=attn_impl, **kwargs)


def sharpen_attention(model, seed=1):
    """Default init (std 0.02) makes q, k tiny and every attention nearly uniform; larger q/k weights
    make the attention (and so any disagreement between implementations) visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LinearAttention, SoftmaxAttention)):
                w = m.qk.weight
                w.copy_(torch.randn(w.shape, generator=g) * 2.0 / math.sqrt(w.shape[1]))
    return model


def assert_close_rel(actual, expected, rtol, name):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + 1e-12, f"{name}: max abs err {err:.3e} > {rtol} * max|expected| ({scale:.3e})"


# ---- registry, variants, patterns -----------------------------------------------------------

def test_registered_models():
    assert sorted(timm.list_models("sola_vision*")) == sorted(NAMES)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and not cfg.url and not cfg.hf_hub_id  # nothing to download


def test_variant_architectures():
    expect = {"nano": ((32, 64, 128, 256), (1, 2, 4, 2), (1, 2, 4, 8)),
              "tiny": ((64, 128, 256, 512), (2, 4, 8, 4), (2, 4, 8, 16)),
              "small": ((64, 128, 256, 512), (3, 6, 21, 6), (2, 4, 8, 16)),
              "base": ((96, 192, 384, 768), (3, 6, 21, 6), (3, 6, 12, 24))}
    for size, (dims, depths, heads) in expect.items():
        for suffix in ("", "_linear"):
            model = timm.create_model(f"sola_vision_{size}{suffix}", attn_impl="torch")
            assert [s.blocks[0].attn.dim for s in model.stages] == list(dims)
            assert [len(s.blocks) for s in model.stages] == list(depths)
            assert [s.blocks[0].attn.num_heads for s in model.stages] == list(heads)
            assert {m.head_dim for m in model.modules() if isinstance(m, (LinearAttention, SoftmaxAttention))} == {32}
            letters = [[b.attn.letter for b in s.blocks] for s in model.stages]
            assert model.layer_pattern == "-".join("".join(s) for s in letters)
            if suffix:
                assert set(model.layer_pattern) == {"L", "-"}
            else:  # a few softmax layers, only in stages 3 and 4
                assert "S" not in "".join(letters[0] + letters[1])
                assert 0 < "".join(letters[2] + letters[3]).count("S") <= sum(depths[2:]) // 3
    assert timm.create_model("sola_vision_tiny", attn_impl="torch").layer_pattern == "LL-LLLL-LLLSLLLS-LLLS"


def test_layer_pattern_builds_the_mixers():
    model = tiny("SL-LLSS-SLLLLLLS-LLLL", attn_impl="torch")
    kinds = "-".join("".join("S" if isinstance(b.attn, SoftmaxAttention) else "L" for b in s.blocks)
                     for s in model.stages)
    assert kinds == "SL-LLSS-SLLLLLLS-LLLL"
    assert all(isinstance(b.attn, (LinearAttention, SoftmaxAttention)) for s in model.stages for b in s.blocks)
    assert parse_layer_pattern(" ll-llss-llllllll-llll ", TINY["depths"]) == ("LL", "LLSS", "LLLLLLLL", "LLLL")
    assert parse_layer_pattern(None, (1, 2)) == ("L", "LL")


@pytest.mark.parametrize("pattern, match", [
    ("LL-LLLL-LLLLLLLL", r"3 stage\(s\).*4 stages"),
    ("LL-LLLL-LLLLLLLL-LLLL-L", r"5 stage\(s\)"),
    ("LLLLLLLLLLLLLLLLLL", r"1 stage\(s\)"),
    ("LL-LLL-LLLLLLLL-LLLL", r"stage 2 of 4 \('LLL'\) has 3 letter\(s\).*depth 4"),
    ("LL-LLLL-LLLLLLLL-LLLLL", r"stage 4 of 4 \('LLLLL'\) has 5 letter\(s\).*depth 4"),
    ("LX-LLLL-LLLLLLLL-LLLL", r"stage 1 of 4 \('LX'\) has unknown letter\(s\) \['X'\].*'L'.*'S'"),
    ("LL-LLLL-LLLL LLLL-LLLL", r"stage 3 of 4 .* has unknown letter"),
    ("LL--LLLL-LLLLLLLL-LLLL", r"5 stage\(s\)"),
    ("", r"1 stage\(s\)"),
    (["LL", "LLLL", "LLLLLLLL", "LLLL"], r"must be a string"),
])
def test_layer_pattern_errors(pattern, match):
    with pytest.raises(ValueError, match=match):
        parse_layer_pattern(pattern, TINY["depths"])
    with pytest.raises(ValueError, match=match):
        timm.create_model("sola_vision_tiny", layer_pattern=pattern, attn_impl="torch")


def test_custom_config():
    """The class itself takes any number of stages, widths and patterns."""
    model = SoLAVision(embed_dims=(32, 64), depths=(1, 2), num_heads=(1, 2), layer_pattern="S-LS", num_classes=3,
                       attn_impl=IMPL)
    assert [f["reduction"] for f in model.feature_info] == [4, 8] and model.num_features == 64
    assert model(image(1, 32, 48)).shape == (1, 3)
    with pytest.raises(ValueError, match="one entry per stage"):
        SoLAVision(embed_dims=(32, 64), depths=(1,), num_heads=(1, 2), attn_impl="torch")
    with pytest.raises(ValueError, match="divisible by 4"):
        SoLAVision(embed_dims=(36,), depths=(1,), num_heads=(6,), attn_impl="torch")


def test_depths_override_keeps_the_variants_placement():
    """New depths for a registered variant: the hybrid variant places softmax layers by its rule for them
    (its own pattern no longer fits), the linear twin stays all linear, an explicit pattern wins."""
    model = timm.create_model("sola_vision_nano", depths=(1, 1, 4, 5), attn_impl="torch")
    assert model.layer_pattern == "L-L-LLLS-LLLSL"
    model = timm.create_model("sola_vision_nano_linear", depths=(1, 1, 4, 5), attn_impl="torch")
    assert model.layer_pattern == "L-L-LLLL-LLLLL"
    model = timm.create_model("sola_vision_nano", depths=(1, 1, 1, 1), layer_pattern="S-L-S-L", attn_impl="torch")
    assert model.layer_pattern == "S-L-S-L"


def test_bad_attn_impl():
    with pytest.raises(ValueError, match="attn_impl"):
        timm.create_model("sola_vision_tiny", attn_impl="flash")
    model = tiny(attn_impl="torch")
    with pytest.raises(ValueError, match="attn_impl"):
        model.set_attn_impl("cuda")
    assert model.attn_impl == "torch"


def test_params_do_not_depend_on_pattern():
    shapes = []
    for pattern in (ALL_L, "LL-LLLL-LLLSLLLS-LLLS", "SS-SSSS-SSSSSSSS-SSSS", MIXED):
        model = tiny(pattern, attn_impl="torch")
        shapes.append({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert all(s == shapes[0] for s in shapes[1:])
    # the same checkpoint loads into any pattern
    a, b = tiny(ALL_L, attn_impl="torch"), tiny("SS-SSSS-SSSSSSSS-SSSS", attn_impl="torch")
    b.load_state_dict(a.state_dict(), strict=True)
    counts = {name: sum(p.numel() for p in timm.create_model(name, attn_impl="torch").parameters())
              for name in NAMES}
    for size in ("tiny", "small", "base"):
        assert counts[f"sola_vision_{size}"] == counts[f"sola_vision_{size}_linear"]
    assert 20e6 < counts["sola_vision_tiny"] < 30e6 and 90e6 < counts["sola_vision_base"] < 100e6


def test_builds_on_the_meta_device():
    """Under a meta default device (how large models are built without memory, then materialised and loaded)
    the model builds with its parameters on meta; to_empty + a state dict gives the model built on the CPU
    (the drop-path schedule was a meta tensor read with .tolist(): "Cannot copy out of meta tensor")."""
    with torch.device("meta"):
        model = timm.create_model("sola_vision_nano", num_classes=3, drop_path_rate=0.1)
    assert all(p.is_meta for p in model.parameters())
    built = timm.create_model("sola_vision_nano", num_classes=3, drop_path_rate=0.1).eval()
    model = model.to_empty(device="cpu").eval()
    model.load_state_dict(built.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), built(x))


# ---- forward / backward -----------------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1, attn_impl=IMPL)
    model.train()
    out = model(image(1, *size))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    out.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    feats = model.forward_features(image(1, *size))
    assert feats.shape == (1, model.num_features, size[0] // 32, size[1] // 32)


def test_any_input_size_and_rope_cache():
    model = tiny(attn_impl=IMPL).eval()
    with torch.no_grad():
        for h, w in [(32, 32), (96, 64), (64, 160), (72, 40)]:  # the last one is not a multiple of 32
            out = model.forward_features(image(1, h, w))
            assert out.shape == (1, 512, math.ceil(h / 32), math.ceil(w / 32))
    cos, sin = rope_2d_tables(3, 5, 32, 10000.0, "cpu", torch.float32)
    assert rope_2d_tables(3, 5, 32, 10000.0, torch.device("cpu"), torch.float32)[0] is cos  # cached


def test_drop_path_rate_and_head():
    model = timm.create_model("sola_vision_tiny", drop_path_rate=0.2, num_classes=3, attn_impl="torch")
    blocks = [b for s in model.stages for b in s.blocks]
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    x = image(2)
    model.eval()
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 512)
    torch.testing.assert_close(pre, feats.mean((2, 3)))
    torch.testing.assert_close(model.forward_head(feats), model.get_classifier()(pre))
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre)
    model.reset_classifier(11)
    assert model(x).shape == (2, 11) and model.num_classes == 11
    cfg = model.pretrained_cfg
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()


def test_drop_rates_as_in_timm():
    """drop_rate is the head's dropout only (timm's meaning: a --drop recipe must not also drop inside every
    block); proj_drop_rate drops in the blocks' MLPs."""
    def dropout_rates(model):
        return {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    model = timm.create_model("sola_vision_nano", drop_rate=0.3, attn_impl="torch")
    assert dropout_rates(model) == {"head.drop": 0.3}
    model = timm.create_model("sola_vision_nano", proj_drop_rate=0.2, attn_impl="torch")
    blocks = [f"stages.{i}.blocks.{j}" for i, s in enumerate(model.stages) for j in range(len(s.blocks))]
    assert dropout_rates(model) == {f"{b}.mlp.{d}": 0.2 for b in blocks for d in ("drop1", "drop2")}


# ---- sola_ops kernels vs plain PyTorch on the same weights --------------------------------

@needs_sola
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_sola_matches_torch(dtype, rtol):
    # eval: BatchNorm on running stats, so no parameter has a gradient that is zero in exact arithmetic
    # (in train mode the bias of a conv before BN gets pure rounding noise, which no rtol can compare)
    model = sharpen_attention(tiny(MIXED, attn_impl="sola", num_classes=10)).to(dtype).eval()
    x = image(2, 64, 96, dtype=dtype)
    results = {}
    for impl in ("sola", "torch"):
        model.set_attn_impl(impl)
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        results[impl] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (out_s, g_s), (out_t, g_t) = results["sola"], results["torch"]
    assert out_s.abs().max() > 0.1  # a non-trivial output
    assert_close_rel(out_s, out_t, rtol, "logits")
    for name in g_t:
        assert_close_rel(g_s[name], g_t[name], rtol, f"grad {name}")


def nano_fp64(attn_impl="sola"):
    """sola_vision_nano in fp64, eval, softmax and linear blocks, a stage with a downsample after stage 0."""
    torch.manual_seed(0)
    model = timm.create_model("sola_vision_nano", layer_pattern="L-LS-LLLS-SL", attn_impl=attn_impl, num_classes=7)
    return sharpen_attention(model).double().eval()


def logits_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_model_results(a, b):
    (out_a, g_a), (out_b, g_b) = a, b
    assert_close_rel(out_a, out_b, 1e-10, "logits")
    assert g_a.keys() == g_b.keys()
    for name in g_b:
        assert_close_rel(g_a[name], g_b[name], 1e-10, f"grad {name}")


@needs_sola
def test_sola_calls_hooked_layers():
    """A forward hook on any layer runs under "sola" as under "torch" (the fused path reads a layer's weights
    only while calling it would do nothing more): activation capture sees the same modules and values."""
    model = nano_fp64()
    x = image(1, 64, 96, dtype=torch.float64)
    seen = {}
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: seen.setdefault(n, out)) for n, m in leaves]
    results = {}
    for impl in ("torch", "sola"):
        model.set_attn_impl(impl)
        seen.clear()
        results[impl] = logits_and_grads(model, x), dict(seen)
    for h in hooks:
        h.remove()
    (torch_results, torch_seen), (sola_results, sola_seen) = results["torch"], results["sola"]
    assert sola_seen.keys() == torch_seen.keys()
    assert torch_seen.keys() == {n for n, _ in leaves}
    for name, out in torch_seen.items():
        assert_close_rel(sola_seen[name], out, 1e-10, f"output of {name}")
    assert_same_model_results(sola_results, torch_results)


@needs_sola
def test_sola_trains_pruned_layers():
    """torch.nn.utils.prune (which sets the weight in a forward pre-hook) on layers the "sola" path fuses:
    two SGD steps give the same weights as with "torch" (the fused path once reused the first step's pruned
    weight and raised "backward through the graph a second time" on the second)."""
    import torch.nn.utils.prune as prune
    weights = {}
    for impl in ("torch", "sola"):
        model = nano_fp64(impl).train()
        block, downsample = model.stages[1].blocks[1], model.stages[1].downsample
        for layer in (block.cpe1, block.norm1, block.in_proj, block.dwc, block.attn.qk, block.attn.lepe,
                      block.cpe2, block.mlp.fc1, downsample.conv[1].conv, downsample.conv[0].conv):
            prune.l1_unstructured(layer, "weight", amount=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            model(image(2, 64, 64, seed=step, dtype=torch.float64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        weights[impl] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, w in weights["torch"].items():
        assert_close_rel(weights["sola"][name], w, 1e-9, name)


@needs_sola
def test_sola_runs_replaced_layers():
    """Layers replaced after building (another activation or norm in a block, the downsample's depthwise stage
    with a BatchNorm and a GELU, a parametrized conv) run as they are under "sola": the same results as
    "torch", and the new layers' parameters get gradients."""
    model = nano_fp64()
    block, downsample = model.stages[2].blocks[0], model.stages[2].downsample
    block.act = torch.nn.GELU()
    block.mlp.act = torch.nn.ReLU()
    block.norm2 = torch.nn.RMSNorm(block.norm2.normalized_shape, dtype=torch.float64)
    model.stages[1].downsample.conv[0].act = torch.nn.GELU()
    downsample.conv[1].act = torch.nn.GELU()
    downsample.conv[1].norm = torch.nn.BatchNorm2d(downsample.conv[1].conv.out_channels, dtype=torch.float64).eval()
    torch.nn.utils.parametrizations.weight_norm(model.stages[3].blocks[1].cpe2)
    x = image(1, 64, 96, dtype=torch.float64)
    model.set_attn_impl("sola")
    sola_results = logits_and_grads(model, x)
    model.set_attn_impl("torch")
    torch_results = logits_and_grads(model, x)
    assert_same_model_results(sola_results, torch_results)
    assert "stages.2.downsample.conv.1.norm.weight" in sola_results[1]


@needs_sola
def test_sola_runs_every_depthwise_conv_on_sola_ops(monkeypatch):
    """attn_impl="sola" runs all the depthwise convs through sola_ops (the blocks' four, stride 1: the two
    CPEs with the LayerNorm after each as depthwise_conv3x3_layer_norm, LePE inside the mixer's autograd
    node; the downsamples', stride 2 with relu on both sides), "torch" none of them; set_attn_impl switches
    the downsamples too."""
    calls, fused, nodes = [], [], []
    real, real_fused = sola_ops.depthwise_conv3x3, sola_ops.depthwise_conv3x3_layer_norm
    real_node = AttentionNode.forward

    def counting_node(ctx, x, *args):
        nodes.append(x.shape)
        return real_node(ctx, x, *args)
    monkeypatch.setattr(AttentionNode, "forward", staticmethod(counting_node))

    def counting(*args, **kwargs):
        calls.append((kwargs.get("stride", 1), kwargs.get("activation"), kwargs.get("input_activation"),
                      kwargs.get("addend") is not None))
        return real(*args, **kwargs)

    def counting_fused(*args, **kwargs):
        fused.append(kwargs.get("residual"))
        return real_fused(*args, **kwargs)
    monkeypatch.setattr(sola_ops, "depthwise_conv3x3", counting)
    monkeypatch.setattr(sola_ops, "depthwise_conv3x3_layer_norm", counting_fused)
    model = tiny(attn_impl="torch").eval()
    blocks = sum(len(stage.blocks) for stage in model.stages)
    with torch.no_grad():
        model(image(1, 64, 64))
        assert calls == [] and fused == [] and nodes == []
        model.set_attn_impl("sola")
        assert model.attn_impl == "sola"
        model(image(1, 64, 64))
    assert fused == [True] * (2 * blocks)  # the CPEs, x + conv(x)
    assert len(nodes) == blocks  # LePE (its sum with the attention output in its pass)
    assert len(calls) == blocks + len(model.stages) - 1
    # the in-block conv with its SiLU
    assert [c for c in calls if c[0] == 1] == [(1, "silu", None, False)] * blocks
    # the downsamples': the conv's ReLU and the expand's ReLU before it in the same pass
    assert [c for c in calls if c[0] == 2] == [(2, "relu", "relu", False)] * (len(model.stages) - 1)


@needs_sola
def test_sola_runs_the_block_layer_norms_on_sola_ops(monkeypatch):
    """attn_impl="sola" runs both LayerNorms of every block on sola_ops' kernels, each with the CPE before
    it as one depthwise_conv3x3_layer_norm, with the norms' own parameters; "torch" none; the final
    LayerNorm2d (NCHW, a subclass) stays nn's."""
    calls = []
    real = sola_ops.depthwise_conv3x3_layer_norm

    def counting(x, conv_weight, conv_bias=None, norm_weight=None, norm_bias=None, *, residual=False, eps=1e-5):
        calls.append((x.shape[-1], norm_weight, norm_bias, eps))
        return real(x, conv_weight, conv_bias, norm_weight, norm_bias, residual=residual, eps=eps)
    monkeypatch.setattr(sola_ops, "depthwise_conv3x3_layer_norm", counting)
    model = tiny(attn_impl="torch").eval()
    norms = [m for stage in model.stages for block in stage.blocks for m in (block.norm1, block.norm2)]
    with torch.no_grad():
        model(image(1, 64, 64))
        assert calls == []
        model.set_attn_impl("sola")
        model(image(1, 64, 64))
    assert len(calls) == len(norms)
    for (C, weight, bias, eps), norm in zip(calls, norms):
        assert C == norm.normalized_shape[0] and weight is norm.weight and bias is norm.bias and eps == norm.eps


def test_stem_runs_channels_last():
    """The stem takes a channels-last copy of an NCHW image, so stage 0's (B, H, W, C) tokens come out
    contiguous (no layout copy in its first conv) in every forward, features_only's included."""
    seen = []
    for features_only in (False, True):
        model = tiny(attn_impl="torch", **({"features_only": True} if features_only else {})).eval()
        stem = model.stem
        hook = stem.register_forward_hook(lambda m, inp, out: seen.append(out))
        with torch.no_grad():
            model(image(1, 64, 64))
        hook.remove()
    assert len(seen) == 2
    for out in seen:
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.permute(0, 2, 3, 1).is_contiguous()


def _aten_ops(fn):
    """The aten ops fn() dispatches, in order (forward and backward, below autograd)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        fn()
    return rec.names


@needs_sola
@pytest.mark.parametrize("mixer", ["L", "S"])
def test_sola_block_moves_no_layout_copies(mixer):
    """A "sola" block's training step copies no tensor to change its layout: the attention outputs come
    in the (B, N, H, D) layout their reshape wants, the gradients of q, k (stacked by unbind) and v in the
    projections' layouts, in_proj / act_proj run as one GEMM, the SiLU gate as sola_ops.silu_mul and the
    MLP's bias + GELU as sola_ops.bias_gelu.
    "torch" (MLLA's code) copies the
    attention output and its q, k, v gradients. Nor does autograd zero-fill the gradients of the ops'
    unused outputs (LayerNorm's statistics, the attention state, an unused lse)."""
    torch.manual_seed(0)
    counts = {}
    for impl in ("torch", "sola"):
        block = SoLABlock(64, 2, mixer=mixer, attn_impl=impl)
        x = torch.randn(2, 6, 5, 64, requires_grad=True)
        ops = _aten_ops(lambda: block(x).square().sum().backward())
        counts[impl] = {name: ops.count(name) for name in ("aten::clone", "aten::zeros", "aten::mm", "aten::addmm",
                                                           "aten::silu", "sola_ops::silu_mul_fwd", "aten::gelu",
                                                           "aten::sum", "sola_ops::bias_gelu_fwd", "aten::add")}
    assert counts["torch"]["aten::clone"] >= 2, counts
    assert counts["sola"]["aten::clone"] == 0 and counts["sola"]["aten::zeros"] == 0, counts
    # the gate y * SiLU(gate) as one kernel
    assert counts["sola"]["aten::silu"] == 0 and counts["sola"]["sola_ops::silu_mul_fwd"] == 1, counts
    # one GEMM fewer forward (in_proj + act_proj) and one fewer for y's gradient backward
    assert counts["sola"]["aten::addmm"] + counts["sola"]["aten::mm"] < \
        counts["torch"]["aten::addmm"] + counts["torch"]["aten::mm"], counts
    # the MLP's fc1 bias + GELU as one kernel, whose backward sums the bias gradient (one aten::sum fewer)
    assert counts["sola"]["aten::gelu"] == 0 and counts["sola"]["sola_ops::bias_gelu_fwd"] == 1, counts
    assert counts["sola"]["aten::sum"] < counts["torch"]["aten::sum"], counts
    # the whole step's adds: the two residual adds forward, none backward: the residual stream's gradients
    # are summed inside the LayerNorms' backward (depthwise_conv3x3_layer_norm), the CPEs' inside their
    # dwconv's, and those of v, the mixer input, by its autograd node (LePE's dx_addend, addmm_)
    assert counts["sola"]["aten::add"] == 2, counts
    # forward, the two residual adds only: the CPEs' and LePE's sums are written by the dwconv kernels
    with torch.no_grad():
        assert _aten_ops(lambda: block(x)).count("aten::add") == 2


@needs_sola
def test_mixers_match_torch():
    """Each mixer alone, including a layout where v (the mixer input) is non-contiguous."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 64, dtype=torch.float64)
    for cls in (LinearAttention, SoftmaxAttention):
        mixer = cls(64, 2, attn_impl="torch").double()
        with torch.no_grad():
            mixer.qk.weight.normal_(0, 0.3)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ref = mixer(xs[0])
        mixer.attn_impl = "sola"
        out = mixer(xs[1].transpose(1, 2).contiguous().transpose(1, 2))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, xs[1], g)[0], torch.autograd.grad(ref, xs[0], g)[0],
                                   rtol=1e-10, atol=1e-10)


@needs_sola
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_mixer_on_cuda(dtype):
    """The linear mixer in a 16-bit dtype on CUDA, where linear_attention(rope=...) runs the fused
    tensor-core kernels: output and gradients (input, qk weight) against the torch impl in fp64, within
    twice the torch impl's own error in that dtype plus a small floor (the FlashAttention rule)."""
    torch.manual_seed(0)
    mixer = LinearAttention(64, 2, attn_impl="torch").double()
    with torch.no_grad():
        mixer.qk.weight.normal_(0, 0.3)
    x = torch.randn(2, 14, 14, 64, dtype=torch.float64)
    g = torch.randn(2, 14, 14, 64, dtype=torch.float64)

    def run(impl, dt, device):
        m = LinearAttention(64, 2, attn_impl=impl).to(device, dt)
        m.load_state_dict(mixer.state_dict())
        xi = x.to(device, dt).requires_grad_(True)
        out = m(xi)
        dx, dw = torch.autograd.grad(out, (xi, m.qk.weight), g.to(device, dt))
        return [t.detach().double().cpu() for t in (out, dx, dw)]

    ref = run("torch", torch.float64, "cpu")
    lowp = run("torch", dtype, "cuda")
    ours = run("sola", dtype, "cuda")
    for name, a, lp, r in zip(("out", "dx", "d qk.weight"), ours, lowp, ref):
        bound = 2 * (lp - r).abs().max().item() + 1e-3 * max(1.0, r.abs().max().item())
        err = (a - r).abs().max().item()
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"


@needs_sola
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_on_cuda(dtype):
    """A whole block in a 16-bit dtype on CUDA (its CPEs, in-block conv and LePE on depthwise_conv3x3,
    the linear mixer on the fused kernels): output and gradients (input, each conv's weight or bias)
    against the torch impl in fp64, within twice the torch impl's own error in that dtype plus a floor."""
    torch.manual_seed(0)
    block = SoLABlock(64, 2, mixer="L", attn_impl="torch").double()
    x = torch.randn(2, 14, 14, 64, dtype=torch.float64)
    g = torch.randn(2, 14, 14, 64, dtype=torch.float64)

    def run(impl, dt, device):
        b = SoLABlock(64, 2, mixer="L", attn_impl=impl).to(device, dt)
        b.load_state_dict(block.state_dict())
        xi = x.to(device, dt).requires_grad_(True)
        out = b(xi)
        wanted = [xi, b.cpe1.weight, b.dwc.weight, b.attn.lepe.weight, b.cpe2.bias]
        grads = torch.autograd.grad(out, wanted, g.to(device, dt))
        return [t.detach().double().cpu() for t in (out, *grads)]

    ref = run("torch", torch.float64, "cpu")
    lowp = run("torch", dtype, "cuda")
    ours = run("sola", dtype, "cuda")
    names = ("out", "dx", "d cpe1.weight", "d dwc.weight", "d lepe.weight", "d cpe2.bias")
    for name, a, lp, r in zip(names, ours, lowp, ref):
        bound = 2 * (lp - r).abs().max().item() + 1e-3 * max(1.0, r.abs().max().item())
        err = (a - r).abs().max().item()
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"


def test_linear_mixer_math():
    """The torch path against the formula written out per query (MLLA's linear attention)."""
    torch.manual_seed(0)
    B, H, W, C, nh = 1, 3, 4, 16, 2
    hd, N = C // nh, H * W
    mixer = LinearAttention(C, nh, attn_impl="torch").double()
    with torch.no_grad():
        mixer.qk.weight.normal_(0, 0.5)
        mixer.lepe.weight.zero_()
        mixer.lepe.bias.zero_()
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    out = mixer(x).reshape(N, nh, hd)
    q, k = mixer.qk(x).reshape(N, 2, nh, hd).unbind(1)
    phi = lambda t: torch.nn.functional.elu(t) + 1  # noqa: E731
    cos, sin = rope_2d_tables(H, W, hd, 10000.0, "cpu", torch.float64)
    v = x.reshape(N, nh, hd)
    for h in range(nh):
        fq, fk = phi(q[:, h]), phi(k[:, h])
        rq, rk = apply_rope(fq, cos, sin), apply_rope(fk, cos, sin)
        for i in range(N):
            num = sum(rq[i].dot(rk[j]) * v[j, h] for j in range(N)) / N
            den = fq[i].dot(fk.mean(0)) + 1e-6
            torch.testing.assert_close(out[i, h], num / den)


# ---- RoPE -------------------------------------------------------------------------------------

def test_rope_matches_mlla_complex_form():
    """MLLA's RoPE (complex rotation, first half of the pairs by row, second half by column), per head."""
    H, W, D, base = 3, 5, 16, 10000.0
    x = torch.randn(2, 4, H * W, D, dtype=torch.float64)
    cos, sin = rope_2d_tables(H, W, D, base, "cpu", torch.float64)
    kmax = D // 4
    theta = 1 / (base ** (torch.arange(kmax, dtype=torch.float64) / kmax))
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    angles = torch.cat([ii[..., None] * theta, jj[..., None] * theta], dim=-1).reshape(H * W, D // 2)
    expected = torch.view_as_real(torch.polar(torch.ones_like(angles), angles)
                                  * torch.view_as_complex(x.reshape(2, 4, H * W, D // 2, 2))).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)


def test_rope_is_relative():
    """<rope(q) at p, rope(k) at p'> depends on p - p' only (q, k the same vectors everywhere)."""
    H, W, D = 6, 7, 32
    cos, sin = rope_2d_tables(H, W, D, 10000.0, "cpu", torch.float64)
    q, k = torch.randn(2, D, dtype=torch.float64)
    rq = apply_rope(q.expand(H * W, D), cos, sin).reshape(H, W, D)
    rk = apply_rope(k.expand(H * W, D), cos, sin).reshape(H, W, D)
    dots = torch.einsum("abd,ced->abce", rq, rk)
    for (a, b, c, e), (da, db) in [((0, 0, 2, 3), (3, 2)), ((1, 4, 0, 1), (4, 2)), ((5, 6, 4, 5), (-4, -5))]:
        torch.testing.assert_close(dots[a, b, c, e], dots[a + da, b + db, c + da, e + db])
    assert not torch.allclose(dots[0, 0, 0, 1], dots[0, 0, 1, 0])  # not trivially constant


def test_rope_tables_built_in_inference_mode_serve_training():
    model = tiny(attn_impl=IMPL)
    with torch.inference_mode():
        model.eval()(image(1, 96, 32))  # a resolution no other test uses: fills the cache here
    model.train()(image(2, 96, 32)).sum().backward()


# ---- features ---------------------------------------------------------------------------------

def test_features_only():
    torch.manual_seed(0)
    x = image(1, 64, 96)
    model = timm.create_model("sola_vision_tiny", features_only=True, attn_impl=IMPL)
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // r, 96 // r) for c, r in zip([64, 128, 256, 512],
                                                                                      [4, 8, 16, 32])]
    model = timm.create_model("sola_vision_base", features_only=True, out_indices=(1, 3), attn_impl="torch")
    assert model.feature_info.channels() == [192, 768] and model.feature_info.reduction() == [8, 32]
    assert [tuple(f.shape) for f in model(x)] == [(1, 192, 8, 12), (1, 768, 2, 3)]
    model = timm.create_model("sola_vision_tiny", features_only=True, out_indices=(0, 2), feature_cls="getter",
                              attn_impl="torch")
    assert [tuple(f.shape) for f in model(x)] == [(1, 64, 16, 24), (1, 256, 4, 6)]


@needs_sola
def test_set_attn_impl_on_feature_wrappers():
    """sola_vision.set_attn_impl switches a features_only model (timm's wrappers have no such method): the
    same features as one built with that impl; a module without SoLA-Vision layers is a clear error."""
    x = image(1, 64, 96)
    for feature_cls in (None, "getter"):
        kwargs = {"feature_cls": feature_cls} if feature_cls else {}
        built = {}
        for impl in ("sola", "torch"):
            torch.manual_seed(0)
            built[impl] = timm.create_model("sola_vision_nano", features_only=True, attn_impl=impl, **kwargs).eval()
        assert sola_vision.set_attn_impl(built["sola"], "torch") is built["sola"]
        with torch.no_grad():
            for a, b in zip(built["sola"](x), built["torch"](x)):
                assert torch.equal(a, b)
        sola_vision.set_attn_impl(built["torch"], "sola")
        assert {m.attn_impl for m in built["torch"].modules() if hasattr(m, "attn_impl")} == {"sola"}
    with pytest.raises(ValueError, match="attn_impl must be"):
        sola_vision.set_attn_impl(built["torch"], "cuda")
    with pytest.raises(ValueError, match="holds no SoLA-Vision layers"):
        sola_vision.set_attn_impl(torch.nn.Linear(2, 2), "torch")


def test_features_only_fx():
    """timm's FX feature extraction (feature_cls="fx") traces the model with the blocks and downsamples as leaf
    modules: the same features as the default feature wrapper, either impl."""
    x = image(1, 64, 96)
    for impl in sorted({IMPL, "torch"}):
        feats, wrappers = [], []
        for feature_cls in ("fx", None):
            torch.manual_seed(0)
            kwargs = {"feature_cls": feature_cls} if feature_cls else {}
            model = timm.create_model("sola_vision_nano", features_only=True, attn_impl=impl, **kwargs).eval()
            with torch.no_grad():
                feats.append(model(x))
            wrappers.append(type(model).__name__)
        assert wrappers == ["FeatureGraphNet", "FeatureListNet"] and len(feats[0]) == 4
        for a, b in zip(*feats):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_intermediates():
    model = tiny(attn_impl=IMPL).eval()
    x = image(1, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [64, 128, 256, 512]
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2[0], inter[2])
        torch.testing.assert_close(last2[1], inter[3])
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1])
        kept = model.prune_intermediate_layers(indices=[0, 1], prune_head=False)
        assert kept == [0, 1] and len(model.stages) == 2 and model.num_features == 128
        assert model.num_classes == 0  # the pruned head has no classifier
        torch.testing.assert_close(model.forward_features(x), inter[1])
        assert model(x).shape == (1, 128, 8, 12)  # the pruned head has no pooling (as in timm)


def test_grad_checkpointing():
    model = tiny(attn_impl=IMPL, num_classes=5).train()
    x = image(2)

    def run():
        saved = []
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    out0, g0, saved0 = run()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    out1, g1, saved1 = run()
    assert saved1 < saved0 / 2, f"checkpointing saved {saved1} elements for backward, without {saved0}"
    torch.testing.assert_close(out1, out0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- FLOPs ------------------------------------------------------------------------------------

def linear_flops_by_hand(B, H, N, D):
    # state phi(k)^T v, numerator phi(q) S, normaliser phi(qn) z: 2 flops per multiply-add
    return 2 * B * H * (N * D * D) + 2 * B * H * (N * D * D) + 2 * B * H * (N * D)


@needs_sola
def test_flops_of_sola_ops_are_counted():
    from torch.utils.flop_counter import FlopCounterMode
    B, H, N, D = 2, 3, 10, 8
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        sola_ops.linear_attention(q, k, v)
    assert fc.get_total_flops() == linear_flops_by_hand(B, H, N, D)
    with FlopCounterMode(display=False) as fc:
        sola_ops.linear_attention(q, k, v).sum().backward()
    assert fc.get_total_flops() == 3 * linear_flops_by_hand(B, H, N, D)
    with FlopCounterMode(display=False) as fc:
        sola_ops.softmax_attention(q, k, v).sum().backward()
    assert fc.get_total_flops() == 4 * B * H * N * N * D + 10 * B * H * N * N * D  # fwd + 2.5x fwd


@needs_sola
def test_flops_one_softmax_layer():
    """Swapping block 0 of stage 3 from linear to softmax changes the count by exactly the analytic difference."""
    B, img = 2, 128
    N, H, D = (img // 16) ** 2, 8, 32  # stage 3: stride 16, 8 heads of 32
    lin = tiny(ALL_L, attn_impl="sola")
    sm = tiny("LL-LLLL-SLLLLLLL-LLLL", attn_impl="sola")
    softmax_fwd = 4 * B * H * N * N * D
    linear_fwd = linear_flops_by_hand(B, H, N, D)
    fwd_diff = sola_vision.flops(sm, img, batch_size=B) - sola_vision.flops(lin, img, batch_size=B)
    assert fwd_diff == softmax_fwd - linear_fwd
    total_diff = (sola_vision.flops(sm, img, batch_size=B, backward=True)
                  - sola_vision.flops(lin, img, batch_size=B, backward=True))
    assert total_diff == (softmax_fwd * 7 // 2) - 3 * linear_fwd
    assert fwd_diff != 0


def torch_depthwise_overcount(model, img_size):
    """What FlopCounterMode counts for the backward of the depthwise 3x3 convs (the blocks' and the
    downsamples' stride-2 ones, which the sola path runs as sola_ops.depthwise_conv3x3) beyond two
    convolutions' worth: torch 2.x counts a grouped conv's weight gradient as if it were ungrouped, C
    times too many; 0 once torch counts right."""
    from torch.utils.flop_counter import FlopCounterMode
    shapes = []
    hooks = [m.register_forward_hook(lambda m, args, out: shapes.append((m.stride, tuple(args[0].shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, *img_size))
    finally:
        for h in hooks:
            h.remove()
    assert len(shapes) == 4 * sum(len(stage.blocks) for stage in model.stages) + len(model.stages) - 1
    extra = 0
    for stride, (B, C, H, W) in shapes:
        conv = torch.nn.Conv2d(C, C, 3, stride=stride, padding=1, groups=C, device="meta")
        x = torch.randn(B, C, H, W, device="meta", requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            out = conv(x)
            out.sum().backward()
        extra += fc.get_total_flops() - 3 * sola_vision.depthwise_conv3x3_flops(out.permute(0, 2, 3, 1).shape)
    return extra


@needs_sola
def test_flops_sola_equals_torch_with_softmax():
    """attn_impl="torch" softmax layers count on the CPU as the sola ones (FlopCounterMode has no formula of
    its own for torch's CPU SDPA kernel; sola_vision registers SDPA's)."""
    model = tiny("LL-LLLL-SLLLLLLL-LLLS", attn_impl="sola")
    sola_fwd, sola_all = sola_vision.flops(model, 64), sola_vision.flops(model, (64, 96), backward=True)
    model.set_attn_impl("torch")
    assert sola_vision.flops(model, 64) == sola_fwd
    assert sola_all == sola_vision.flops(model, (64, 96), backward=True) - torch_depthwise_overcount(model, (64, 96))


@needs_sola
def test_flops_sola_equals_torch_for_linear():
    """The custom-op formulas count what FlopCounterMode counts for MLLA's einsum form."""
    model = tiny(ALL_L, attn_impl="sola")
    sola_fwd, sola_all = sola_vision.flops(model, 64), sola_vision.flops(model, (64, 96), backward=True)
    model.set_attn_impl("torch")
    assert sola_fwd == sola_vision.flops(model, 64)
    torch_all = sola_vision.flops(model, (64, 96), backward=True)
    assert sola_all == torch_all - torch_depthwise_overcount(model, (64, 96))
    assert all(p.grad is None for p in model.parameters())  # flops() leaves no gradients behind
    # MLLA-T is 4.2 GMACs at 224
    assert 8.0e9 < sola_vision.flops(timm.create_model("sola_vision_tiny_linear", attn_impl="torch"), 224) < 8.8e9


# ---- torch.compile ----------------------------------------------------------------------------

@needs_sola
def test_compile_fullgraph_tiny():
    """Traces the whole tiny model (both custom ops, forward and backward) without graph breaks;
    aot_eager runs the traced graphs without code generation, which keeps this test fast."""
    torch._dynamo.reset()
    model = sharpen_attention(tiny("LL-LLLL-LLLSLLLS-LLLS", attn_impl="sola", num_classes=5)).eval()
    x = image(2)
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@needs_sola
def test_compile_fullgraph_tiny_inductor():
    """Inductor code generation of the tiny model's forward (about 100 s on 2 CPU cores)."""
    torch._dynamo.reset()
    model = tiny("LL-LLLL-LLLSLLLS-LLLS", attn_impl="sola").eval()
    x = image(1)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-5)


@needs_sola
def test_compile_dynamic_training():
    """torch.compile(dynamic=True) traces a training step through the mixer node (its eps was a symbolic
    float, which Dynamo failed to lift into the node), with the same gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("sola_vision_nano", layer_pattern="L-LS-LLLL-LL", num_classes=3).train()
    x = image(2, 64, 64)
    ref = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.slow
@needs_sola
def test_export_with_dynamic_batch_and_size():
    """torch.export of a hybrid model with the batch and the image size dynamic (multiples of 32, as the
    model takes them): the exported program runs the custom ops at other sizes like eager (~100 s). From
    64 px up: export assumes a dynamic size is never 1 (stage 4 of a 32 px image has 1 x 1 tokens)."""
    torch.manual_seed(0)
    model = timm.create_model("sola_vision_nano", layer_pattern="L-LS-LLLS-LL", num_classes=4).eval()
    Dim = torch.export.Dim
    size = {0: Dim("batch", min=1, max=64), 2: 32 * Dim("h", min=2, max=32), 3: 32 * Dim("w", min=2, max=32)}
    exported = torch.export.export(model, (image(2),), dynamic_shapes={"x": size}).module()
    for x in (image(2), image(3, 96, 64, seed=1), image(1, 64, 160, seed=2)):
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
def test_jit_script_says_it_is_not_supported():
    model = timm.create_model("sola_vision_nano", attn_impl="torch")
    with pytest.raises(RuntimeError, match="torch.jit.script; use torch.compile"):
        torch.jit.script(model)
    traced = torch.jit.trace(model.eval(), image(1, 32, 32))  # tracing works
    torch.testing.assert_close(traced(image(1, 32, 32, seed=1)), model(image(1, 32, 32, seed=1)))


def test_weight_init_skip():
    torch.manual_seed(0)
    default = timm.create_model("sola_vision_nano", attn_impl="torch")
    torch.manual_seed(0)
    skipped = timm.create_model("sola_vision_nano", attn_impl="torch", weight_init="skip")
    w_default, w_skipped = default.stages[0].blocks[0].attn.qk.weight, skipped.stages[0].blocks[0].attn.qk.weight
    assert 0.015 < w_default.std().item() < 0.025  # the model's truncated normal, std 0.02
    assert w_skipped.std().item() > 0.05  # nn.Linear's own init: uniform(+-1/sqrt(fan_in)), fan_in 32
    with pytest.raises(ValueError, match="weight_init"):
        timm.create_model("sola_vision_nano", weight_init="xavier")


@needs_sola
def test_double_backward_r1_penalty_matches_attn_impl_torch():
    """An R1-style gradient penalty (the squared norm of the input gradient, differentiated for the weights)
    through a hybrid model: create_graph=True through the kernels' reference derivatives, against plain PyTorch
    (SDPA's math backend: its CPU flash kernel has no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    grads = {}
    for impl in ("sola", "torch"):
        torch.manual_seed(0)
        model = timm.create_model("sola_vision_nano", num_classes=3, attn_impl=impl).double().eval()
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        with sdpa_kernel(SDPBackend.MATH):
            (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
            grads[impl] = torch.autograd.grad(gx.square().sum(), list(model.parameters()), allow_unused=True,
                                              materialize_grads=True)
    for (name, _), a, b in zip(model.named_parameters(), grads["sola"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert grads["sola"][0].abs().sum() > 0
