"""sola_ops.depthwise_conv3x3: the channels-last depthwise 3x3 convolution (SoLA-Vision's CPE / LePE /
in-block conv at stride 1, its downsample's conv at stride 2), forward and backward, against the fp64
reference (FlashAttention tolerance rule, conftest.py), on awkward sizes and layouts."""
import pytest
import torch
import torch.nn.functional as F

import sola_ops
from sola_ops import reference
from conftest import (DEVICES, DTYPES, assert_fa_close, check_double_backward, leaf, randn, requires_cuda,
                      torch_threads, upcast)

ops = torch.ops.sola_ops


def params(C, device="cpu", dtype=torch.float32, bias=True, shape4=True, seed=11):
    weight = randn((C, 1, 3, 3) if shape4 else (C, 3, 3), dtype, device, seed=seed, scale=0.5)
    return weight, (randn((C,), dtype, device, seed=seed + 1) if bias else None)


def out_shape(x, stride=1):
    """(B, OH, OW, C) of x (B, H, W, C): OH = ceil(H / stride), OW = ceil(W / stride)."""
    B, H, W, C = x.shape
    return (B, (H + stride - 1) // stride, (W + stride - 1) // stride, C)


def dwconv_lowp(x, weight, bias=None, residual=False, activation=None, stride=1, input_activation=None):
    """The convolution by plain PyTorch in x's dtype, every product and sum rounded (nine shifted
    multiply-adds on the zero-padded input). Stride 2 keeps the stride-1 sums at even (h, w): with
    padding 1, output (h, w)'s window is centred on input (2h, 2w). input_activation="relu": of relu(x)."""
    B, H, W, C = x.shape
    w = weight.reshape(C, 3, 3).to(x.dtype)
    xp = F.pad(F.relu(x) if input_activation == "relu" else x, (0, 0, 1, 1, 1, 1))
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand_as(x).clone()
    for dy in range(3):
        for dx in range(3):
            out = out + xp[:, dy:dy + H, dx:dx + W, :] * w[:, dy, dx]
    out = out[:, ::stride, ::stride, :]
    if activation == "silu":
        out = F.silu(out)
    elif activation == "relu":
        out = F.relu(out)
    return out + x if residual else out


def check_dwconv(x, weight, bias=None, residual=False, grad=True, activation=None, stride=1, input_activation=None):
    """out and, with grad, dx, dweight, dbias (from a random output gradient) against the fp64
    reference, with the FlashAttention rule (the weight gradients sum over every position)."""
    dtype = x.dtype
    x, weight = leaf(x, grad), leaf(weight, grad)
    bias = None if bias is None else leaf(bias, grad)
    opts = dict(residual=residual, activation=activation, stride=stride, input_activation=input_activation)
    out = sola_ops.depthwise_conv3x3(x, weight, bias, **opts)
    assert out.dtype == dtype and out.shape == out_shape(x, stride)
    x64, w64, b64 = upcast([x, weight, bias])
    out64 = reference.depthwise_conv3x3(x64, w64, b64, **opts)
    xlp, wlp, blp = upcast([x, weight, bias], dtype)
    out_lp = dwconv_lowp(xlp, wlp, blp, **opts)
    assert_fa_close(out, out64, out_lp, dtype, "dwconv out")
    if not grad:
        return out
    g = randn(out.shape, dtype, x.device, seed=7)
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
@pytest.mark.parametrize("stride,activation", [(1, "relu"), (2, None), (2, "relu"), (2, "silu")])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stride_and_relu(device, dtype, bias, stride, activation):
    """Stride 2 (the downsample's conv: every other row and column) with each activation, and
    activation="relu" (relu(conv(x) + bias), its backward masking the gradient with out > 0)."""
    x = randn((2, 13, 10, 16), dtype, device)
    weight, b = params(16, device, dtype, bias=bias)
    check_dwconv(x, weight, b, activation=activation, stride=stride)


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
@pytest.mark.parametrize("H,W,C", [(1, 1, 1), (2, 1, 3), (1, 2, 8), (2, 2, 4), (5, 7, 66), (6, 9, 200),
                                   (37, 4, 3), (37, 38, 24), (65, 3, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stride2_awkward_sizes(device, dtype, H, W, C):
    """Stride 2 on odd sizes (the last output row / column reads the bottom / right padding) and even
    ones (it does not), 1- and 2-pixel images, more output rows than a CUDA strip (H = 37: 19, H = 65:
    33), channels off the vector width."""
    x = randn((2, H, W, C), dtype, device)
    weight, bias = params(C, device, dtype, bias=C % 2 == 0, shape4=C % 3 != 0)
    check_dwconv(x, weight, bias, activation=[None, "relu", "silu"][(H + W) % 3], stride=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["transposed", "slice", "lastdim"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_strided_inputs(device, dtype, kind, stride):
    """Views with the channel dim contiguous go in as they are (slice: odd offsets and strides, so
    one-channel loads on CUDA); a non-contiguous channel dim is copied. Residual at stride 1, relu at 2."""
    B, H, W, C = 2, 6, 5, 12
    if kind == "transposed":
        x = randn((B, W, H, C), dtype, device).transpose(1, 2)
    elif kind == "slice":
        x = randn((B + 1, H + 2, W + 3, C + 5), dtype, device)[1:, 1:H + 1, 2:W + 2, 3:C + 3]
    else:
        x = randn((B, H, W, C * 2), dtype, device)[..., ::2]
    assert not x.is_contiguous()
    weight, bias = params(C, device)
    if stride == 1:
        check_dwconv(x, weight, bias, residual=True)
    else:
        check_dwconv(x, weight, bias, activation="relu", stride=2)


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
def test_matches_conv2d_stride2(device):
    """Stride 2: the same as nn.Conv2d(C, C, 3, stride=2, padding=1, groups=C) (odd H, even W), and
    with relu as that followed by torch.relu (fp64: equal to rounding)."""
    conv = torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24).double().to(device)
    x = randn((3, 11, 12, 24), torch.float64, device)
    want = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert want.shape == (3, 6, 6, 24)
    torch.testing.assert_close(sola_ops.depthwise_conv3x3(x, conv.weight, conv.bias, stride=2), want,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sola_ops.depthwise_conv3x3(x, conv.weight, conv.bias, stride=2, activation="relu"),
                               torch.relu(want), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual,activation,stride", [(False, None, 1), (True, None, 1), (False, "silu", 1),
                                                        (False, "relu", 1), (False, None, 2), (False, "silu", 2),
                                                        (False, "relu", 2)])
def test_gradcheck(device, residual, activation, stride):
    """relu: the drawn inputs keep every pre-activation sum away from the kink (asserted), where the
    finite differences would straddle it."""
    x = leaf(randn((2, 5, 4, 3), torch.float64, device))
    weight, bias = (leaf(t) for t in params(3, device, torch.float64))
    if activation == "relu":
        pre = reference.depthwise_conv3x3(x.detach(), weight.detach(), bias.detach(), stride=stride)
        assert pre.abs().min().item() > 1e-3 and (pre > 0).any() and (pre < 0).any()

    def fn(x, w, b):
        return sola_ops.depthwise_conv3x3(x, w, b, residual=residual, activation=activation, stride=stride)
    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
def test_relu_backward(device, stride):
    """relu's backward masks the output's gradient with out > 0: a gradient living only where the
    output is 0 gives exactly zero gradients, and any other gives the plain convolution's gradients
    of the masked one (fp64: equal to those and to the reference's autograd, to rounding)."""
    x = leaf(randn((2, 9, 8, 6), torch.float64, device))
    weight, bias = (leaf(t) for t in params(6, device, torch.float64))
    inputs = (x, weight, bias)
    out = sola_ops.depthwise_conv3x3(x, weight, bias, activation="relu", stride=stride)
    plain = sola_ops.depthwise_conv3x3(x, weight, bias, stride=stride)
    torch.testing.assert_close(out, torch.relu(plain), rtol=1e-12, atol=1e-12)
    alive = out > 0
    assert alive.any() and not alive.all()
    g = randn(out.shape, torch.float64, device, seed=5)
    for t in torch.autograd.grad(out, inputs, g.masked_fill(alive, 0), retain_graph=True):
        assert (t == 0).all()
    grads = torch.autograd.grad(out, inputs, g)
    masked = torch.autograd.grad(plain, inputs, g * alive)
    ref = torch.autograd.grad(reference.depthwise_conv3x3(x, weight, bias, activation="relu", stride=stride),
                              inputs, g)
    for name, a, b, c in zip(("dx", "dweight", "dbias"), grads, masked, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12, msg=name)



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
def test_relu_backward_reads_out_in_any_layout(device, stride):
    """The raw backward op masks with the forward's out in any layout: one whose last dim is not contiguous
    gave a masked gradient of that layout, which failed an internal assert (found by a fuzzing helper)."""
    ops = torch.ops.sola_ops
    x = randn((1, 5, 4, 6), torch.float64, device)
    weight, bias = params(6, device, torch.float64)
    out = ops.depthwise_conv3x3_fwd(x, weight, bias, False, "relu", stride, "none", None)
    g = randn(out.shape, torch.float64, device, seed=3)
    strided = out.permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
    assert strided.stride(3) != 1
    want = ops.depthwise_conv3x3_bwd(g, x, weight, False, True, bias, "relu", stride, out, "none", None)
    got = ops.depthwise_conv3x3_bwd(g, x, weight, False, True, bias, "relu", stride, strided, "none", None)
    for a, b in zip(got, want):
        assert torch.equal(a, b)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride,activation", [(1, None), (1, "silu"), (1, "relu"), (2, None), (2, "silu"),
                                                (2, "relu")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_relu(device, dtype, stride, activation):
    """input_activation="relu": the convolution of relu(x) (the downsample's expand conv -> ReLU -> this
    conv), each stride and output activation; dx masked by x > 0, the weight gradient of relu(x)."""
    x = randn((2, 13, 10, 16), dtype, device)
    weight, b = params(16, device, dtype, bias=activation != "silu" or stride == 1)
    check_dwconv(x, weight, b, activation=activation, stride=stride, input_activation="relu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W,C,stride,activation", [(1, 1, 1, 1, None), (1, 2, 3, 2, "relu"), (5, 7, 66, 2, "silu"),
                                                     (37, 4, 3, 2, "relu"), (17, 2, 24, 1, "silu"),
                                                     (9, 17, 7, 1, "relu")])
def test_input_relu_awkward_sizes(device, H, W, C, stride, activation):
    """relu input on 1- and 2-pixel images, odd sizes at stride 2, more rows than a CUDA strip, channels
    off the vector width (the one-channel kernels on CUDA)."""
    x = randn((2, H, W, C), torch.bfloat16, device)
    weight, bias = params(C, device, torch.bfloat16, bias=C % 2 == 0, shape4=C % 3 != 0)
    check_dwconv(x, weight, bias, activation=activation, stride=stride, input_activation="relu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["transposed", "slice", "lastdim"])
def test_input_relu_strided(device, kind, stride):
    """Views as x with relu input: the kernels read relu of x and the mask of dx through its strides
    (slice: misaligned rows, so the one-channel kernels on CUDA; lastdim: copied)."""
    B, H, W, C = 2, 7, 5, 12
    if kind == "transposed":
        x = randn((B, W, H, C), torch.float16, device).transpose(1, 2)
    elif kind == "slice":
        x = randn((B + 1, H + 2, W + 3, C + 5), torch.float16, device)[1:, 1:H + 1, 2:W + 2, 3:C + 3]
    else:
        x = randn((B, H, W, C * 2), torch.float16, device)[..., ::2]
    weight, bias = params(C, device)
    check_dwconv(x, weight, bias, activation="relu" if stride == 2 else None, stride=stride, input_activation="relu")


def away_from_zero(x, gap=0.05):
    """x with every value at least gap from 0 (finite differences must not straddle relu's kink)."""
    return x + gap * torch.where(x < 0, -1.0, 1.0).to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "silu", "relu"])
@pytest.mark.parametrize("stride", [1, 2])
def test_input_relu_gradcheck(device, stride, activation):
    """fp64 gradcheck of the extension op with relu input; x kept away from relu's kink, and for an
    output relu the pre-activation sums too (asserted)."""
    x = leaf(away_from_zero(randn((2, 5, 4, 3), torch.float64, device, seed=3)))
    weight, bias = (leaf(t) for t in params(3, device, torch.float64))
    assert (x > 0).any() and (x < 0).any()
    if activation == "relu":
        pre = reference.depthwise_conv3x3(x.detach(), weight.detach(), bias.detach(), stride=stride,
                                          input_activation="relu")
        assert pre.abs().min().item() > 1e-3 and (pre > 0).any() and (pre < 0).any()

    def fn(x, w, b):
        return sola_ops.depthwise_conv3x3(x, w, b, activation=activation, stride=stride, input_activation="relu")
    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
def test_input_relu_is_relu_then_conv(device, stride):
    """relu input is torch.relu then the op, forward and backward, to rounding (fp64), with the input's
    edge cases in it: exact zeros (+0, -0: gradient 0, as torch.relu's backward), a NaN (torch.relu keeps
    it, so it reaches its neighbourhood in out and the weight gradient; torch's relu backward passes the
    gradient at a NaN input: threshold_backward selects x <= 0 ? 0 : g, and NaN <= 0 is false), -inf
    (gradient 0). dx is exactly 0 wherever x <= 0."""
    x = randn((2, 9, 8, 6), torch.float64, device)
    x[0, 0, 0, 0], x[0, 3, 3, 1], x[1, 4, 5, 2], x[1, 8, 7, 3] = 0.0, -0.0, float("nan"), float("-inf")
    x = leaf(x)
    weight, bias = (leaf(t) for t in params(6, device, torch.float64))
    inputs = (x, weight, bias)
    out = sola_ops.depthwise_conv3x3(x, weight, bias, activation="relu", stride=stride, input_activation="relu")
    want = sola_ops.depthwise_conv3x3(torch.relu(x), weight, bias, activation="relu", stride=stride)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isnan(out).any() and not torch.isnan(out).all()
    g = randn(out.shape, torch.float64, device, seed=5)
    grads = torch.autograd.grad(out, inputs, g)
    wants = torch.autograd.grad(want, inputs, g)
    for name, a, b in zip(("dx", "dweight", "dbias"), grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
    dx = grads[0]
    assert (dx[x.detach() <= 0] == 0).all() and (dx[x.detach() > 0] != 0).any()
    assert not torch.isnan(dx[1, 4, 5, 2]).any() and dx[1, 4, 5, 2] != 0  # the NaN input's gradient: passed


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
@pytest.mark.parametrize("stride", [1, 2])
def test_weight_view_off_alignment(device, stride):
    """A weight viewed one fp32 element into its storage (not 16-byte aligned, where the CUDA kernels
    load a channel vector's taps as 16-byte vectors) gives the bits of the same weight aligned, forward
    and backward."""
    x = leaf(randn((2, 9, 7, 16), torch.bfloat16, device))
    storage = randn((16 * 9 + 1,), torch.float32, device, seed=3)
    shifted = leaf(storage[1:].view(16, 1, 3, 3))
    aligned = leaf(shifted.detach().clone())
    assert shifted.data_ptr() % 16 != 0 and aligned.data_ptr() % 16 == 0
    results = []
    for w in (shifted, aligned):
        out = sola_ops.depthwise_conv3x3(x, w, residual=stride == 1, stride=stride)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), (x, w))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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


def assert_grads_near(grads, wants, tol=2e-2):
    """Gradients of a bf16 run against fp32 ones, within tol of the largest |want| (at least 1)."""
    for name, a, b in zip(("dx", "dweight", "dbias"), grads, wants):
        scale = b.abs().max().item()
        assert (a.float() - b).abs().max().item() <= tol * max(1.0, scale), name


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
    assert_grads_near(grads, wants)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("B,H,W,C", [(4, 57, 57, 512), (2, 112, 112, 1030)])
def test_cuda_large_grids_stride2(B, H, W, C):
    """Stride 2 with relu (the downsample's conv) on large grids: odd sizes (a padded last output row
    and column), and the one-channel kernels (C = 1030) over many strips, against PyTorch's conv2d in
    fp32 on the same GPU. The reference's gradients take our relu mask (an output within rounding of 0
    may have another sign in fp32, which would flip a whole gradient term); the masks may differ only
    there."""
    x = leaf(randn((B, H, W, C), torch.bfloat16, "cuda"))
    weight, bias = (leaf(t) for t in params(C, "cuda"))
    out = sola_ops.depthwise_conv3x3(x, weight, bias, activation="relu", stride=2)
    assert out.shape == out_shape(x, 2)
    g = randn(out.shape, torch.bfloat16, "cuda", seed=5)
    grads = torch.autograd.grad(out, (x, weight, bias), g)
    x32 = leaf(x.detach().float())
    pre = F.conv2d(x32.permute(0, 3, 1, 2), weight, bias, stride=2, padding=1, groups=C).permute(0, 2, 3, 1)
    alive = out > 0
    assert (pre[alive != (pre > 0)].abs() <= 1e-2).all()
    torch.testing.assert_close(out.float(), torch.relu(pre), rtol=2e-2, atol=2e-2)
    assert_grads_near(grads, torch.autograd.grad(pre, (x32, weight, bias), g.float() * alive))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("B,H,W,C,stride,activation", [(4, 57, 57, 512, 2, "relu"), (2, 40, 33, 1030, 1, None)])
def test_cuda_large_grids_input_relu(B, H, W, C, stride, activation):
    """relu input on large grids: the downsample's conv (stride 2, relu out; vector kernels, odd sizes)
    and the one-channel kernels (C = 1030) at stride 1, against PyTorch's conv2d of relu(x) in fp32 on
    the same GPU (its dx through torch.relu's backward). Output relu: the reference's gradients take our
    mask, as in test_cuda_large_grids_stride2."""
    x = leaf(randn((B, H, W, C), torch.bfloat16, "cuda"))
    weight, bias = (leaf(t) for t in params(C, "cuda"))
    out = sola_ops.depthwise_conv3x3(x, weight, bias, activation=activation, stride=stride, input_activation="relu")
    assert out.shape == out_shape(x, stride)
    g = randn(out.shape, torch.bfloat16, "cuda", seed=5)
    grads = torch.autograd.grad(out, (x, weight, bias), g)
    x32 = leaf(x.detach().float())
    pre = F.conv2d(torch.relu(x32).permute(0, 3, 1, 2), weight, bias, stride=stride, padding=1,
                   groups=C).permute(0, 2, 3, 1)
    alive = out > 0 if activation == "relu" else torch.ones_like(out, dtype=torch.bool)
    if activation == "relu":
        assert (pre[alive != (pre > 0)].abs() <= 1e-2).all()
    torch.testing.assert_close(out.float(), torch.relu(pre) if activation == "relu" else pre, rtol=2e-2, atol=2e-2)
    wants = torch.autograd.grad(pre, (x32, weight, bias), g.float() * alive)
    assert (grads[0][x.detach() <= 0] == 0).all()
    assert_grads_near(grads, wants)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride,residual,activation", [(1, True, None), (2, False, None), (2, False, "relu")])
@pytest.mark.parametrize("shape", [(0, 4, 4, 8), (2, 0, 4, 8), (2, 4, 0, 8), (2, 4, 4, 0)])
def test_empty(device, shape, stride, residual, activation):
    x = leaf(randn(shape, torch.float32, device))
    weight, bias = (leaf(t) for t in params(shape[3], device))
    out = sola_ops.depthwise_conv3x3(x, weight, bias, residual=residual, activation=activation, stride=stride)
    assert out.shape == out_shape(x, stride)
    out.sum().backward()
    for t in (x, weight, bias):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride,residual,activation,input_activation",
                         [(1, True, None, None), (2, False, None, None), (2, False, "silu", None),
                          (2, False, "relu", None), (1, False, "silu", "relu"), (2, False, "relu", "relu")])
@pytest.mark.parametrize("C", [12, 7])
def test_every_output_written(device, C, stride, residual, activation, input_activation):
    """With every output pre-filled with NaN (debug mode), out and all gradients come back finite
    (C = 7: the one-channel kernels on CUDA; stride 2: the transposed convolution for dx; relu input:
    dx written as 0 where x <= 0)."""
    x = leaf(randn((2, 10, 5, C), torch.bfloat16, device))
    weight, bias = (leaf(t) for t in params(C, device))
    with sola_ops.debug_nan_fill():
        out = sola_ops.depthwise_conv3x3(x, weight, bias, residual=residual, activation=activation, stride=stride,
                                         input_activation=input_activation)
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
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("h,w", [(0, 0), (2, 3), (3, 4), (6, 7)])
def test_nan_stays_in_its_neighbourhood_stride2(device, h, w, activation):
    """At stride 2 output (i, j) reads input rows 2i - 1 .. 2i + 1 and columns 2j - 1 .. 2j + 1: a NaN
    at (h, w) reaches the outputs with |2i - h| <= 1 and |2j - w| <= 1 (one row for an even h, two for
    an odd one; likewise columns), in its channel only. relu keeps a NaN a NaN, as torch.relu does."""
    x = randn((1, 7, 8, 4), torch.float32, device)
    x[0, h, w, 1] = float("nan")
    weight, _ = params(4, device)
    nan = torch.isnan(sola_ops.depthwise_conv3x3(x, weight, activation=activation, stride=2)).cpu()
    assert nan.shape == (1, 4, 4, 4)
    near = (2 * torch.arange(4) - h).abs().le(1)[:, None] & (2 * torch.arange(4) - w).abs().le(1)[None, :]
    want = torch.zeros_like(nan)
    want[0, :, :, 1] = near
    assert torch.equal(nan, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
def test_backward_is_deterministic(device, stride):
    x = leaf(randn((4, 19, 13, 40), torch.bfloat16, device))
    weight, bias = (leaf(t) for t in params(40, device))
    g = randn(out_shape(x, stride), torch.bfloat16, device, seed=5)
    runs = [torch.autograd.grad(sola_ops.depthwise_conv3x3(x, weight, bias, stride=stride), (x, weight, bias), g)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stride", [1, 2])
def test_weight_gradient_independent_of_threads(stride):
    """The CPU sums run over fixed chunks of rows in order: bitwise the same on 1 and 2 threads."""
    x = leaf(randn((3, 21, 9, 16), torch.float32))
    weight, bias = (leaf(t) for t in params(16))
    grads = []
    for n in (1, 2):
        with torch_threads(n):
            out = sola_ops.depthwise_conv3x3(x, weight, bias, stride=stride)
            grads.append(torch.autograd.grad(out.sum(), (weight, bias)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stride", [1, 2])
def test_autocast(stride):
    x = randn((2, 5, 5, 8), torch.float32)
    weight, bias = params(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sola_ops.depthwise_conv3x3(x, weight, bias, stride=stride)
    assert out.dtype == torch.bfloat16 and out.shape == out_shape(x, stride)
    torch.testing.assert_close(out, sola_ops.depthwise_conv3x3(x.bfloat16(), weight, bias, stride=stride),
                               rtol=0, atol=0)


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
    with pytest.raises(ValueError, match="activation must be 'none', 'silu' or 'relu'"):
        sola_ops.depthwise_conv3x3(x, weight, bias, activation="gelu")
    for activation in ("silu", "relu"):
        with pytest.raises(ValueError, match="cannot be combined"):
            sola_ops.depthwise_conv3x3(x, weight, bias, residual=True, activation=activation)
    with pytest.raises(ValueError, match="residual needs stride 1"):
        sola_ops.depthwise_conv3x3(x, weight, bias, residual=True, stride=2)
    with pytest.raises(ValueError, match="input_activation must be 'none' or 'relu', got 'silu'"):
        sola_ops.depthwise_conv3x3(x, weight, bias, input_activation="silu")
    for fn in (sola_ops.depthwise_conv3x3, reference.depthwise_conv3x3):
        with pytest.raises(ValueError, match="residual and input_activation='relu' cannot be combined"):
            fn(x, weight, bias, residual=True, input_activation="relu")
    for stride in (0, 3, -1, 2.0, True):  # exactly the int 1 or 2: not a float, not a bool
        with pytest.raises(ValueError, match="stride must be 1 or 2"):
            sola_ops.depthwise_conv3x3(x, weight, bias, stride=stride)


def test_raw_op_checks():
    """The C++ ops check for themselves (callers of torch.ops.sola_ops skip the Python checks)."""
    x = randn((2, 5, 5, 8), torch.float32)
    weight, bias = params(8)
    with pytest.raises(ValueError, match="weight must be"):
        ops.depthwise_conv3x3_fwd(x, weight[:2], bias, False)
    with pytest.raises(ValueError, match="bias must be"):
        ops.depthwise_conv3x3_fwd(x, weight, bias[:2], False)
    with pytest.raises(ValueError, match="grad_out must have the"):
        ops.depthwise_conv3x3_bwd(x[:1], x, weight, False, True)
    with pytest.raises(ValueError, match="grad_out must have the"):  # stride 2 wants (2, 3, 3, 8)
        ops.depthwise_conv3x3_bwd(x, x, weight, False, True, None, "none", 2)
    with pytest.raises(ValueError, match="grad_out must have the dtype of x"):
        ops.depthwise_conv3x3_bwd(x.double(), x, weight, False, True)
    with pytest.raises(ValueError, match="activation must be"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, False, "gelu")
    with pytest.raises(ValueError, match="cannot be combined"):
        ops.depthwise_conv3x3_bwd(x, x, weight, True, True, bias, "silu")
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, False, "none", 3)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        ops.depthwise_conv3x3_bwd(x[:, :2, :2], x, weight, False, True, None, "none", 3)
    with pytest.raises(ValueError, match="residual needs stride 1"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, True, "none", 2)
    with pytest.raises(ValueError, match="needs out"):
        ops.depthwise_conv3x3_bwd(x, x, weight, False, True, bias, "relu")
    with pytest.raises(ValueError, match="input_activation must be 'none' or 'relu', got 'gelu'"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, False, "none", 1, "gelu")
    with pytest.raises(ValueError, match="input_activation must be 'none' or 'relu', got 'gelu'"):
        ops.depthwise_conv3x3_bwd(x, x, weight, False, True, None, "none", 1, None, "gelu")
    with pytest.raises(ValueError, match="residual and input_activation='relu' cannot be combined"):
        ops.depthwise_conv3x3_fwd(x, weight, bias, True, "none", 1, "relu")
    with pytest.raises(ValueError, match="residual and input_activation='relu' cannot be combined"):
        ops.depthwise_conv3x3_bwd(x, x, weight, True, True, None, "none", 1, None, "relu")


@pytest.mark.parametrize("residual,activation,stride,input_activation",
                         [(False, "none", 1, "none"), (True, "none", 1, "none"), (False, "silu", 1, "none"),
                          (False, "relu", 1, "none"), (False, "none", 2, "none"), (False, "silu", 2, "none"),
                          (False, "relu", 2, "none"), (False, "none", 1, "relu"), (False, "silu", 1, "relu"),
                          (False, "relu", 2, "relu")])
def test_opcheck(residual, activation, stride, input_activation):
    """The raw ops' schemas, fake kernels and autograd; the bwd with relu gets out = the fwd's result."""
    x = randn((2, 5, 6, 8), torch.float32)
    weight, bias = params(8)
    torch.library.opcheck(ops.depthwise_conv3x3_fwd.default,
                          (leaf(x), leaf(weight), leaf(bias), residual, activation, stride, input_activation))
    out = (ops.depthwise_conv3x3_fwd(x, weight, bias, residual, activation, stride, input_activation)
           if activation == "relu" else None)
    g = randn(out_shape(x, stride), torch.float32, seed=5)
    for with_bias in (True, False):
        torch.library.opcheck(ops.depthwise_conv3x3_bwd.default,
                              (g, x, weight, residual, with_bias, bias if with_bias else None, activation, stride,
                               out, input_activation))


def test_double_backward_through_the_reference():
    x = leaf(randn((1, 5, 4, 2), torch.float64))
    weight, bias = (leaf(t) for t in params(2, dtype=torch.float64))
    for kw in (dict(residual=True), dict(activation="silu"), dict(activation="relu", stride=2),
               dict(input_activation="relu", addend=randn((1, 5, 4, 2), torch.float64, seed=3))):
        check_double_backward(lambda x, w, b: sola_ops.depthwise_conv3x3(x, w, b, **kw),
                              lambda x, w, b: reference.depthwise_conv3x3(x, w, b, **kw), (x, weight, bias))


@pytest.mark.parametrize("opts,Hs", [(dict(residual=True), (5, 9)), (dict(activation="relu", stride=2), (5, 8, 9)),
                                     (dict(activation="relu", stride=2, input_activation="relu"), (5, 8))])
def test_compile(fresh_dynamo, opts, Hs):
    """fullgraph compile with a dynamic size, forward and backward, against eager (stride 2: odd and
    even H, the output's size a symbolic ceil(H / 2))."""
    def fn(x, w, b):
        return sola_ops.depthwise_conv3x3(x, w, b, **opts) * 2
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    weight, bias = (leaf(t) for t in params(8))
    for H in Hs:
        x = leaf(randn((2, H, 4, 8), torch.float32))
        out = compiled(x, weight, bias)
        grads = torch.autograd.grad(out.sum(), (x, weight, bias))
        want = fn(x, weight, bias)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, torch.autograd.grad(want.sum(), (x, weight, bias))):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
