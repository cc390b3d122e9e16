"""The "sola" token mixer as one autograd node (models/attention_node.py): the same values and gradients as
the public ops composed as separate nodes, gradcheck, frozen parts, autocast, the fallback for replaced
layers, and double backward. CPU; the mixer on CUDA is tested in test_models.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("timm")
sola_ops = pytest.importorskip("sola_ops")
from sola_vision.attention_node import AttentionNode  # noqa: E402
from sola_vision.layers import LinearAttention, SoftmaxAttention  # noqa: E402

MIXERS = [LinearAttention, SoftmaxAttention]


def separate_ops(mixer, x):
    """The mixer written with the public ops, each its own autograd node: qk linear, attention with RoPE,
    LePE with the attention output as its addend."""
    B, H, W, C = x.shape
    heads, hd = mixer.num_heads, mixer.head_dim
    qk = F.linear(x, mixer.qk.weight, mixer.qk.bias).reshape(B, H * W, 2, heads, hd)
    q, k = (t.transpose(1, 2) for t in qk.unbind(2))
    v = x.reshape(B, H * W, heads, hd).transpose(1, 2)
    cos, sin = mixer.kernel_tables(x, H, W)
    if mixer.letter == "L":
        out = sola_ops.linear_attention(q, k, v, feature_map="elu", eps=mixer.eps, rope=(cos, sin))
    else:
        out = sola_ops.softmax_attention(sola_ops.rope(q, cos, sin), sola_ops.rope(k, cos, sin), v)
    out = out.transpose(1, 2).reshape(B, H, W, C)
    return sola_ops.depthwise_conv3x3(x, mixer.lepe.weight, mixer.lepe.bias, addend=out)


def make(cls, dim=64, heads=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    mixer = cls(dim, heads, attn_impl="sola").to(dtype)
    with torch.no_grad():
        mixer.qk.weight.normal_(0, 0.3)
    return mixer


def grads(fn, mixer, x, g):
    x = x.detach().requires_grad_(True)
    out = fn(x)
    wanted = [x] + [p for p in mixer.parameters() if p.requires_grad]
    return [out.detach()] + list(torch.autograd.grad(out, wanted, g))


@pytest.mark.parametrize("cls", MIXERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("heads", [1, 2])
def test_node_matches_separate_ops(cls, dtype, tol, heads):
    """Output and every gradient as the separate ops give them (x's gradient summed in another order)."""
    mixer = make(cls, heads=heads, dtype=dtype)
    x = torch.randn(2, 5, 7, 64, dtype=dtype)
    g = torch.randn_like(x)
    ours = grads(mixer, mixer, x, g)
    want = grads(lambda t: separate_ops(mixer, t), mixer, x, g)
    assert len(ours) == len(want) == 6
    for a, b in zip(ours, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls", MIXERS)
def test_node_gradcheck(cls):
    mixer = make(cls, dim=8, heads=2)
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = mixer.kernel_tables(x, 3, 4)

    def fn(x, w, b, lw, lb):
        return AttentionNode.apply(x, w, b, lw, lb, mixer.letter, 2, cos, sin, mixer.eps)
    params = [p.detach().clone().requires_grad_(True) for p in (mixer.qk.weight, mixer.qk.bias, mixer.lepe.weight,
                                                                mixer.lepe.bias)]
    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("cls", MIXERS)
@pytest.mark.parametrize("frozen", ["qk", "lepe", "x", "qk+x"])
def test_node_frozen_parts(cls, frozen):
    """Frozen parameters or an input without grad: the others' gradients unchanged, none for the frozen."""
    mixer = make(cls)
    x = torch.randn(2, 5, 7, 64, dtype=torch.float64)
    g = torch.randn_like(x)
    full = dict(zip(["x"] + [n for n, _ in mixer.named_parameters()], grads(mixer, mixer, x, g)[1:]))
    for name, p in mixer.named_parameters():
        p.requires_grad_(name.split(".")[0] not in frozen)
    x = x.requires_grad_("x" not in frozen)
    wanted = ([x] if x.requires_grad else []) + [p for p in mixer.parameters() if p.requires_grad]
    names = (["x"] if x.requires_grad else []) + [n for n, p in mixer.named_parameters() if p.requires_grad]
    for name, got in zip(names, torch.autograd.grad(mixer(x), wanted, g)):
        torch.testing.assert_close(got, full[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", MIXERS)
def test_node_under_autocast(cls):
    """bf16 autocast on the CPU: the weights cast as autocast casts them for the linear layer, fp32
    parameters' gradients in fp32, the same values as the separate ops under the same autocast."""
    mixer = make(cls, dtype=torch.float32)
    x = torch.randn(2, 5, 7, 64)
    g = torch.randn(2, 5, 7, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(mixer, mixer, x.bfloat16(), g)
        want = grads(lambda t: separate_ops(mixer, t.to(torch.bfloat16)), mixer, x.bfloat16(), g)
    assert ours[0].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in ours[2:])
    for a, b in zip(ours, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_node_replaced_layer_runs_as_separate_ops():
    """A qk layer that is not a plain nn.Linear (a subclass, e.g. a LoRA wrapper) is called as a module:
    the mixer then runs the ops one node each, with the same result."""
    calls = []

    class Counted(nn.Linear):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)
    mixer = make(LinearAttention)
    x = torch.randn(2, 5, 7, 64, dtype=torch.float64)
    g = torch.randn_like(x)
    want = grads(mixer, mixer, x, g)
    counted = Counted(64, 128).double()
    counted.load_state_dict(mixer.qk.state_dict())
    mixer.qk = counted
    for a, b in zip(grads(mixer, mixer, x, g), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1


@pytest.mark.parametrize("cls", MIXERS)
@pytest.mark.parametrize("target", ["all", "qk.weight", "qk.bias", "lepe.weight"])
def test_node_double_backward_matches_attn_impl_torch(cls, target):
    """A second-order gradient through the node (create_graph=True: the node's computation differentiated in
    reference ops) equals attn_impl="torch"'s, whichever leaf it is taken for (one taken for a weight alone
    must not come out as a partial derivative)."""
    second = {}
    for impl in ("sola", "torch"):
        mixer = make(cls)
        mixer.attn_impl = impl
        x = torch.randn(1, 4, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        with sdpa_kernel(SDPBackend.MATH):  # torch's CPU flash SDPA has no double backward
            (dx,) = torch.autograd.grad((mixer(x) * g).sum(), x, create_graph=True)
            leaves = [x, *mixer.parameters()] if target == "all" else [mixer.get_parameter(target)]
            # LePE's bias shifts the output only: dx does not depend on it (a zero second derivative)
            second[impl] = torch.autograd.grad(dx.square().sum(), leaves, allow_unused=True, materialize_grads=True)
    for a, b in zip(second["sola"], second["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert second["sola"][0].abs().sum() > 0


def test_node_gradgradcheck():
    mixer = make(LinearAttention, dim=8, heads=2)
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = mixer.kernel_tables(x, 3, 4)
    params = [p.detach().clone().requires_grad_(True) for p in mixer.parameters()]
    assert torch.autograd.gradgradcheck(
        lambda x, w, b, lw, lb: AttentionNode.apply(x, w, b, lw, lb, "L", 2, cos, sin, mixer.eps), (x, *params))


@pytest.mark.parametrize("cls", MIXERS)
def test_node_empty_batch(cls):
    """An empty batch: empty output, zero gradients (as the separate ops give)."""
    mixer = make(cls)
    x = torch.randn(0, 4, 4, 64, dtype=torch.float64)
    g = torch.randn_like(x)
    for a, b in zip(grads(mixer, mixer, x, g), grads(lambda t: separate_ops(mixer, t), mixer, x, g)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_node_not_used_where_it_would_skip_something():
    """Hooks on the qk layer or on LePE (old-style weight_norm sets the weight in one) and a subclass of the
    mixer take the path that calls those layers; the values are the same. A global module hook (FlopCounterMode's
    module tracker sets one) leaves the node in use."""
    calls = []

    class Subclassed(LinearAttention):
        pass
    for setup in ("qk hook", "qk pre-hook", "lepe hook", "subclass", "weight_norm"):
        mixer = make(Subclassed if setup == "subclass" else LinearAttention)
        x = torch.randn(2, 5, 7, 64, dtype=torch.float64)
        g = torch.randn_like(x)
        want = grads(mixer, mixer, x, g)[:2]
        handle = None
        if setup == "qk hook":
            handle = mixer.qk.register_forward_hook(lambda m, args, out: calls.append(setup))
        elif setup == "qk pre-hook":
            handle = mixer.qk.register_forward_pre_hook(lambda m, args: calls.append(setup))
        elif setup == "lepe hook":
            handle = mixer.lepe.register_forward_hook(lambda m, args, out: calls.append(setup))
        elif setup == "weight_norm":
            with pytest.warns(FutureWarning):
                nn.utils.weight_norm(mixer.qk)
        try:
            assert not mixer.node_applies(x)
            got = grads(mixer, mixer, x, g)[:2]
        finally:
            if handle is not None:
                handle.remove()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert calls == ["qk hook", "qk pre-hook", "lepe hook"]
    assert make(LinearAttention).node_applies(x)
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        assert make(LinearAttention).node_applies(x)
    finally:
        handle.remove()
