"""sola_ops.rope: the feature map fused with the rotary embedding, forward and backward, against the
fp64 reference (FlashAttention tolerance rule, conftest.py), on awkward sizes and layouts."""
import pytest
import torch

import sola_ops
from sola_ops import reference
from conftest import DEVICES, DTYPES, FEATURE_MAPS, assert_fa_close, leaf, randn, strided_like, upcast

ops = torch.ops.sola_ops


def tables(N, D, device="cpu", dtype=torch.float32, seed=3):
    """cos, sin (N, D / 2) of random angles (not a real RoPE schedule: every entry differs)."""
    angles = randn((N, D // 2), torch.float32, seed=seed, scale=3.0)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def rope_lowp(x, cos, sin, feature_map="identity"):
    """The same computation by plain PyTorch in x's dtype (each op rounds), as a model writes it."""
    f = reference.FEATURE_MAPS[feature_map](x)
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    f0, f1 = f[..., 0::2], f[..., 1::2]
    return torch.stack((f0 * c - f1 * s, f0 * s + f1 * c), dim=-1).flatten(-2), f


def check_rope(x, cos, sin, feature_map="identity", grad=True):
    """rot and phi(x) and, with grad, dx (from random gradients of both outputs) against the fp64
    reference, with the FlashAttention rule."""
    dtype = x.dtype
    x = leaf(x, grad)
    rot, feat = sola_ops.rope(x, cos, sin, feature_map=feature_map, return_features=True)
    assert rot.dtype == dtype and rot.shape == x.shape and feat.shape == x.shape
    (x64,) = upcast([x])
    rot64, feat64 = reference.rope(x64, cos.double(), sin.double(), feature_map=feature_map, return_features=True)
    (xlp,) = upcast([x], dtype)
    rot_lp, feat_lp = rope_lowp(xlp, cos, sin, feature_map)
    assert_fa_close(rot, rot64, rot_lp, dtype, "rope rot")
    assert_fa_close(feat, feat64, feat_lp, dtype, "rope feat")
    if not grad:
        return rot
    g_rot, g_feat = randn(x.shape, dtype, x.device, seed=7), randn(x.shape, dtype, x.device, seed=8)
    (dx,) = torch.autograd.grad((rot, feat), (x,), (g_rot, g_feat))
    (dx64,) = torch.autograd.grad((rot64, feat64), (x64,), (g_rot.double(), g_feat.double()))
    (dx_lp,) = torch.autograd.grad(rope_lowp(xlp, cos, sin, feature_map), (xlp,), (g_rot, g_feat))
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_fa_close(dx, dx64, dx_lp, dtype, "rope dx")
    return rot


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_feature_map(device, dtype, feature_map):
    x = randn((2, 3, 17, 32), dtype, device)
    cos, sin = tables(17, 32, device)
    check_rope(x, cos, sin, feature_map)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,D", [(1, 2), (7, 6), (113, 10), (5, 58), (3, 256), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_awkward_sizes(device, dtype, N, D):
    x = randn((2, 2, N, D), dtype, device)
    cos, sin = tables(N, D, device)
    check_rope(x, cos, sin, "elu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["transposed", "slice", "lastdim"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_strided_inputs(device, dtype, kind):
    """Views go in as they are (slice: odd offsets and strides, so element loads on CUDA)."""
    x = strided_like(randn((2, 3, 9, 24), dtype, device), kind)
    cos, sin = tables(9, 24, device)
    check_rope(x, cos, sin, "elu")


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_one_output(device):
    """Only rot (or only phi(x)) used: the other output's gradient is absent, not garbage."""
    x = leaf(randn((2, 2, 5, 8), torch.float64, device))
    cos, sin = tables(5, 8, device)
    g = randn(x.shape, torch.float64, device, seed=9)
    for pick in (0, 1):
        out = sola_ops.rope(x, cos, sin, feature_map="elu", return_features=True)[pick]
        ref = reference.rope(x, cos.double(), sin.double(), feature_map="elu", return_features=True)[pick]
        (dx,) = torch.autograd.grad(out, x, g)
        (dx_ref,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("return_features", [False, True])
def test_gradcheck(device, feature_map, return_features):
    x = leaf(randn((1, 2, 6, 8), torch.float64, device, scale=2.0))
    cos, sin = (t.double() for t in tables(6, 8, device))
    fn = lambda x: sola_ops.rope(x, cos, sin, feature_map=feature_map, return_features=return_features)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


def test_matches_the_model_rope():
    """The pair convention is the one SoLA-Vision's apply_rope uses (channels 2p, 2p+1 rotate together)."""
    from sola_vision.layers import apply_rope, rope_2d_tables
    cos, sin = rope_2d_tables(4, 6, 32, 10000.0, "cpu", torch.float64)
    x = randn((2, 3, 24, 32), torch.float64)
    torch.testing.assert_close(sola_ops.rope(x, cos, sin), apply_rope(x, cos, sin), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_table_dtypes(device):
    """Tables of any float dtype are used in fp32: bf16 tables give what their fp32 values give."""
    x = randn((1, 2, 7, 16), torch.bfloat16, device)
    cos, sin = tables(7, 16, device, torch.bfloat16)
    torch.testing.assert_close(sola_ops.rope(x, cos, sin), sola_ops.rope(x, cos.float(), sin.float()),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 0, 5, 8), (2, 2, 0, 8), (2, 2, 5, 0)])
def test_empty(device, shape):
    x = leaf(randn(shape, torch.float32, device))
    cos, sin = tables(shape[2], shape[3], device)
    rot, feat = sola_ops.rope(x, cos, sin, feature_map="elu", return_features=True)
    assert rot.shape == feat.shape == x.shape
    (rot.sum() + feat.sum()).backward()
    assert x.grad.shape == x.shape and (x.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_pair(device):
    x = randn((1, 1, 3, 8), torch.float32, device)
    x[0, 0, 1, 4] = float("nan")
    cos, sin = tables(3, 8, device)
    rot = sola_ops.rope(x, cos, sin, feature_map="elu")
    nan = torch.isnan(rot)
    assert nan[0, 0, 1, 4:6].all() and nan.sum() == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", ["elu", "relu", "identity"])
def test_gradient_at_nan_input(device, feature_map):
    """relu and identity pass the gradient at a NaN input, as torch's backwards do; elu's derivative
    exp(x) stays NaN there (torch's own elu_backward gives 1 or NaN depending on the tensor's length:
    its scalar and vectorised CPU loops differ). Every other element matches the reference."""
    x = randn((1, 1, 3, 8), torch.float32, device)
    x[0, 0, 1, 4] = float("nan")
    cos, sin = tables(3, 8, device)
    xs = [leaf(x.clone()) for _ in range(2)]
    sola_ops.rope(xs[0], cos, sin, feature_map=feature_map).sum().backward()
    reference.rope(xs[1], cos, sin, feature_map=feature_map).sum().backward()
    ours, ref = xs[0].grad, xs[1].grad
    nan = ours.isnan()
    assert nan.sum() == (feature_map == "elu") and nan[0, 0, 1, 4] == (feature_map == "elu")
    torch.testing.assert_close(ours[~nan], ref[~nan])


def test_bad_input():
    x = randn((2, 2, 5, 8), torch.float32)
    cos, sin = tables(5, 8)
    cases = [
        ((x[0], cos, sin), {}, "x must be 4-D"),
        ((x[..., :7], cos[:, :3], sin[:, :3]), {}, "even head dim"),
        ((x, cos[:4], sin), {}, "cos must be"),
        ((x, cos, sin.t()), {}, "sin must be"),
        ((x, cos, (sin * 8).int()), {}, "sin must be a floating-point"),
        ((x.int(), cos, sin), {}, "x must be float16"),
        ((x, cos, sin.to("meta")), {}, "sin must be on the device of x"),
        ((x, cos, sin), {"feature_map": "gelu"}, "feature_map must be"),
        ((x, cos.detach().requires_grad_(), sin), {}, "cos and sin require grad"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sola_ops.rope(*args, **kwargs)
    with pytest.raises(TypeError, match="cos must be a torch.Tensor"):
        sola_ops.rope(x, [1.0], sin)


def test_raw_op_checks():
    """The C++ ops check for themselves (callers of torch.ops.sola_ops skip the Python checks)."""
    x = randn((2, 2, 5, 8), torch.float32)
    cos, sin = tables(5, 8)
    with pytest.raises(ValueError, match="cos must be"):
        ops.rope_fwd(x, cos[:2], sin, "elu", False)
    with pytest.raises(ValueError, match="even head dim"):
        ops.rope_fwd(x[..., :7], cos[:, :3], sin[:, :3], "elu", False)
    with pytest.raises(ValueError, match="grad_rot must have the shape of x"):
        ops.rope_bwd(x[:1], None, x, cos, sin, "elu")
    with pytest.raises(ValueError, match="grad_feat must have the dtype of x"):
        ops.rope_bwd(x, x.double(), x, cos, sin, "elu")


@pytest.mark.parametrize("with_features", [False, True])
def test_opcheck(with_features):
    x = randn((2, 3, 6, 8), torch.float32)
    cos, sin = tables(6, 8)
    torch.library.opcheck(ops.rope_fwd.default, (leaf(x), cos, sin, "elu", with_features))
    g = randn(x.shape, torch.float32, seed=5)
    torch.library.opcheck(ops.rope_bwd.default, (g, g if with_features else None, x, cos, sin, "elu"))


def test_compile(fresh_dynamo):
    """fullgraph compile with a dynamic size, forward and backward, against eager."""
    def fn(x, cos, sin):
        rot, feat = sola_ops.rope(x, cos, sin, feature_map="elu", return_features=True)
        return rot * feat
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for N in (5, 9):
        x = leaf(randn((2, 2, N, 8), torch.float32))
        cos, sin = tables(N, 8)
        out = compiled(x, cos, sin)
        (dx,) = torch.autograd.grad(out.sum(), x)
        x2 = leaf(x.detach())
        (dx2,) = torch.autograd.grad(fn(x2, cos, sin).sum(), x2)
        torch.testing.assert_close(out, fn(x2, cos, sin), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx, dx2, rtol=1e-6, atol=1e-6)
