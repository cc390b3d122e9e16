"""sola_ops.layer_norm: LayerNorm over the last dim, statistics / weight / bias in fp32 (fp64 for fp64 x),
the output in x's dtype, forward and backward, against the fp64 reference (FlashAttention tolerance
rule, conftest.py: the baseline is torch's F.layer_norm run with x, weight and bias all in x's dtype).

The CUDA kernels take a vector path (C a multiple of 8 for fp16 / bf16, 4 for fp32, 2 for fp64, x / out /
grad 16-byte aligned) or a scalar one, and keep rows of up to 512 in registers (wider rows are read again
per pass, and their weight / bias gradients take a column kernel): the sizes below cover each."""
import math

import pytest
import torch
import torch.nn.functional as F

import sola_ops
from sola_ops import reference
from conftest import (DEVICES, DTYPES, LOW_DTYPES, acc_dtype, assert_fa_close, check_double_backward, leaf, randn,
                      requires_cuda, torch_threads, upcast)

ops = torch.ops.sola_ops

C_SIZES = [1, 3, 8, 59, 64, 200, 512, 1000]
# Which of weight and bias are given.
AFFINE = ["weight+bias", "weight", "bias", "none"]
NAMES = ("dx", "dweight", "dbias")


def params(C, device="cpu", dtype=torch.float32, weight=True, bias=True, seed=11):
    """weight ~ 1 + N(0, 0.5^2), bias ~ N(0, 1), each (C,) or None."""
    w = (randn((C,), torch.float32, device, seed=seed, scale=0.5) + 1).to(dtype) if weight else None
    b = randn((C,), dtype, device, seed=seed + 1) if bias else None
    return w, b


def affine_params(affine, C, device="cpu", dtype=torch.float32):
    return params(C, device, dtype, weight="weight" in affine, bias="bias" in affine)


def layer_norm_lowp(x, weight, bias, eps=1e-5):
    """The baseline: torch's own layer_norm with x, weight and bias all in x's dtype."""
    cast = [None if t is None else t.to(x.dtype) for t in (weight, bias)]
    return F.layer_norm(x, (x.shape[-1],), *cast, eps)


def check_layer_norm(x, weight=None, bias=None, eps=1e-5, grad=True, grad_out=None):
    """out and, with grad, dx, dweight, dbias (from a random or the given output gradient) against the
    fp64 reference with the FlashAttention rule; every gradient in its own tensor's dtype."""
    dtype = x.dtype
    x = leaf(x, grad)
    weight, bias = (None if t is None else leaf(t, grad) for t in (weight, bias))
    out = sola_ops.layer_norm(x, weight, bias, eps)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    x64, w64, b64 = upcast([x, weight, bias])
    out64 = reference.layer_norm(x64, w64, b64, eps)
    xlp, wlp, blp = upcast([x, weight, bias], dtype)
    out_lp = layer_norm_lowp(xlp, wlp, blp, eps)
    assert_fa_close(out, out64, out_lp, dtype, "layer_norm out")
    if not grad:
        return out
    g = randn(out.shape, dtype, x.device, seed=7) if grad_out is None else grad_out
    given = [(n, t, t64, tlp) for n, t, t64, tlp in zip(NAMES, (x, weight, bias), (x64, w64, b64), (xlp, wlp, blp))
             if t is not None]
    grads = torch.autograd.grad(out, [t for _, t, _, _ in given], g)
    grads64 = torch.autograd.grad(out64, [t for _, _, t, _ in given], g.double())
    grads_lp = torch.autograd.grad(out_lp, [t for _, _, _, t in given], g)
    for (name, t, _, _), ours, r64, rlp in zip(given, grads, grads64, grads_lp):
        assert ours.dtype == t.dtype and ours.shape == t.shape and ours.device == t.device, name
        # The baseline returns each gradient in its tensor's dtype too (a bf16 bias of an fp64 x: rounded).
        assert_fa_close(ours, r64, rlp.to(t.dtype), dtype, f"layer_norm {name}")
    return out


def misaligned(shape, dtype, device, seed=0):
    """A contiguous tensor of `shape` one element past the start of its storage: not 16-byte aligned,
    so it goes to the kernels as it is (contiguous, no copy) and takes the CUDA scalar path."""
    n = math.prod(shape)
    y = randn((n + 1,), dtype, device, seed)[1:].view(shape)
    assert y.is_contiguous() and y.storage_offset() == 1
    return y


# ---- forward and backward against the fp64 reference ---------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ndim", [3, 4])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("C", C_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_sizes(device, dtype, C, affine, ndim):
    """Every dtype and width (C = 1: out = bias exactly; 59: off the vector width; 512: the widest cached
    row; 1000: past it), each of weight / bias given or not, 3-D and 4-D x. Few rows on CPU, more on
    CUDA (several teams per block and several blocks)."""
    if device == "cpu":
        lead = (2, 5) if ndim == 3 else (2, 3, 2)
    else:
        lead = (3, 67) if ndim == 3 else (2, 3, 19)
    x = randn((*lead, C), dtype, device)
    weight, bias = affine_params(affine, C, device, dtype)
    check_layer_norm(x, weight, bias)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("C", [2, 4, 12, 16, 510, 513, 520, 1536, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_paths(dtype, C):
    """Widths picking each CUDA path per dtype: vector widths of fp64 (2) and fp32 (4) but not bf16 (8),
    just under / over the register cache (510, 513 scalar; 520 a vector one past it), wide rows."""
    x = randn((333, C), dtype, "cuda", seed=C)
    weight, bias = params(C, "cuda", dtype)
    check_layer_norm(x, weight, bias)


@pytest.mark.parametrize("device", DEVICES)
def test_stats(device):
    """The raw forward's mean and rstd: x's shape without its last dim, fp32 (fp64 for fp64 x), equal
    to the fp64 statistics of the (exactly representable) inputs to fp32 rounding."""
    for dtype in DTYPES:
        x = randn((3, 4, 200), dtype, device, seed=2)
        out, mean, rstd = ops.layer_norm_fwd(x, None, None, 1e-5)
        assert mean.dtype == rstd.dtype == acc_dtype(dtype) and mean.shape == rstd.shape == (3, 4)
        var64, mean64 = torch.var_mean(x.double(), dim=-1, unbiased=False)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean.double(), mean64, **tol)
        torch.testing.assert_close(rstd.double(), (var64 + 1e-5).rsqrt(), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eps(device, dtype, eps):
    """eps = 0 (plain standardisation) and a large eps (which shrinks the output) are used as given."""
    x = randn((4, 7, 64), dtype, device, seed=3)
    weight, bias = params(64, device)
    check_layer_norm(x, weight, bias, eps=eps)
    xhat = sola_ops.layer_norm(x.float(), eps=eps).double()
    var, mean = torch.var_mean(xhat, dim=-1, unbiased=False)
    var64 = torch.var(x.double(), dim=-1, unbiased=False)
    assert mean.abs().max().item() <= 1e-6
    torch.testing.assert_close(var, var64 / (var64 + eps), rtol=1e-5, atol=1e-6)  # 1 at eps = 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [64, 1000])
def test_constant_rows(device, C):
    """A constant row has variance 0: its output is the bias exactly (x - mean is exactly 0, the sum of
    64 or 1000 threes being exact in fp32), and dx = rstd * (g * w - mean(g * w)) with rstd = eps^-1/2."""
    x = torch.full((5, C), 3.0, dtype=torch.bfloat16, device=device)
    weight, bias = params(C, device)
    out = check_layer_norm(x, weight, bias)
    assert torch.equal(out, bias.to(torch.bfloat16).expand_as(out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [3, 33, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_rows_rounded_mean(device, dtype, C):
    """Constant rows whose mean rounds (0.1): the reference gives 0 exactly, NaN at eps = 0 (0 / 0, as
    F.layer_norm), not the mean's rounding residue normalised to about +-1; the kernel agrees with it."""
    x = torch.full((4, C), 0.1, dtype=dtype, device=device)
    assert torch.equal(reference.layer_norm(x), torch.zeros_like(x))
    assert reference.layer_norm(x, eps=0.0).isnan().all()
    weight, bias = params(C, device)
    check_layer_norm(x, weight, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [59, 64, 1000])
def test_large_mean(device, C):
    """Rows of mean 1e3 and unit spread in fp32: a one-pass variance (E[x^2] - E[x]^2) would lose most
    digits, and the mean's own rounding error (which grows with the length of its sum) shows up in every
    output; torch's fp32 layer_norm is the baseline."""
    x = randn((6, C), torch.float32, device, seed=4) + 1e3
    weight, bias = params(C, device)
    check_layer_norm(x, weight, bias)


def test_matches_nn_layernorm():
    """The same as nn.LayerNorm (fp64: equal to rounding), forward and the parameters' gradients."""
    ln = torch.nn.LayerNorm(24, eps=1e-6).double()
    with torch.no_grad():
        ln.weight.normal_(1, 0.5, generator=torch.Generator().manual_seed(1))
        ln.bias.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    x = leaf(randn((3, 5, 24), torch.float64))
    out = sola_ops.layer_norm(x, ln.weight, ln.bias, ln.eps)
    want = ln(x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = randn(out.shape, torch.float64, seed=3)
    for a, b in zip(torch.autograd.grad(out, (x, ln.weight, ln.bias), g),
                    torch.autograd.grad(want, (x, ln.weight, ln.bias), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- parameter dtypes and autocast --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype,b_dtype", [(torch.bfloat16, torch.float32, torch.float32),
                                                     (torch.float16, torch.float32, torch.float32),
                                                     (torch.float32, torch.float64, torch.float64),
                                                     (torch.bfloat16, torch.float16, torch.float32),
                                                     (torch.float64, torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("C", [64, 59, 1000])
def test_parameter_dtypes(device, x_dtype, w_dtype, b_dtype, C):
    """Parameters of another dtype than x (fp32 ones with bf16 tokens: the model under autocast): out and
    dx in x's dtype, dweight and dbias each in its parameter's dtype; the parameter gradients, summed in
    fp32 from exactly representable x and grad, held to an fp32 tolerance rather than x's."""
    x = leaf(randn((4, 9, C), x_dtype, device))
    weight, _ = params(C, device, w_dtype)
    _, bias = params(C, device, b_dtype)
    weight, bias = leaf(weight), leaf(bias)
    out = check_layer_norm(x, weight, bias)
    g = randn(out.shape, x_dtype, device, seed=7)
    dw, db = torch.autograd.grad(sola_ops.layer_norm(x, weight, bias), (weight, bias), g)
    assert dw.dtype == w_dtype and db.dtype == b_dtype
    x64, w64, b64 = upcast([x, weight, bias])
    dw64, db64 = torch.autograd.grad(reference.layer_norm(x64, w64, b64), (w64, b64), g.double())
    for ours, want in ((dw, dw64), (db, db64)):
        # rounded once into the parameter's dtype (relative 2^-8 for bf16, 2^-11 fp16), fp32 sums below that
        rtol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(ours.dtype, 1e-5)
        assert (ours.double() - want).abs().max().item() <= rtol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_parameters_are_their_values(device):
    """bf16 / fp16 parameters give exactly what their values as fp32 tensors give (the kernels read
    fp32 parameters either way)."""
    x = randn((5, 7, 72), torch.bfloat16, device)
    for dtype in LOW_DTYPES:
        weight, bias = params(72, device, dtype)
        torch.testing.assert_close(sola_ops.layer_norm(x, weight, bias),
                                   sola_ops.layer_norm(x, weight.float(), bias.float()), rtol=0, atol=0)


AUTOCAST = [("cpu", torch.bfloat16),
            pytest.param("cuda", torch.bfloat16, marks=[pytest.mark.cuda, requires_cuda]),
            pytest.param("cuda", torch.float16, marks=[pytest.mark.cuda, requires_cuda])]


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST)
def test_autocast(device, amp_dtype):
    """Under autocast the output keeps x's dtype (bf16 / fp16 tokens stay, fp32 x stays fp32; torch's
    layer_norm returns fp32 under CUDA autocast), the result is bitwise what it is without autocast, and the
    fp32 parameters get fp32 gradients."""
    ln = torch.nn.LayerNorm(40).to(device)
    with torch.no_grad():
        ln.weight.normal_(1, 0.5)
        ln.bias.normal_(0, 1)
    for dtype in (amp_dtype, torch.float32):
        x = leaf(randn((3, 11, 40), dtype, device))
        with torch.autocast(device, dtype=amp_dtype):
            out = sola_ops.layer_norm(x, ln.weight, ln.bias, ln.eps)
            if device == "cuda":  # torch's own layer_norm runs in fp32 under CUDA autocast
                assert F.layer_norm(x, (40,), ln.weight, ln.bias).dtype == torch.float32
        assert out.dtype == dtype
        g = randn(out.shape, dtype, device, seed=2)
        dx, dw, db = torch.autograd.grad(out, (x, ln.weight, ln.bias), g)
        assert dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
        plain = sola_ops.layer_norm(x, ln.weight, ln.bias, ln.eps)
        assert torch.equal(out, plain)
        for a, b in zip((dx, dw, db), torch.autograd.grad(plain, (x, ln.weight, ln.bias), g)):
            assert torch.equal(a, b)


# ---- layouts -----------------------------------------------------------------------------------------------------

def strided_x(kind, shape, dtype, device):
    """x of `shape` (B, N, C) in another layout: transposed (last dim stride != 1: copied), a slice of a
    bigger tensor (last dim contiguous, odd row strides and offset: copied), every other element of the
    last dim, or a contiguous misaligned view (goes in as it is)."""
    B, N, C = shape
    if kind == "transposed":
        x = randn((B, C, N), dtype, device).transpose(1, 2)
    elif kind == "slice":
        x = randn((B + 1, N + 2, C + 5), dtype, device)[1:, 2:, 3:C + 3]
    elif kind == "every_other":
        x = randn((B, N, 2 * C), dtype, device)[..., ::2]
    elif kind == "misaligned":
        return misaligned(shape, dtype, device)
    else:
        raise ValueError(kind)
    assert x.shape == shape and not x.is_contiguous()
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [64, 59, 1000])
@pytest.mark.parametrize("kind", ["transposed", "slice", "every_other", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_inputs(device, dtype, kind, C):
    """x in any layout, with a grad_out that is itself a strided view (misaligned for the misaligned x)
    and a non-contiguous weight."""
    x = strided_x(kind, (3, 13, C), dtype, device)
    if kind == "misaligned":
        g = misaligned(x.shape, dtype, device, seed=9)
    else:
        g = randn((3, C, 13), dtype, device, seed=9).transpose(1, 2)
    weight = (randn((2 * C,), torch.float32, device, seed=5, scale=0.5) + 1)[::2]
    assert not weight.is_contiguous()
    _, bias = params(C, device)
    out = check_layer_norm(x, weight, bias, grad_out=g)
    # Layout changes nothing: the same values in a fresh contiguous tensor give the same output.
    torch.testing.assert_close(out, sola_ops.layer_norm(x.contiguous(), weight, bias), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_output_is_contiguous(device):
    """out (and dx) are fresh contiguous tensors of x's shape, whatever x's layout."""
    x = leaf(randn((4, 8, 6), torch.float32, device).transpose(0, 2))
    out = sola_ops.layer_norm(x)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert out.shape == dx.shape == x.shape and out.is_contiguous() and dx.is_contiguous()


# ---- gradcheck, determinism --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 2, 8), (4, 1)])
def test_gradcheck(device, affine, shape):
    x = leaf(randn(shape, torch.float64, device))
    weight, bias = affine_params(affine, shape[-1], device, torch.float64)
    inputs = [x] + [leaf(t) for t in (weight, bias) if t is not None]

    def fn(x, *p):
        it = iter(p)
        w = next(it) if weight is not None else None
        b = next(it) if bias is not None else None
        return sola_ops.layer_norm(x, w, b, 1e-5)
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [64, 1000])
def test_frozen_parameters(device, C):
    """A weight or bias that does not require grad gets none (the kernels skip its sums); the other
    gradients are bitwise those of the run where every parameter requires grad."""
    x = leaf(randn((300, C), torch.bfloat16, device))
    weight, bias = (leaf(t) for t in params(C, device))
    g = randn(x.shape, torch.bfloat16, device, seed=5)
    full = torch.autograd.grad(sola_ops.layer_norm(x, weight, bias), (x, weight, bias), g)
    for frozen in ("weight", "bias"):
        w = weight.detach() if frozen == "weight" else weight
        b = bias.detach() if frozen == "bias" else bias
        out = sola_ops.layer_norm(x, w, b)
        trained = (x, b) if frozen == "weight" else (x, w)
        grads = torch.autograd.grad(out, trained, g)
        want = (full[0], full[2]) if frozen == "weight" else (full[0], full[1])
        for got, ref in zip(grads, want):
            assert torch.equal(got, ref), frozen
        # autograd asks nothing of a frozen parameter: its grad is None, not zeros
        w2, b2 = weight.detach().clone(), bias.detach().clone().requires_grad_(frozen == "weight")
        x2 = x.detach().clone().requires_grad_(True)
        sola_ops.layer_norm(x2, w2, b2).backward(g)
        assert w2.grad is None and (b2.grad is None) == (frozen == "bias")


def det_shape(device, C):
    """Enough rows for several CPU chunks (64 rows each) / CUDA blocks of partial weight-gradient sums."""
    if device == "cuda":
        return (6000, C)
    return (1500, C) if C < 512 else (300, C)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [40, 64, 1000])
def test_backward_is_deterministic(device, C):
    x = leaf(randn(det_shape(device, C), torch.bfloat16, device))
    weight, bias = (leaf(t) for t in params(C, device))
    g = randn(x.shape, torch.bfloat16, device, seed=5)
    runs = [torch.autograd.grad(sola_ops.layer_norm(x, weight, bias), (x, weight, bias), g) for _ in range(3)]
    for name, a, b, c in zip(NAMES, *runs):
        assert torch.equal(a, b) and torch.equal(a, c), name
        assert torch.isfinite(a).all() and a.abs().max() > 0, name


@pytest.mark.parametrize("C", [24, 1000])
def test_independent_of_threads(C):
    """The CPU parameter-gradient sums run over chunks of rows fixed by the shape, in order: out and all
    gradients bitwise the same on 1 and 2 threads (1500 rows: 24 chunks of 64)."""
    x = leaf(randn((1500, C) if C < 512 else (300, C), torch.float32))
    weight, bias = (leaf(t) for t in params(C))
    g = randn(x.shape, torch.float32, seed=5)
    results = []
    for n in (1, 2):
        with torch_threads(n):
            out = sola_ops.layer_norm(x, weight, bias)
            results.append((out, *torch.autograd.grad(out, (x, weight, bias), g)))
    for name, a, b in zip(("out",) + NAMES, *results):
        assert torch.equal(a, b), name


# ---- special values, empty inputs, debug fill ----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [8, 59, 64, 1000])
def test_nan_stays_in_its_row(device, C):
    """A NaN makes its own row's output (and input gradient) NaN, no other row's."""
    x = leaf(randn((3, 40, C), torch.float32, device))
    with torch.no_grad():
        x[1, 17, C // 2] = float("nan")
    weight, bias = params(C, device)
    out = sola_ops.layer_norm(x, weight, bias)
    (dx,) = torch.autograd.grad(out, x, randn(out.shape, torch.float32, device, seed=3))
    for t in (out, dx):
        nan_rows = torch.isnan(t).any(-1)
        assert torch.isnan(t[1, 17]).all()
        assert nan_rows.sum().item() == 1
        assert torch.isfinite(t[~nan_rows]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [8, 64, 1000])
def test_variance_overflow_is_nan(device, dtype, C):
    """A row whose squared deviations overflow the fp32 accumulator (a value of 1e20 among small ones) is NaN,
    output and input gradient (1 / sqrt(inf) would make it plausible zeros, as torch's fp32 layer_norm gives
    for some rows; the right values are finite, far from zero); the other rows are untouched. fp64
    accumulates it without overflow: the exact result."""
    x = randn((3, 5, C), dtype, device)
    x[1, 2, C // 3] = 1e20
    x = leaf(x)
    weight, bias = params(C, device)
    out = sola_ops.layer_norm(x, weight, bias)
    (dx,) = torch.autograd.grad(out, x, randn(out.shape, dtype, device, seed=3))
    want = F.layer_norm(x.detach().double(), (C,), weight.double(), bias.double(), 1e-5)
    other = torch.ones(3, 5, dtype=torch.bool, device=device)
    other[1, 2] = False
    if dtype == torch.float64:
        torch.testing.assert_close(out, want)
        assert torch.isfinite(dx).all()
    else:
        assert torch.isnan(out[1, 2]).all() and torch.isnan(dx[1, 2]).all()
        assert torch.isfinite(out[other]).all() and torch.isfinite(dx[other]).all()
        torch.testing.assert_close(out[other].double(), want[other], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("shape", [(0, 5, 8), (3, 0, 8), (0, 1000), (0, 3)])
def test_empty(device, shape, affine):
    """No rows: an empty output of x's shape, an empty dx, zero weight and bias gradients."""
    x = leaf(randn(shape, torch.bfloat16, device))
    weight, bias = affine_params(affine, shape[-1], device)
    weight, bias = (None if t is None else leaf(t) for t in (weight, bias))
    out = sola_ops.layer_norm(x, weight, bias)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.float().sum().backward()
    assert x.grad.shape == x.shape
    for t in (weight, bias):
        if t is not None:
            assert t.grad.shape == t.shape and t.grad.dtype == t.dtype and (t.grad == 0).all()
    _, mean, rstd = ops.layer_norm_fwd(x.detach(), weight, bias, 1e-5)
    assert mean.shape == rstd.shape == shape[:-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7, 59), (37, 64), (4, 1000), (3, 1536)])
def test_every_output_written(device, dtype, shape):
    """With every output pre-filled with NaN (debug mode), out, mean, rstd and all gradients come back
    finite (59: the scalar path; 1000, 1536: the uncached path and column kernel on CUDA)."""
    x = leaf(randn(shape, dtype, device))
    weight, bias = (leaf(t) for t in params(shape[-1], device))
    with sola_ops.debug_nan_fill():
        out = sola_ops.layer_norm(x, weight, bias)
        grads = torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out))
        _, mean, rstd = ops.layer_norm_fwd(x.detach(), weight.detach(), bias.detach(), 1e-5)
        dx_plain = torch.autograd.grad(sola_ops.layer_norm(x), x, torch.ones_like(out))[0]  # no parameters
    for t in (out, mean, rstd, dx_plain, *grads):
        assert torch.isfinite(t).all()


# ---- CUDA: many rows, misalignment -----------------------------------------------------------------------------------

@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("rows,C,dtype", [(70000, 64, torch.bfloat16), (3000, 1536, torch.float32),
                                          (70000, 59, torch.float16), (20000, 512, torch.bfloat16)])
def test_cuda_many_rows(rows, C, dtype):
    """More rows than the backward's 1024 blocks take at once (grid-stride loops, many partials per
    parameter gradient), fp32 parameters as under autocast."""
    x = randn((rows, C), dtype, "cuda", seed=1)
    weight, bias = params(C, "cuda")
    check_layer_norm(x, weight, bias)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("C", [64, 1000])
def test_cuda_grid_stride(monkeypatch, C):
    """SOLA_MAX_GRID=3 caps every grid: the forward's blocks, too, walk several groups of rows."""
    monkeypatch.setenv("SOLA_MAX_GRID", "3")
    x = randn((2000, C), torch.bfloat16, "cuda", seed=2)
    weight, bias = params(C, "cuda")
    check_layer_norm(x, weight, bias)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("C", [64, 512, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_misaligned(dtype, C):
    """A contiguous x and grad_out one element off 16-byte alignment: the scalar kernels, even at a
    vector width; the output matches the aligned run's within rounding."""
    x = misaligned((300, C), dtype, "cuda")
    g = misaligned((300, C), dtype, "cuda", seed=4)
    weight, bias = params(C, "cuda")
    out = check_layer_norm(x, weight, bias, grad_out=g)
    x_aligned = x.clone()
    assert x_aligned.data_ptr() % 16 == 0
    torch.testing.assert_close(out, sola_ops.layer_norm(x_aligned, weight, bias))


# ---- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input():
    x = randn((2, 5, 8), torch.float32)
    weight, bias = params(8)
    cases = [
        ((x.int(), weight, bias), {}, "x must be float16, bfloat16, float32 or float64"),
        ((x.to(torch.complex64), weight, bias), {}, "x must be float16"),
        ((torch.tensor(1.0), None, None), {}, "x must have a last dim of at least 1"),
        ((x[..., :0], None, None), {}, "x must have a last dim of at least 1"),
        ((x, weight[:7], bias), {}, r"weight must be \(C,\) with C = 8"),
        ((x, weight.reshape(1, 8), bias), {}, r"weight must be \(C,\)"),
        ((x, weight, bias[:3]), {}, r"bias must be \(C,\) with C = 8"),
        ((x, weight.int(), bias), {}, "weight must be a floating-point tensor"),
        ((x, weight, bias.long()), {}, "bias must be a floating-point tensor"),
        ((x, weight.to("meta"), bias), {}, "weight must be on the device of x"),
        ((x, weight, bias.to("meta")), {}, "bias must be on the device of x"),
        ((x, weight, bias), dict(eps=-1e-5), "eps must be a finite number >= 0"),
        ((x, weight, bias), dict(eps=float("nan")), "eps must be a finite number >= 0"),
        ((x, weight, bias), dict(eps=float("inf")), "eps must be a finite number >= 0"),
        ((x, weight, bias), dict(eps=1e39), "eps must fit in float32"),  # would round to inf: NaN rows
        ((x, weight, bias), dict(eps=torch.tensor(1e-5, requires_grad=True)), "eps is a tensor that requires grad"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sola_ops.layer_norm(*args, **kwargs)
    with pytest.raises(ValueError, match="eps must fit in float32"):  # the C++ op checks it too
        torch.ops.sola_ops.layer_norm_fwd(x, None, None, 1e39)
    sola_ops.layer_norm(x.double(), eps=1e39)  # fp64 statistics: a valid eps
    for args, kwargs, match in [(([1.0, 2.0],), {}, "x must be a torch.Tensor"),
                                ((x, [1.0] * 8), {}, "weight must be a torch.Tensor or None"),
                                ((x, weight, 0.0), {}, "bias must be a torch.Tensor or None"),
                                ((x, weight, bias), dict(eps="small"), "eps must be a real number")]:
        with pytest.raises(TypeError, match=match):
            sola_ops.layer_norm(*args, **kwargs)


def test_good_eps_forms():
    """eps as an int or a 0-dim tensor without grad is its float value."""
    x = randn((3, 8), torch.float64)
    want = sola_ops.layer_norm(x, eps=0.0)
    assert torch.equal(sola_ops.layer_norm(x, eps=0), want)
    assert torch.equal(sola_ops.layer_norm(x, eps=torch.tensor(0.0)), want)
    assert not torch.equal(sola_ops.layer_norm(x, eps=1.0), want)


def test_raw_op_checks():
    """The C++ ops check for themselves (callers of torch.ops.sola_ops skip the Python checks)."""
    x = randn((2, 5, 8), torch.float32)
    weight, bias = params(8)
    _, mean, rstd = ops.layer_norm_fwd(x, weight, bias, 1e-5)
    cases = [
        (lambda: ops.layer_norm_fwd(x.int(), weight, bias, 1e-5), "x must be float16"),
        (lambda: ops.layer_norm_fwd(x[..., :0], None, None, 1e-5), "x must have a last dim"),
        (lambda: ops.layer_norm_fwd(x, weight[:2], bias, 1e-5), r"weight must be \(C,\)"),
        (lambda: ops.layer_norm_fwd(x, weight, bias[:2], 1e-5), r"bias must be \(C,\)"),
        (lambda: ops.layer_norm_fwd(x, weight.int(), bias, 1e-5), "weight must be a floating-point"),
        (lambda: ops.layer_norm_fwd(x, weight, bias, -1.0), "eps must be a finite number >= 0"),
        (lambda: ops.layer_norm_fwd(x, weight, bias, float("nan")), "eps must be a finite number >= 0"),
        (lambda: ops.layer_norm_bwd(x[:1], x, weight, mean, rstd, True, True), "grad_out must have the shape of x"),
        (lambda: ops.layer_norm_bwd(x.double(), x, weight, mean, rstd, True, True), "grad_out must have the dtype of x"),
        (lambda: ops.layer_norm_bwd(x, x, weight, mean[:1], rstd, True, True), "mean must have x's shape"),
        (lambda: ops.layer_norm_bwd(x, x, weight, mean, rstd.double(), True, True), "rstd must be"),
        (lambda: ops.layer_norm_bwd(x, x, weight[:3], mean, rstd, True, True), r"weight must be \(C,\)"),
        (lambda: ops.layer_norm_bwd(x, x, None, mean, rstd, True, True), "with_weight needs weight"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


# ---- opcheck, torch.compile, double backward -----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["fp32", "no_params", "bf16_fp32_params", "strided_fp64", "bias_only"])
def test_opcheck(case):
    """The raw ops' schemas, fake kernels and autograd registration."""
    dtype = {"bf16_fp32_params": torch.bfloat16, "strided_fp64": torch.float64}.get(case, torch.float32)
    x = randn((2, 5, 12), dtype, seed=1)
    if case == "strided_fp64":
        x = randn((2, 12, 5), dtype, seed=1).transpose(1, 2)
    weight, bias = params(12, dtype=dtype if case != "bf16_fp32_params" else torch.float32,
                          weight=case not in ("no_params", "bias_only"), bias=case != "no_params")
    fwd_args = (leaf(x), *(None if t is None else leaf(t) for t in (weight, bias)), 1e-5)
    torch.library.opcheck(ops.layer_norm_fwd.default, fwd_args)
    _, mean, rstd = ops.layer_norm_fwd(x, weight, bias, 1e-5)
    g = randn(x.shape, dtype, seed=4)
    for with_weight in ((True, False) if weight is not None else (False,)):
        for with_bias in (True, False):
            torch.library.opcheck(ops.layer_norm_bwd.default, (g, x, weight, mean, rstd, with_weight, with_bias))


@pytest.mark.parametrize("affine", ["weight+bias", "none"])
def test_compile(fresh_dynamo, affine):
    """fullgraph compile with a dynamic size, forward and backward, against eager."""
    weight, bias = affine_params(affine, 16, dtype=torch.float32)
    weight, bias = (None if t is None else leaf(t) for t in (weight, bias))
    params_ = [t for t in (weight, bias) if t is not None]

    def fn(x, w, b):
        return sola_ops.layer_norm(x * 2, w, b, 1e-6) + 1
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for N in (5, 9):
        x = leaf(randn((2, N, 16), torch.float32, seed=N))
        out = compiled(x, weight, bias)
        want = fn(x, weight, bias)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        g = randn(out.shape, torch.float32, seed=3)
        for a, b in zip(torch.autograd.grad(out, [x] + params_, g), torch.autograd.grad(want, [x] + params_, g)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_double_backward_through_the_reference():
    x = leaf(randn((3, 6), torch.float64))
    weight, bias = (leaf(t) for t in params(6, dtype=torch.float64))
    check_double_backward(sola_ops.layer_norm, reference.layer_norm, (x, weight, bias))
    check_double_backward(lambda x: sola_ops.layer_norm(x, None, bias), lambda x: reference.layer_norm(x, None, bias),
                          (x,))


def test_third_order_against_finite_differences():
    """The gradient's second derivative too (gradgradcheck of the gradient), against finite differences rather
    than a reference: F.layer_norm's own third derivative is wrong (pytorch/pytorch#175754)."""
    x = leaf(randn((3, 4), torch.float64))
    weight, _ = (leaf(t) for t in params(4, dtype=torch.float64))

    def grads(x, weight):
        return torch.autograd.grad(sola_ops.layer_norm(x, weight, None, 1.0).sin().sum(), (x, weight),
                                   create_graph=True)
    assert torch.autograd.gradgradcheck(grads, (x, weight))
