"""sola_ops.depthwise_conv3x3(..., addend=a): a + conv(x) in one pass (SoLA-Vision's attention output
plus its LePE conv), forward and backward, against the fp64 reference; layouts, NaN, bad input, the
raw op's schema and compile."""
import pytest
import torch
import torch.nn.functional as F

import sola_ops
from sola_ops import reference
from conftest import DEVICES, DTYPES, assert_fa_close, leaf, randn, requires_cuda, upcast
from test_ops_dwconv import dwconv_lowp, out_shape, params

ops = torch.ops.sola_ops

# (residual, activation, stride, input_activation): every combination the addend takes
OPTIONS = [(False, None, 1, None), (True, None, 1, None), (False, "silu", 1, None), (False, None, 2, None),
           (False, "silu", 2, None), (False, None, 1, "relu"), (False, "silu", 2, "relu")]


def options(residual, activation, stride, input_activation):
    return dict(residual=residual, activation=activation, stride=stride, input_activation=input_activation)


def check_addend(x, weight, bias, addend, **opts):
    """out and every gradient (dx, dweight, dbias, daddend) against the fp64 reference and a PyTorch
    composite in the input dtype (FlashAttention rule); daddend is the output's gradient itself."""
    dtype = x.dtype
    x, weight, bias, addend = (leaf(t) for t in (x, weight, bias, addend))
    out = sola_ops.depthwise_conv3x3(x, weight, bias, addend=addend, **opts)
    assert out.dtype == dtype and out.shape == out_shape(x, opts.get("stride", 1))
    x64, w64, b64, a64 = upcast([x, weight, bias, addend])
    out64 = reference.depthwise_conv3x3(x64, w64, b64, addend=a64, **opts)
    xlp, wlp, blp, alp = upcast([x, weight, bias, addend], dtype)
    out_lp = alp + dwconv_lowp(xlp, wlp, blp, **opts)
    assert_fa_close(out, out64, out_lp, dtype, "dwconv+addend out")
    g = randn(out.shape, dtype, x.device, seed=7)
    grads = torch.autograd.grad(out, (x, weight, bias, addend), g)
    grads64 = torch.autograd.grad(out64, (x64, w64, b64, a64), g.double())
    grads_lp = torch.autograd.grad(out_lp, (xlp, wlp, blp, alp), g)
    for name, t, ours, r64, rlp in zip(("dx", "dweight", "dbias", "daddend"), (x, weight, bias, addend), grads,
                                       grads64, grads_lp):
        assert ours.dtype == t.dtype and ours.shape == t.shape, name
        assert_fa_close(ours, r64, rlp, dtype, f"dwconv+addend {name}")
    assert torch.equal(grads[3], g)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_addend(device, dtype, opts):
    x = randn((2, 9, 7, 12), dtype, device)
    weight, bias = params(12, device, dtype)
    addend = randn(out_shape(x, opts[2]), dtype, device, seed=3)
    check_addend(x, weight, bias, addend, **options(*opts))


@pytest.mark.parametrize("device", DEVICES)
def test_addend_is_the_sum(device):
    """Exactly conv(x) + addend in fp64 (one rounding of the same fp64 sum either way)."""
    x = randn((2, 6, 5, 8), torch.float64, device)
    weight, bias = params(8, device, torch.float64)
    addend = randn(x.shape, torch.float64, device, seed=3)
    torch.testing.assert_close(sola_ops.depthwise_conv3x3(x, weight, bias, addend=addend),
                               sola_ops.depthwise_conv3x3(x, weight, bias) + addend, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W,C,stride", [(1, 1, 1, 1), (1, 2, 3, 2), (5, 7, 66, 2), (9, 17, 66, 1), (3, 33, 200, 1)])
def test_addend_awkward_sizes(device, H, W, C, stride):
    x = randn((2, H, W, C), torch.bfloat16, device)
    weight, bias = params(C, device)
    addend = randn(out_shape(x, stride), torch.bfloat16, device, seed=3)
    check_addend(x, weight, bias, addend, stride=stride)


def strided_tokens(kind, shape, device):
    """A non-contiguous fp16 (B, H, W, C) view: "transposed" (H and W swapped), "slice" (odd offsets in every
    dim, the channel dim contiguous) or "lastdim" (every other channel)."""
    B, H, W, C = shape
    if kind == "transposed":
        t = randn((B, W, H, C), torch.float16, device, seed=3).transpose(1, 2)
    elif kind == "slice":
        t = randn((B + 1, H + 2, W + 3, C + 5), torch.float16, device, seed=3)[1:, 1:H + 1, 2:W + 2, 3:C + 3]
    else:
        t = randn((B, H, W, 2 * C), torch.float16, device, seed=3)[..., ::2]
    assert not t.is_contiguous()
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["transposed", "slice", "lastdim"])
@pytest.mark.parametrize("stride", [1, 2])
def test_addend_strided(device, kind, stride):
    """An addend view with the channel dim contiguous is read in place (slice: odd offsets, so one-channel
    loads on CUDA), a non-contiguous channel dim is copied; the values are the same either way."""
    x = randn((2, 6, 5, 12), torch.float16, device)
    addend = strided_tokens(kind, out_shape(x, stride), device)
    weight, bias = params(x.shape[3], device)
    out = check_addend(x, weight, bias, addend, stride=stride)
    torch.testing.assert_close(out, sola_ops.depthwise_conv3x3(x, weight, bias, stride=stride,
                                                               addend=addend.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [12, 7])
def test_addend_every_output_written(device, C):
    """Every output written (pre-filled with NaN in debug mode), C = 7: the one-channel kernels."""
    x = leaf(randn((2, 10, 5, C), torch.bfloat16, device))
    addend = leaf(randn(x.shape, torch.bfloat16, device, seed=3))
    weight, bias = (leaf(t) for t in params(C, device))
    with sola_ops.debug_nan_fill():
        out = sola_ops.depthwise_conv3x3(x, weight, bias, activation="silu", addend=addend)
        grads = torch.autograd.grad(out, (x, weight, bias, addend), torch.ones_like(out))
    for t in (out, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", DEVICES)
def test_addend_nan_stays_in_place(device):
    """A NaN / inf in the addend reaches its own output element only (inf + -inf elsewhere would not)."""
    x = randn((1, 6, 6, 4), torch.float32, device)
    addend = randn(x.shape, torch.float32, device, seed=3)
    addend[0, 2, 3, 1], addend[0, 4, 0, 2] = float("nan"), float("inf")
    weight, _ = params(4, device)
    out = sola_ops.depthwise_conv3x3(x, weight, addend=addend)
    assert torch.isnan(out).sum() == 1 and torch.isnan(out[0, 2, 3, 1])
    assert torch.isinf(out).sum() == 1 and out[0, 4, 0, 2] == float("inf")


@pytest.mark.parametrize("device", DEVICES)
def test_addend_empty(device):
    x = leaf(randn((0, 4, 4, 8), torch.float32, device))
    addend = leaf(randn(x.shape, torch.float32, device))
    weight, bias = (leaf(t) for t in params(8, device))
    out = sola_ops.depthwise_conv3x3(x, weight, bias, addend=addend)
    assert out.shape == x.shape
    out.sum().backward()
    for t in (x, weight, bias, addend):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_addend_autocast():
    """Under autocast x and the addend both go to the autocast dtype (an fp32 addend beside a bf16 x too)."""
    x = randn((2, 5, 5, 8), torch.float32)
    addend = randn(x.shape, torch.float32, seed=3)
    weight, bias = params(8)
    want = sola_ops.depthwise_conv3x3(x.bfloat16(), weight, bias, addend=addend.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for xi in (x, x.bfloat16()):
            out = sola_ops.depthwise_conv3x3(xi, weight, bias, addend=addend)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_addend_bad_input():
    x = randn((2, 5, 6, 8), torch.float32)
    weight, bias = params(8)
    cases = [
        (dict(addend=x[:, :4]), "addend must have the output's shape"),
        (dict(addend=x, stride=2), r"addend must have the output's shape \(B, OH, OW, C\) = \(2, 3, 3, 8\)"),
        (dict(addend=x.double()), "addend must have the dtype of x"),
        (dict(addend=x.to("meta")), "addend must be on the device of x"),
        (dict(addend=x, activation="relu"), "addend and activation='relu' cannot be combined"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sola_ops.depthwise_conv3x3(x, weight, bias, **kwargs)
    with pytest.raises(TypeError, match="addend must be a torch.Tensor or None"):
        sola_ops.depthwise_conv3x3(x, weight, bias, addend=1.0)
    # the raw op checks for itself
    with pytest.raises(ValueError, match="addend must have the shape of x"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, False, "none", 1, "none", x[:1])
    with pytest.raises(ValueError, match="addend must have the output's shape"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, False, "none", 2, "none", x)
    with pytest.raises(ValueError, match="addend must have the dtype of x"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, False, "none", 1, "none", x.double())
    with pytest.raises(ValueError, match="addend and activation='relu' cannot be combined"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, False, "relu", 1, "none", x)


@pytest.mark.parametrize("opts", OPTIONS)
def test_addend_opcheck(opts):
    residual, activation, stride, input_activation = opts
    x = randn((2, 5, 6, 8), torch.float32)
    weight, bias = params(8)
    addend = randn(out_shape(x, stride), torch.float32, seed=3)
    torch.library.opcheck(ops.depthwise_conv3x3_fwd.default,
                          (leaf(x), leaf(weight), leaf(bias), residual, activation or "none", stride,
                           input_activation or "none", leaf(addend)))


def test_addend_compile(fresh_dynamo):
    """fullgraph compile with dynamic sizes, forward and backward, against eager."""
    def fn(x, w, b, a):
        return sola_ops.depthwise_conv3x3(x, w, b, addend=a, activation="silu") * 2
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    weight, bias = (leaf(t) for t in params(8))
    for H in (5, 9):
        x, a = leaf(randn((2, H, 4, 8), torch.float32)), leaf(randn((2, H, 4, 8), torch.float32, seed=3))
        out = compiled(x, weight, bias, a)
        want = fn(x, weight, bias, a)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        for g, w in zip(torch.autograd.grad(out.sum(), (x, weight, bias, a)),
                        torch.autograd.grad(want.sum(), (x, weight, bias, a))):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("B,H,W,C,stride", [(4, 32, 80, 1024, 1), (2, 57, 57, 1030, 2)])
def test_cuda_addend_large_grids(B, H, W, C, stride):
    """The vector kernel and a one-channel one (C = 1030) walking more items than the grid holds,
    against PyTorch's conv2d in fp32 on the same GPU; a misaligned addend takes the one-channel kernel."""
    x = randn((B, H, W, C), torch.bfloat16, "cuda")
    weight, bias = params(C, "cuda")
    OH, OW = (H + stride - 1) // stride, (W + stride - 1) // stride
    for addend in (randn((B, OH, OW, C), torch.bfloat16, "cuda", seed=3),
                   randn((B, OH, OW, C + 1), torch.bfloat16, "cuda", seed=3)[..., 1:]):
        out = sola_ops.depthwise_conv3x3(x, weight, bias, stride=stride, addend=addend)
        want = addend.float() + F.conv2d(x.float().permute(0, 3, 1, 2), weight, bias, stride=stride, padding=1,
                                         groups=C).permute(0, 2, 3, 1)
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


# ---- depthwise_conv3x3_bwd(..., dx_addend): the input gradient plus the gradient of x's other consumers ----

DX_OPTIONS = [(False, "none"), (True, "none"), (False, "silu")]  # (residual, activation) at stride 1


def bwd(g, x, weight, bias, residual, activation, dx_addend=None):
    return ops.depthwise_conv3x3_bwd(g, x, weight, residual, bias is not None, bias, activation, 1, None, "none",
                                     dx_addend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", DX_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dx_addend(device, dtype, opts):
    """dx + dx_addend against the fp64 reference's input gradient plus the addend (FlashAttention rule), the
    parameters' gradients the same as without it."""
    residual, activation = opts
    x = randn((2, 9, 7, 12), dtype, device)
    weight, bias = params(12, device, dtype)
    g, a = randn(x.shape, dtype, device, seed=5), randn(x.shape, dtype, device, seed=3)
    dx, dweight, dbias = bwd(g, x, weight, bias, residual, activation, a)
    plain = bwd(g, x, weight, bias, residual, activation)
    assert torch.equal(dweight, plain[1]) and torch.equal(dbias, plain[2])
    act = None if activation == "none" else activation
    x64, w64, b64 = (leaf(t) for t in upcast([x, weight, bias]))
    (dx64,) = torch.autograd.grad(reference.depthwise_conv3x3(x64, w64, b64, residual=residual, activation=act),
                                  x64, g.double())
    xlp, wlp, blp = (leaf(t) for t in upcast([x, weight, bias], dtype))
    (dx_lp,) = torch.autograd.grad(dwconv_lowp(xlp, wlp, blp, residual=residual, activation=act), xlp, g)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_fa_close(dx, dx64 + a.double(), dx_lp + a, dtype, "dwconv dx + dx_addend")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dx_addend_rounded_once(device, dtype):
    """The addend joins the accumulator before the one rounding to dtype: the fp32 (fp64) op's dx on the same
    values plus the addend, rounded once (bitwise on the CPU, whose kernel sums in the same order)."""
    x = randn((2, 6, 5, 8), dtype, device)
    weight, bias = params(8, device)
    g, a = randn(x.shape, dtype, device, seed=5), randn(x.shape, dtype, device, seed=3)
    dx = bwd(g, x, weight, bias, False, "none", a)[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = (bwd(g.to(acc), x.to(acc), weight, bias, False, "none")[0] + a.to(acc)).to(dtype)
    if device == "cpu":
        assert torch.equal(dx, want)
    else:
        torch.testing.assert_close(dx, want, rtol=0, atol=0) if dtype == torch.float64 else \
            torch.testing.assert_close(dx.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["transposed", "slice", "lastdim"])
def test_dx_addend_strided(device, kind):
    """A dx_addend view reads the same as its contiguous copy (one-channel loads for the odd slice on CUDA)."""
    x = randn((2, 6, 5, 12), torch.float16, device)
    a = strided_tokens(kind, x.shape, device)
    weight, bias = params(x.shape[3], device)
    g = randn(x.shape, torch.float16, device, seed=5)
    assert torch.equal(bwd(g, x, weight, bias, True, "none", a)[0],
                       bwd(g, x, weight, bias, True, "none", a.contiguous())[0])


@pytest.mark.parametrize("device", DEVICES)
def test_dx_addend_nan_and_empty(device):
    """A NaN in dx_addend reaches its own element of dx only; empty inputs give empty gradients."""
    x = randn((1, 6, 6, 4), torch.float32, device)
    weight, bias = params(4, device)
    a = torch.zeros_like(x)
    a[0, 2, 3, 1] = float("nan")
    dx = bwd(randn(x.shape, torch.float32, device, seed=5), x, weight, bias, False, "none", a)[0]
    assert torch.isnan(dx).sum() == 1 and torch.isnan(dx[0, 2, 3, 1])
    e = x[:0]
    dx, dweight, dbias = bwd(e, e, weight, bias, False, "silu", e)
    assert dx.shape == e.shape and (dweight == 0).all() and (dbias == 0).all()


def test_dx_addend_bad_input():
    x = randn((2, 5, 6, 8), torch.float32)
    weight, bias = params(8)
    g2 = randn(out_shape(x, 2), torch.float32)
    cases = [
        (lambda: bwd(x, x, weight, bias, False, "none", x[:, :4]), "dx_addend must have the shape of x"),
        (lambda: bwd(x, x, weight, bias, False, "none", x.double()), "dx_addend must have the dtype of x"),
        (lambda: ops.depthwise_conv3x3_bwd(g2, x, weight, False, True, None, "none", 2, None, "none", x),
         "dx_addend needs stride 1"),
        (lambda: ops.depthwise_conv3x3_bwd(x, x, weight, False, True, None, "none", 1, None, "relu", x),
         "dx_addend and input_activation='relu' cannot be combined"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("opts", DX_OPTIONS)
def test_dx_addend_opcheck(opts):
    residual, activation = opts
    x = randn((2, 5, 6, 8), torch.float32)
    weight, bias = params(8)
    torch.library.opcheck(ops.depthwise_conv3x3_bwd.default,
                          (randn(x.shape, torch.float32, seed=5), x, weight, residual, True, bias, activation, 1, None,
                           "none", randn(x.shape, torch.float32, seed=3)))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("B,H,W,C", [(4, 32, 80, 1024), (2, 57, 57, 1030)])
def test_cuda_dx_addend_large_grids(B, H, W, C):
    """The vector kernel and a one-channel one (C = 1030) walking more items than the grid holds: dx plus an
    aligned and a misaligned addend against the op without it plus the addend, in fp32."""
    x = randn((B, H, W, C), torch.bfloat16, "cuda")
    weight, bias = params(C, "cuda")
    g = randn(x.shape, torch.bfloat16, "cuda", seed=5)
    dx32 = bwd(g.float(), x.float(), weight, bias, False, "silu")[0]
    for a in (randn(x.shape, torch.bfloat16, "cuda", seed=3),
              randn((B, H, W, C + 1), torch.bfloat16, "cuda", seed=3)[..., 1:]):
        dx = bwd(g, x, weight, bias, False, "silu", a)[0]
        torch.testing.assert_close(dx.float(), dx32 + a.float(), rtol=2e-2, atol=2e-2)


def test_dx_addend_fake_checks():
    """The fake (meta) implementation refuses what the kernels refuse, with the same messages."""
    x = torch.empty((2, 5, 6, 8), device="meta")
    weight, bias = (t.to("meta") for t in params(8))
    for a, stride, input_activation, match in [
            (x[:, :4], 1, "none", "dx_addend must have the shape of x"),
            (x.double(), 1, "none", "dx_addend must have the dtype of x"),
            (x, 2, "none", "dx_addend needs stride 1"),
            (x, 1, "relu", "dx_addend and input_activation='relu' cannot be combined")]:
        g = torch.empty(out_shape(x, stride), device="meta")
        with pytest.raises(ValueError, match=match):
            ops.depthwise_conv3x3_bwd(g, x, weight, False, True, bias, "none", stride, None, input_activation, a)
