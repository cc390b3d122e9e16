"""sola_ops.depthwise_conv3x3: the channels-last depthwise 3x3 convolution (SoLA-Vision's CPE / LePE /
in-block conv), forward and backward, against the fp64 reference (FlashAttention tolerance rule,
conftest.py), on awkward sizes and layouts."""
import pytest
import torch
import torch.nn.functional as F

import sola_ops
from sola_ops import reference
from conftest import DEVICES, DTYPES, assert_fa_close, leaf, randn, requires_cuda, torch_threads, upcast

ops = torch.ops.sola_ops


def params(C, device="cpu", dtype=torch.float32, bias=True, shape4=True, seed=11):
    weight = randn((C, 1, 3, 3) if shape4 else (C, 3, 3), dtype, device, seed=seed, scale=0.5)
    return weight, (randn((C,), dtype, device, seed=seed + 1) if bias else None)


def dwconv_lowp(x, weight, bias=None, residual=False, activation=None):
    """The convolution by plain PyTorch in x's dtype, every product and sum rounded (nine shifted
    multiply-adds on the zero-padded input)."""
    B, H, W, C = x.shape
    w = weight.reshape(C, 3, 3).to(x.dtype)
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand_as(x).clone()
    for dy in range(3):
        for dx in range(3):
            out = out + xp[:, dy:dy + H, dx:dx + W, :] * w[:, dy, dx]
    out = F.silu(out) if activation == "silu" else out
    return out + x if residual else out


def check_dwconv(x, weight, bias=None, residual=False, grad=True, activation=None):
    """out and, with grad, dx, dweight, dbias (from a random output gradient) against the fp64
    reference, with the FlashAttention rule (the weight gradients sum over every position)."""
    dtype = x.dtype
    x, weight = leaf(x, grad), leaf(weight, grad)
    bias = None if bias is None else leaf(bias, grad)
    out = sola_ops.depthwise_conv3x3(x, weight, bias, residual=residual, activation=activation)
    assert out.dtype == dtype and out.shape == x.shape
    x64, w64, b64 = upcast([x, weight, bias])
    out64 = reference.depthwise_conv3x3(x64, w64, b64, residual=residual, activation=activation)
    xlp, wlp, blp = upcast([x, weight, bias], dtype)
    out_lp = dwconv_lowp(xlp, wlp, blp, residual, activation)
    assert_fa_close(out, out64, out_lp, dtype, "dwconv out")
    if not grad:
        return out
    g = randn(x.shape, dtype, x.device, seed=7)
    wanted = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(out, wanted, g)
    grads64 = torch.autograd.grad(out64, [t for t in (x64, w64, b64) if t is not None], g.double())
    grads_lp = torch.autograd.grad(out_lp, [t for t in (xlp, wlp, blp) if t is not None], g)
    for name, t, ours, r64, rlp in zip(("dx", "dweight", "dbias"), wanted, grads, grads64, grads_lp):
        assert ours.dtype == t.dtype and ours.shape == t.shape, name
        assert_fa_close(ours, r64, rlp, dtype, f"dwconv {name}")
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(device, dtype, residual):
    x = randn((2, 9, 7, 16), dtype, device)
    weight, bias = params(16, device, dtype)
    check_dwconv(x, weight, bias, residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu(device, dtype, bias):
    """activation="silu": silu(conv(x) + bias), the backward recomputing the sum from x (and the bias)."""
    x = randn((2, 19, 7, 16), dtype, device)
    weight, b = params(16, device, dtype, bias=bias)
    check_dwconv(x, weight, b, activation="silu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W,C", [(1, 1, 1), (1, 7, 3), (5, 1, 8), (9, 17, 66), (16, 16, 4), (3, 33, 200),
                                   (17, 2, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_awkward_sizes(device, dtype, H, W, C):
    """Images narrower and taller than a CUDA strip (16 rows), channels off the vector width."""
    x = randn((2, H, W, C), dtype, device)
    weight, bias = params(C, device, dtype, bias=C % 2 == 0, shape4=C % 3 != 0)
    check_dwconv(x, weight, bias, residual=H % 2 == 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["transposed", "slice", "lastdim"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_strided_inputs(device, dtype, kind):
    """Views with the channel dim contiguous go in as they are (slice: odd offsets and strides, so
    one-channel loads on CUDA); a non-contiguous channel dim is copied."""
    B, H, W, C = 2, 6, 5, 12
    if kind == "transposed":
        x = randn((B, W, H, C), dtype, device).transpose(1, 2)
    elif kind == "slice":
        x = randn((B + 1, H + 2, W + 3, C + 5), dtype, device)[1:, 1:H + 1, 2:W + 2, 3:C + 3]
    else:
        x = randn((B, H, W, C * 2), dtype, device)[..., ::2]
    assert not x.is_contiguous()
    weight, bias = params(C, device)
    check_dwconv(x, weight, bias, residual=True)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_conv2d(device):
    """The same as nn.Conv2d(C, C, 3, padding=1, groups=C) on the channels-last view, as the model's
    torch path runs it (fp64: equal to rounding)."""
    conv = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24).double().to(device)
    x = randn((3, 10, 12, 24), torch.float64, device)
    want = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(sola_ops.depthwise_conv3x3(x, conv.weight, conv.bias), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sola_ops.depthwise_conv3x3(x, conv.weight, conv.bias, residual=True), x + want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual,activation", [(False, None), (True, None), (False, "silu")])
def test_gradcheck(device, residual, activation):
    x = leaf(randn((2, 5, 4, 3), torch.float64, device))
    weight, bias = (leaf(t) for t in params(3, device, torch.float64))
    fn = lambda x, w, b: sola_ops.depthwise_conv3x3(x, w, b, residual=residual, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_parameter_dtypes(device):
    """fp32 parameters with bf16 tokens (the model under autocast): computed with the fp32 values,
    gradients in fp32; bf16 parameters give what their fp32 values give."""
    x = leaf(randn((2, 6, 6, 8), torch.bfloat16, device))
    weight, bias = (leaf(t) for t in params(8, device, torch.float32))
    out = sola_ops.depthwise_conv3x3(x, weight, bias)
    dx, dw, db = torch.autograd.grad(out.float().sum(), (x, weight, bias))
    assert out.dtype == dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    w16, b16 = weight.detach().bfloat16(), bias.detach().bfloat16()
    torch.testing.assert_close(sola_ops.depthwise_conv3x3(x, w16, b16),
                               sola_ops.depthwise_conv3x3(x, w16.float(), b16.float()), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_of_its_own_dtype(device):
    """A bf16 weight with an fp32 bias: the bias gradient is summed and returned in fp32, not rounded
    through the weight's dtype."""
    x = leaf(randn((2, 7, 6, 8), torch.float32, device))
    weight = leaf(params(8, device, torch.bfloat16)[0])
    bias = leaf(randn((8,), torch.float32, device, seed=3))
    g = randn(x.shape, torch.float32, device, seed=4)
    dw, db = torch.autograd.grad(sola_ops.depthwise_conv3x3(x, weight, bias), (weight, bias), g)
    assert dw.dtype == torch.bfloat16 and db.dtype == torch.float32
    torch.testing.assert_close(db, g.sum((0, 1, 2)), rtol=1e-6, atol=1e-6)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("B,H,W,C", [(4, 32, 80, 1024), (2, 128, 1024, 1030)])
def test_cuda_large_grids(B, H, W, C):
    """Lanes of the weight gradient walking several tasks (C = 1024: few partials per column block),
    and a one-channel kernel (C = 1030) with more items than its grid holds (grid-stride loops),
    against PyTorch's conv2d in fp32 on the same GPU."""
    x = leaf(randn((B, H, W, C), torch.bfloat16, "cuda"))
    weight, bias = (leaf(t) for t in params(C, "cuda"))
    g = randn(x.shape, torch.bfloat16, "cuda", seed=5)
    out = sola_ops.depthwise_conv3x3(x, weight, bias, residual=True)
    grads = torch.autograd.grad(out, (x, weight, bias), g)
    x32 = leaf(x.detach().float())
    want = x32 + F.conv2d(x32.permute(0, 3, 1, 2), weight, bias, padding=1, groups=C).permute(0, 2, 3, 1)
    wants = torch.autograd.grad(want, (x32, weight, bias), g.float())
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("dx", "dweight", "dbias"), grads, wants):
        scale = b.abs().max().item()
        assert (a.float() - b).abs().max().item() <= 2e-2 * max(1.0, scale), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 4, 8), (2, 0, 4, 8), (2, 4, 0, 8), (2, 4, 4, 0)])
def test_empty(device, shape):
    x = leaf(randn(shape, torch.float32, device))
    weight, bias = (leaf(t) for t in params(shape[3], device))
    out = sola_ops.depthwise_conv3x3(x, weight, bias, residual=True)
    assert out.shape == x.shape
    out.sum().backward()
    for t in (x, weight, bias):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [12, 7])
def test_every_output_written(device, C):
    """With every output pre-filled with NaN (debug mode), out and all gradients come back finite
    (C = 7: the one-channel kernels on CUDA)."""
    x = leaf(randn((2, 10, 5, C), torch.bfloat16, device))
    weight, bias = (leaf(t) for t in params(C, device))
    with sola_ops.debug_nan_fill():
        out = sola_ops.depthwise_conv3x3(x, weight, bias, residual=True)
        grads = torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out))
    for t in (out, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_neighbourhood(device):
    x = randn((1, 6, 6, 4), torch.float32, device)
    x[0, 2, 3, 1] = float("nan")
    weight, _ = params(4, device)
    nan = torch.isnan(sola_ops.depthwise_conv3x3(x, weight))
    assert nan[0, 1:4, 2:5, 1].all() and nan.sum() == 9


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    x = leaf(randn((4, 19, 13, 40), torch.bfloat16, device))
    weight, bias = (leaf(t) for t in params(40, device))
    g = randn(x.shape, torch.bfloat16, device, seed=5)
    runs = [torch.autograd.grad(sola_ops.depthwise_conv3x3(x, weight, bias), (x, weight, bias), g) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_weight_gradient_independent_of_threads():
    """The CPU sums run over fixed chunks of rows in order: bitwise the same on 1 and 2 threads."""
    x = leaf(randn((3, 21, 9, 16), torch.float32))
    weight, bias = (leaf(t) for t in params(16))
    grads = []
    for n in (1, 2):
        with torch_threads(n):
            grads.append(torch.autograd.grad(sola_ops.depthwise_conv3x3(x, weight, bias).sum(), (weight, bias)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_autocast():
    x = randn((2, 5, 5, 8), torch.float32)
    weight, bias = params(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sola_ops.depthwise_conv3x3(x, weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, sola_ops.depthwise_conv3x3(x.bfloat16(), weight, bias), rtol=0, atol=0)


def test_bad_input():
    x = randn((2, 5, 5, 8), torch.float32)
    weight, bias = params(8)
    cases = [
        ((x[0], weight, bias), "x must be 4-D"),
        ((x.int(), weight, bias), "x must be float16"),
        ((x, weight[:7], bias), "weight must be"),
        ((x, weight.reshape(8, 9), bias), "weight must be"),
        ((x, weight, bias[:3]), "bias must be"),
        ((x, weight.int(), bias), "weight must be a floating-point"),
        ((x, weight, bias.to("meta")), "bias must be on the device of x"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            sola_ops.depthwise_conv3x3(*args)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        sola_ops.depthwise_conv3x3(x, [1.0], bias)
    with pytest.raises(ValueError, match="activation must be 'none' or 'silu'"):
        sola_ops.depthwise_conv3x3(x, weight, bias, activation="gelu")
    with pytest.raises(ValueError, match="cannot be combined"):
        sola_ops.depthwise_conv3x3(x, weight, bias, residual=True, activation="silu")


def test_raw_op_checks():
    """The C++ ops check for themselves (callers of torch.ops.sola_ops skip the Python checks)."""
    x = randn((2, 5, 5, 8), torch.float32)
    weight, bias = params(8)
    with pytest.raises(ValueError, match="weight must be"):
        ops.depthwise_conv3x3_fwd(x, weight[:2], bias, False)
    with pytest.raises(ValueError, match="bias must be"):
        ops.depthwise_conv3x3_fwd(x, weight, bias[:2], False)
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        ops.depthwise_conv3x3_bwd(x[:1], x, weight, False, True)
    with pytest.raises(ValueError, match="grad_out must have the dtype of x"):
        ops.depthwise_conv3x3_bwd(x.double(), x, weight, False, True)
    with pytest.raises(ValueError, match="activation must be"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, False, "relu")
    with pytest.raises(ValueError, match="cannot be combined"):
        ops.depthwise_conv3x3_bwd(x, x, weight, True, True, bias, "silu")


@pytest.mark.parametrize("residual,activation", [(False, "none"), (True, "none"), (False, "silu")])
def test_opcheck(residual, activation):
    x = randn((2, 5, 6, 8), torch.float32)
    weight, bias = params(8)
    torch.library.opcheck(ops.depthwise_conv3x3_fwd.default, (leaf(x), leaf(weight), leaf(bias), residual, activation))
    g = randn(x.shape, torch.float32, seed=5)
    for with_bias in (True, False):
        torch.library.opcheck(ops.depthwise_conv3x3_bwd.default,
                              (g, x, weight, residual, with_bias, bias if with_bias else None, activation))


def test_double_backward_is_an_error():
    x = leaf(randn((1, 4, 4, 2), torch.float64))
    weight, _ = (leaf(t) if t is not None else t for t in params(2, dtype=torch.float64, bias=False))
    (dx,) = torch.autograd.grad(sola_ops.depthwise_conv3x3(x, weight).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward of sola_ops.depthwise_conv3x3"):
        dx.sum().backward()


def test_compile(fresh_dynamo):
    """fullgraph compile with a dynamic size, forward and backward, against eager."""
    def fn(x, w, b):
        return sola_ops.depthwise_conv3x3(x, w, b, residual=True) * 2
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    weight, bias = (leaf(t) for t in params(8))
    for H in (5, 9):
        x = leaf(randn((2, H, 4, 8), torch.float32))
        out = compiled(x, weight, bias)
        grads = torch.autograd.grad(out.sum(), (x, weight, bias))
        want = fn(x, weight, bias)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, torch.autograd.grad(want.sum(), (x, weight, bias))):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
