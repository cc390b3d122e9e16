"""sola_ops.bias_gelu: F.gelu(x + bias, approximate) fused, forward and backward (dx and the bias gradient in
one pass), against the fp64 reference.

Each output is computed in fp32 (fp64 for fp64 x) and rounded once, so besides the FlashAttention rule
(conftest.py; the baseline is torch's F.gelu(x + bias) with the bias in x's dtype) every element is held to
one rounding of the output dtype plus a few fp32 (fp64) ulps of the computation (`assert_one_rounding`).
dbias is the column sum of the unrounded dx values, summed in fp32 (fp64) in a fixed order.

x is read in place when it is a "rows" view (last dim contiguous, leading dims collapsing to one row
stride), else copied; the CUDA kernels take 16-byte vectors when every row start is 16-byte aligned and C a
multiple of the vector (8 fp16 / bf16, 4 fp32, 2 fp64), else elements; the backward splits the rows into
slabs of at least 64 rows (one dbias partial each, at most 1024): the sizes and views below cover each."""
import math

import pytest
import torch
import torch.nn.functional as F

import sola_ops
from sola_ops import reference
from conftest import (ACC_EPS, COPIES, DEVICES, DTYPES, ROUNDING, ROWS_VIEW_IN_PLACE, ROWS_VIEW_KINDS, TINY, acc_dtype,
                      assert_fa_close, check_double_backward, leaf, ops_run, randn, requires_cuda, rows_view,
                      torch_threads)

ops = torch.ops.sola_ops

APPROX = ["none", "tanh"]


def make_inputs(shape, dtype, device="cpu", seed=0, bias=True, bias_dtype=torch.float32):
    """x ~ N(0, 2^2) (fc1's outputs: through GELU's bend and its flat negative side), bias ~ N(0, 1) (C,)."""
    x = randn(shape, dtype, device, seed, scale=2.0)
    b = randn((shape[-1],), bias_dtype, device, seed + 1) if bias else None
    return x, b


# Unit roundoff of each dtype: dbias is computed in x's acc dtype and rounded to the bias's own.
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def assert_one_rounding(ours, want, dtype, magnitude, name, x_dtype=None):
    """|ours - want| <= one rounding to dtype of |want| + 16 ulps of the computation times `magnitude`
    (the size of the terms it sums: 1 + erf(v / sqrt 2) cancels for negative v, which costs absolute, not
    relative, accuracy). x_dtype: the computation's input dtype when it is not dtype (dbias)."""
    assert ours.shape == want.shape and ours.dtype == dtype, name
    err = (ours.double() - want).abs()
    x_dtype = x_dtype or dtype
    rounding = ROUNDING[dtype] if x_dtype == dtype else UNIT[dtype] if UNIT[dtype] > ACC_EPS[x_dtype] else 0.0
    bound = rounding * want.abs() + 16 * ACC_EPS[x_dtype] * magnitude + TINY[dtype]
    bad = err > bound
    assert not bad.any(), (f"{name} ({dtype}): {int(bad.sum())} elements off by more than one rounding, worst "
                           f"{(err - bound).max().item():.3e} over the bound")


def gelu_lowp(x, bias, approximate):
    """The baseline: torch's own F.gelu(x + bias) with the bias in x's dtype (everything in x's dtype)."""
    return F.gelu(x if bias is None else x + bias.to(x.dtype), approximate=approximate)


def check_bias_gelu(x, bias, approximate="none", grad_out=None, lowp=True):
    """out, dx and dbias of sola_ops.bias_gelu against the fp64 autograd of F.gelu(x + bias): one rounding
    each (dbias: its sum's rounding too), and (lowp) the FlashAttention rule against torch in x's dtype.
    x: any view; bias: (C,) or None."""
    dtype = x.dtype
    x = leaf(x)
    bias = None if bias is None else leaf(bias)
    out = sola_ops.bias_gelu(x, bias, approximate)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device and out.is_contiguous()
    x64 = leaf(x.detach().double())
    b64 = None if bias is None else leaf(bias.detach().double())
    v64 = x64.detach() if b64 is None else x64.detach() + b64.detach()
    out64 = F.gelu(x64 if b64 is None else x64 + b64, approximate=approximate)
    assert_one_rounding(out, out64.detach(), dtype, v64.abs(), "out")
    g = randn(x.shape, dtype, x.device, seed=7) if grad_out is None else grad_out
    inputs, inputs64 = (x,) if bias is None else (x, bias), (x64,) if b64 is None else (x64, b64)
    grads = torch.autograd.grad(out, inputs, g)
    grads64 = torch.autograd.grad(out64, inputs64, g.double())
    dx, dx64 = grads[0], grads64[0]
    assert dx.dtype == dtype and dx.is_contiguous()
    # dx = g (cdf + v pdf): its terms are at most |g| (1 + |v|)
    dx_mag = g.double().abs() * (1 + v64.abs())
    assert_one_rounding(dx, dx64, dtype, dx_mag, "dx")
    if bias is not None:
        dbias, dbias64 = grads[1], grads64[1]
        assert dbias.dtype == bias.dtype and dbias.shape == bias.shape and dbias.device == bias.device
        # a sum of `rows` fp32 (fp64) values: at most rows - 1 roundings of the running sum, plus each term's
        # own error (the dx bound above), plus the rounding to bias's dtype
        rows = dx_mag.numel() // max(1, x.shape[-1])
        mag = dx_mag.reshape(-1, x.shape[-1]).sum(0) * (1 + rows / 16)
        assert_one_rounding(dbias, dbias64, bias.dtype, mag, "dbias", x_dtype=dtype)
    if lowp and x.numel():
        xlp = leaf(x.detach().clone())
        blp = None if bias is None else leaf(bias.detach().clone())
        out_lp = gelu_lowp(xlp, blp, approximate)
        assert_fa_close(out, out64, out_lp, dtype, "bias_gelu out")
        lp_inputs = (xlp,) if blp is None else (xlp, blp)
        for name, ours, r64, rlp in zip(("dx", "dbias"), grads, grads64, torch.autograd.grad(out_lp, lp_inputs, g)):
            assert_fa_close(ours, r64, rlp, dtype, f"bias_gelu {name}")
    return (out, *grads)


def assert_same(a, b, name=""):
    """The same values from another layout (another code path): bitwise on the CPU, whose loops run the same
    IEEE operations in the same order; on CUDA to one rounding (the vector and element kernels might contract
    a multiply-add differently, and split rows differently for dbias)."""
    if a.device.type == "cpu":
        assert torch.equal(a, b), name
    else:
        torch.testing.assert_close(a, b, rtol=2 * ROUNDING.get(a.dtype, 0.0) + 1e-5, atol=1e-5, msg=name)


# ---- values against the fp64 reference -------------------------------------------------------------------------

SHAPES = [(7,), (1,), (5, 1), (3, 33), (2, 3, 7), (4, 256), (2, 3, 4, 64), (2, 2, 3, 40), (130, 24)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
def test_dtypes_and_shapes(device, dtype, shape, approximate):
    """Every dtype, ranks 1 to 4, C = 1, 3, 7, 33 (off every vector width), 24, 40, 64, 256; 130 rows: three
    dbias partials on the CPU (64 rows each)."""
    check_bias_gelu(*make_inputs(shape, dtype, device), approximate)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(3, 33), (2, 5, 64)], ids=lambda s: "x".join(map(str, s)))
def test_without_bias(device, dtype, approximate, shape):
    """bias=None: plain F.gelu(x), no bias gradient; -0 stays -0 (x + a zero bias would make it +0)."""
    x, _ = make_inputs(shape, dtype, device, bias=False)
    check_bias_gelu(x, None, approximate)
    z = torch.tensor([-0.0, 0.0], dtype=dtype, device=device)
    assert torch.equal(torch.signbit(sola_ops.bias_gelu(z, approximate=approximate)), torch.tensor([True, False],
                                                                                                     device=device))
    # a zero bias: -0 + 0 = +0, as torch's x + bias
    zb = torch.zeros(2, device=device)
    assert not torch.signbit(sola_ops.bias_gelu(z, zb, approximate)).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_bias_dtypes(device, x_dtype, bias_dtype):
    """The bias in any float dtype, used in fp32 (fp64 for fp64 x) at its value; dbias in its own dtype."""
    check_bias_gelu(*make_inputs((37, 48), x_dtype, device, seed=2, bias_dtype=bias_dtype), "none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4099), (20000, 24), (1, 10003), (9000, 7)])
@pytest.mark.parametrize("approximate", APPROX)
def test_large(device, shape, approximate):
    """Long rows (the CPU's chunks and dbias column blocks cut rows; on CUDA many vector groups a row), and
    many short ones (many dbias partials: 20000 rows are 256 of 79 rows on the CPU)."""
    check_bias_gelu(*make_inputs(shape, torch.bfloat16, device, seed=3), approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_matches_torch_fp32_closely(approximate):
    """fp32 on the CPU: torch's formulas in the same precision, so close to torch's own F.gelu(x + bias) and
    its autograd: a few fp32 ulps of the terms apart (torch's CPU vector loops take their own erf / tanh
    approximations; 1 + erf cancels for negative x + bias; torch sums dbias in another order)."""
    x, b = (leaf(t) for t in make_inputs((64, 96), torch.float32, seed=5))
    out = sola_ops.bias_gelu(x, b, approximate)
    want = F.gelu(x + b, approximate=approximate)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
    g = randn(out.shape, torch.float32, seed=6)
    for a, w in zip(torch.autograd.grad(out, (x, b), g), torch.autograd.grad(want, (x, b), g)):
        torch.testing.assert_close(a, w, rtol=2e-6, atol=1e-5)


def test_cpu_fp32_erf_form_is_relatively_accurate():
    """The CPU's fp32 erf GELU and its derivative from the normal cdf's lower tail: within 16 ulp for negative
    v down to fp32's normal range (1 + erf(v / sqrt 2) cancelled: 0 below v = -5.7, ~100 ulp near v = -3;
    a^2's rounding in exp(-a^2 / 2) cost up to 60 ulp), within 4 ulp for v >= -1; 0 where it is denormal."""
    v = torch.linspace(-13, 8, 210000, dtype=torch.float64).float()
    want = v.double() * 0.5 * torch.special.erfc(-v.double() / math.sqrt(2))
    want_grad = 0.5 * torch.special.erfc(-v.double() / math.sqrt(2)) + v.double() * torch.exp(
        -v.double() ** 2 / 2) / math.sqrt(2 * math.pi)
    x = leaf(v.view(-1, 16).clone())
    out = sola_ops.bias_gelu(x)
    (dx,) = torch.autograd.grad(out, (x,), torch.ones_like(out))
    ulp = 2.0 ** -23 * want.abs()
    assert ((out.flatten().double() - want).abs() <= 16 * ulp).all(), "gelu off by more than 16 ulp"
    assert ((out.flatten().double() - want).abs() <= 4 * ulp)[v >= -1].all(), "gelu off by more than 4 ulp"
    grad_ulp = 2.0 ** -23 * want_grad.abs().clamp_min(0.25)  # near its zero (v = -0.75): the terms cdf, v pdf
    assert ((dx.flatten().double() - want_grad).abs() <= 8 * grad_ulp).all(), "gelu' off by more than 8 ulp"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", APPROX)
def test_dense_sweep(device, approximate):
    """fp32 x + bias swept densely over [-12, 12]: every range of the CPU's erf (|v| / sqrt 2 below 1, to 4,
    beyond) and tanh (inner below 0.625, beyond, saturated), each element within one rounding, both ways."""
    x = torch.linspace(-12, 12, 240001, dtype=torch.float64)[:-1].float().view(-1, 16).to(device)
    b = torch.linspace(-0.01, 0.01, 16, device=device)
    check_bias_gelu(x, b, approximate, lowp=False)
    check_bias_gelu(x, None, approximate, lowp=False)


def test_reference_is_torch():
    """sola_ops.reference.bias_gelu is F.gelu(x + bias) in fp32, rounded to x's dtype."""
    x, b = make_inputs((5, 16), torch.bfloat16, seed=4)
    for approximate in APPROX:
        want = F.gelu(x.float() + b, approximate=approximate).bfloat16()
        assert torch.equal(reference.bias_gelu(x, b, approximate), want)
        assert torch.equal(reference.bias_gelu(x, None, approximate), F.gelu(x.float(), approximate=approximate).bfloat16())


# ---- the bias gradient ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_no_separate_bias_reduction(device):
    """The backward is one sola_ops::bias_gelu_bwd: no aten::sum over the gradient for the bias (torch's
    F.gelu(x + bias) runs one: the check can fail)."""
    x, b = (leaf(t) for t in make_inputs((4, 9, 64), torch.float32, device))
    g = randn(x.shape, torch.float32, device, seed=2)
    out = sola_ops.bias_gelu(x, b)
    names = ops_run(lambda: torch.autograd.grad(out, (x, b), g))
    assert "sola_ops::bias_gelu_bwd" in names and "aten::sum" not in names, names
    want = F.gelu(x + b)
    assert "aten::sum" in ops_run(lambda: torch.autograd.grad(want, (x, b), g))


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_bias(device):
    """A bias that needs no grad gets none (and costs no sums: with_bias=False); x alone may need none."""
    x, b = make_inputs((6, 40), torch.float32, device)
    x = leaf(x)
    out = sola_ops.bias_gelu(x, b)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    want, _ = ops.bias_gelu_bwd(torch.ones_like(out), x.detach(), b, "none", False)
    assert torch.equal(dx, want) and b.grad is None
    assert ops.bias_gelu_bwd(torch.ones_like(out), x.detach(), b, "none", False)[1].shape == (0,)
    b = leaf(b)
    out = sola_ops.bias_gelu(x.detach(), b)
    (db,) = torch.autograd.grad(out, b, torch.ones_like(out))
    assert torch.equal(db, ops.bias_gelu_bwd(torch.ones_like(out), x.detach(), b.detach(), "none", True)[1])


@pytest.mark.parametrize("device", DEVICES)
def test_dbias_is_sum_of_unrounded_dx(device):
    """bf16: dbias sums the fp32 dx values before their rounding to bf16 (summing the rounded dx would miss
    the fp64 reference by far more)."""
    x, b = make_inputs((2000, 16), torch.bfloat16, device, seed=8)
    x, b = leaf(x), leaf(b)
    out = sola_ops.bias_gelu(x, b)
    g = randn(out.shape, torch.bfloat16, device, seed=9)
    dx, db = torch.autograd.grad(out, (x, b), g)
    x64, b64 = leaf(x.detach().double()), leaf(b.detach().double())
    (db64,) = torch.autograd.grad(F.gelu(x64 + b64), b64, g.double())
    err = (db.double() - db64).abs().max().item()
    err_rounded = (dx.double().sum(0) - db64).abs().max().item()
    assert err < err_rounded / 8, (err, err_rounded)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(300, 70), (5000, 64), (3, 2000)])
def test_deterministic(device, shape):
    """dx and dbias bitwise the same on every run (and on 1 or 2 CPU threads): a fixed summation order."""
    x, b = (leaf(t) for t in make_inputs(shape, torch.bfloat16, device))
    g = randn(x.shape, torch.bfloat16, device, seed=9)
    runs = []
    for n in (1, 2, 2):
        with torch_threads(n):
            out = sola_ops.bias_gelu(x, b)
            runs.append((out, *torch.autograd.grad(out, (x, b), g)))
    for a, c in zip(runs[0], runs[1]):
        assert torch.equal(a, c)
    for a, c in zip(runs[1], runs[2]):
        assert torch.equal(a, c)


# ---- layouts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [64, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channel_slices_read_in_place(device, dtype, C):
    """x a channel slice y[..., C:] of a (B, H, W, 2C) tensor (row stride 2C; a row start C elements in:
    16-byte aligned for C = 64, not for C = 7) and grad_out a slice too: read in place (no copy op runs on the
    CPU, the fp32 bias included), and the gradient lands in the right half of y's."""
    y = leaf(randn((2, 5, 6, 2 * C), dtype, device, seed=1, scale=2.0))
    b = leaf(randn((C,), torch.float32, device, seed=2))
    x = y[..., C:]
    assert not x.is_contiguous() and x.stride()[:3] == (5 * 6 * 2 * C, 6 * 2 * C, 2 * C)
    check_bias_gelu(x, b)
    if device == "cpu":
        assert not ops_run(sola_ops.bias_gelu, x.detach(), b.detach()) & COPIES
        g2 = randn((2, 5, 6, 2 * C), dtype, seed=3)
        assert not ops_run(ops.bias_gelu_bwd, g2[..., :C], x.detach(), b.detach(), "none", True) & COPIES
    out = sola_ops.bias_gelu(x, b)
    g = randn(out.shape, dtype, device, seed=2)
    dy, db = torch.autograd.grad(out, (y, b), g)
    dx, db2 = ops.bias_gelu_bwd(g, x.detach().contiguous(), b.detach(), "none", True)
    assert_same(dy[..., C:], dx, "dx")
    assert torch.equal(dy[..., :C], torch.zeros_like(dy[..., :C]))
    assert_same(db, db2, "dbias")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [64, 33])
@pytest.mark.parametrize("kind", ROWS_VIEW_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_strided_inputs(device, dtype, kind, C):
    """x and grad_out in any layout give the contiguous result (bitwise on the CPU); views that are not rows
    views are copied (the profiler sees the copy: the check can fail), rows views are not."""
    shape = (3, 13, C)
    x, g = rows_view(kind, shape, dtype, device, 1, scale=2.0), rows_view(kind, shape, dtype, device, 3, scale=2.0)
    b = randn((C,), acc_dtype(dtype), device, seed=2)  # in the kernels' dtype: no copy of its own
    out, dx, db = check_bias_gelu(x, b, grad_out=g)
    assert_same(out, sola_ops.bias_gelu(x.contiguous(), b), "out")
    dx2, db2 = ops.bias_gelu_bwd(g.contiguous(), x.contiguous(), b, "none", True)
    assert_same(dx, dx2, "dx")
    assert_same(db, db2.to(db.dtype), "dbias")
    if device == "cpu":
        copied = bool(ops_run(sola_ops.bias_gelu, x, b) & COPIES)
        assert copied == (kind not in ROWS_VIEW_IN_PLACE), kind


@pytest.mark.parametrize("device", DEVICES)
def test_bias_layouts(device):
    """A strided bias (every other element of a longer one) or an fp32 bias one element past a 32-byte
    boundary: copied to an aligned contiguous fp32 one, the same result."""
    x, b = make_inputs((9, 64), torch.bfloat16, device)
    want = sola_ops.bias_gelu(x, b)
    strided_b = torch.stack([b, b + 1], dim=1).reshape(-1)[::2]
    assert not strided_b.is_contiguous()
    assert torch.equal(sola_ops.bias_gelu(x, strided_b), want)
    off = torch.empty(65, device=device)[1:]
    off.copy_(b)
    assert off.data_ptr() % 32 != 0
    assert torch.equal(sola_ops.bias_gelu(x, off), want)
    check_bias_gelu(x, strided_b)


@pytest.mark.parametrize("device", DEVICES)
def test_size_one_dims(device):
    """Leading dims of size 1 have any stride; a size-1 last dim too: still rows views."""
    y = randn((4, 1, 3, 2), torch.float32, device, scale=2.0)
    x = y[..., :1]  # (4, 1, 3, 1), last-dim stride 1 but row stride 2
    check_bias_gelu(x, randn((1,), torch.float32, device, seed=1))
    col = randn((5, 3), torch.float32, device, seed=4).t()[:1]  # (1, 5), last-dim stride 3: copied
    check_bias_gelu(col, randn((5,), torch.float32, device, seed=5))
    if device == "cpu":
        assert not ops_run(sola_ops.bias_gelu, x, None) & COPIES


# ---- special values ------------------------------------------------------------------------------------------------

SPECIAL_X = [0.0, -0.0, 1.0, -2.5, 6.0, -6.0, 10.0, -10.0, -14.0, 1e4, -1e4, 1e20, -1e20, float("inf"), float("-inf"),
             float("nan")]
SPECIAL_BIAS = [0.0, -0.0, 1.0, -1.0, 0.5, -3.0, 20.0, -20.0, 1e4, -1e4, float("inf"), float("-inf"), float("nan"),
                2.0, -2.0, 3.0]


def torch_scalar_gelu(v, g, approximate):
    """torch's gelu and gelu_backward one element at a time: its CPU scalar loop, the formulas of its CUDA
    kernels and of ours. (Its CPU vector loop takes a vectorised erf whose erf(+inf) is NaN, so there
    F.gelu(+inf) = NaN where the scalar loop and CUDA give inf.)"""
    outs, grads = [], []
    for vi, gi in zip(v.reshape(-1), g.reshape(-1)):
        vi = leaf(vi.reshape(1))
        o = F.gelu(vi, approximate=approximate)
        (d,) = torch.autograd.grad(o, vi, gi.reshape(1))
        outs.append(o.detach())
        grads.append(d)
    return torch.cat(outs).view(v.shape), torch.cat(grads).view(v.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
def test_nan_inf_match_torch(device, dtype, approximate):
    """Every pair of special values of x and bias: out and dx NaN / inf exactly where torch's gelu on x + bias
    (computed in fp32, fp64 for fp64, as the op is) has them, the finite values within one rounding; dbias NaN
    in a column with a NaN dx, else its finite sum. gelu(-inf) = NaN, gelu'(+-inf) = NaN; tanh: an fp32 v^2
    overflowing (|v| > 1.8e19) makes gelu'(v) NaN, as torch's."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    C = len(SPECIAL_BIAS)  # 16: the vector kernels of every dtype
    x = torch.tensor(SPECIAL_X, dtype=torch.float32).repeat_interleave(3).view(-1, 1).expand(-1, C).contiguous()
    x = leaf(x.to(device, dtype))
    b = leaf(torch.tensor(SPECIAL_BIAS, device=device, dtype=acc))
    out = sola_ops.bias_gelu(x, b, approximate)
    g = torch.ones_like(out)
    dx, db = torch.autograd.grad(out, (x, b), g)
    v = x.detach().cpu().to(acc) + b.detach().cpu()
    want, want_dx = torch_scalar_gelu(v, g.cpu().to(acc), approximate)
    for name, ours, ref in (("out", out, want), ("dx", dx, want_dx)):
        ours, ref = ours.cpu().double(), ref.to(dtype).double()  # ref rounded once, as ours is
        assert torch.equal(ours.isnan(), ref.isnan()), f"{name}: NaN where torch has none or vice versa"
        assert torch.equal(ours.isinf(), ref.isinf()) and torch.equal(ours[ours.isinf()], ref[ref.isinf()]), name
        fin = ref.isfinite()
        mag = v.double().abs() if name == "out" else 1 + v.double().abs()
        bound = 2 * ROUNDING[dtype] * ref.abs() + 16 * ACC_EPS[dtype] * mag + 2 * TINY[dtype]
        assert ((ours[fin] - ref[fin]).abs() <= bound[fin]).all(), name
    want_db = want_dx.double().sum(0)
    db = db.cpu().double()
    assert torch.equal(db.isnan(), want_db.isnan()) and torch.equal(db.isinf(), want_db.isinf())
    one = torch.ones(1, dtype=dtype, device=device)
    assert sola_ops.bias_gelu(one * float("inf"), approximate=approximate).item() == float("inf")
    assert sola_ops.bias_gelu(one * float("-inf"), approximate=approximate).isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_element(device):
    """A NaN x spoils its own out and dx element and its column's dbias; a NaN bias its column."""
    x, b = make_inputs((3, 40, 64), torch.float32, device)
    x[1, 17, 5] = float("nan")
    b[60] = float("nan")
    x, b = leaf(x), leaf(b)
    out = sola_ops.bias_gelu(x, b)
    dx, db = torch.autograd.grad(out, (x, b), torch.ones_like(out))
    for t in (out, dx):
        assert t.isnan().sum().item() == 1 + 3 * 40 and t[1, 17, 5].isnan() and t[..., 60].isnan().all()
    assert db.isnan().sum().item() == 2 and db[5].isnan() and db[60].isnan()


# ---- empty, debug fill ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_empty(device, shape):
    """Nothing to compute: an empty output, and a backward with a zero bias gradient."""
    x, b = (leaf(t) for t in make_inputs(shape, torch.bfloat16, device))
    out = sola_ops.bias_gelu(x, b)
    assert out.shape == shape and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.shape == shape and b.grad.shape == b.shape and (b.grad == 0).all()
    with sola_ops.debug_nan_fill():
        dx, db = ops.bias_gelu_bwd(torch.empty_like(x), x.detach(), b.detach(), "tanh", True)
    assert dx.shape == shape and db.shape == b.shape and (db == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7, 59), (37, 64), (4, 1000), (300, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_output_written(device, dtype, shape):
    """With outputs pre-filled with NaN (debug mode), out, dx and dbias come back finite."""
    x, b = (leaf(t) for t in make_inputs(shape, dtype, device))
    with sola_ops.debug_nan_fill():
        out = sola_ops.bias_gelu(x, b)
        grads = torch.autograd.grad(out, (x, b), torch.ones_like(out))
    for t in (out, *grads):
        assert torch.isfinite(t).all()


# ---- autograd ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape,sliced,with_bias", [((3, 5), False, True), ((2, 3, 7), True, True), ((4,), False, True),
                                                    ((70, 3), False, True), ((3, 6), False, False)])
def test_gradcheck(device, approximate, shape, sliced, with_bias):
    """fp64 gradcheck of the extension op through x and the bias (x a channel slice; 70 rows: two dbias
    partials on the CPU)."""
    C = shape[-1]
    b = leaf(randn((C,), torch.float64, device, seed=1)) if with_bias else None
    if sliced:
        y = leaf(randn((*shape[:-1], 2 * C), torch.float64, device, scale=2.0))
        fn = lambda y, *b: sola_ops.bias_gelu(y[..., C:], *b, approximate=approximate)  # noqa: E731
    else:
        y = leaf(randn(shape, torch.float64, device, scale=2.0))
        fn = lambda y, *b: sola_ops.bias_gelu(y, *b, approximate=approximate)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y,) if b is None else (y, b), eps=1e-6, atol=1e-8)


def test_double_backward_through_the_reference():
    x, b = (leaf(t) for t in make_inputs((3, 6), torch.float64, bias_dtype=torch.float64))
    for approximate in ("none", "tanh"):
        check_double_backward(lambda x, b: sola_ops.bias_gelu(x, b, approximate),
                              lambda x, b: reference.bias_gelu(x, b, approximate), (x, b))


# ---- autocast ------------------------------------------------------------------------------------------------------

AUTOCAST = [("cpu", torch.bfloat16),
            pytest.param("cuda", torch.bfloat16, marks=[pytest.mark.cuda, requires_cuda]),
            pytest.param("cuda", torch.float16, marks=[pytest.mark.cuda, requires_cuda])]


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST)
def test_autocast(device, amp_dtype):
    """Under autocast an fp16 / bf16 / fp32 x is cast to the autocast dtype (as F.linear's output already
    is), the bias is read as it is (fp32); the output is the autocast dtype, dx comes back in x's own dtype
    and dbias in the bias's. float64 x stays float64."""
    for x_dtype, b_dtype in ((torch.float32, torch.float32), (amp_dtype, torch.float32), (torch.float32, amp_dtype)):
        x, b = make_inputs((3, 11, 40), torch.float32, device)
        x, b = leaf(x.to(x_dtype)), leaf(b.to(b_dtype))
        with torch.autocast(device, dtype=amp_dtype):
            out = sola_ops.bias_gelu(x, b)
        assert out.dtype == amp_dtype
        assert torch.equal(out, sola_ops.bias_gelu(x.detach().to(amp_dtype), b.detach()))
        g = randn(out.shape, amp_dtype, device, seed=2)
        dx, db = torch.autograd.grad(out, (x, b), g)
        assert dx.dtype == x_dtype and db.dtype == b_dtype
        want_dx, want_db = ops.bias_gelu_bwd(g, x.detach().to(amp_dtype), b.detach(), "none", True)
        assert torch.equal(dx, want_dx.to(x_dtype)) and torch.equal(db, want_db.to(b_dtype))
    x64, b64 = make_inputs((3, 8), torch.float64, device)
    with torch.autocast(device, dtype=amp_dtype):
        assert sola_ops.bias_gelu(x64, b64).dtype == torch.float64
        assert sola_ops.bias_gelu(x64, b64.float()).dtype == torch.float64


def test_mlp_use():
    """The model's call: bias_gelu(F.linear(y, fc1.weight), fc1.bias) under bf16 autocast gives
    F.gelu(fc1(y)) to bf16 rounding, and fc1's weight and bias gradients to bf16's accuracy."""
    torch.manual_seed(0)
    fc1 = torch.nn.Linear(32, 128)
    y = torch.randn(2, 7, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sola_ops.bias_gelu(F.linear(y, fc1.weight), fc1.bias)
        want = F.gelu(fc1(y))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), want.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn(ours.shape).bfloat16()
    gw, gb = torch.autograd.grad(ours, (fc1.weight, fc1.bias), g)
    ww, wb = torch.autograd.grad(want, (fc1.weight, fc1.bias), g)
    assert gw.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(gb, wb, rtol=2e-2, atol=0.1)
    torch.testing.assert_close(gw, ww, rtol=2e-2, atol=0.2)


# ---- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input():
    x, b = make_inputs((2, 5, 8), torch.float32)
    cases = [
        ((x, b[:7]), r"bias must be \(C,\) with C = 8 channels of x, got shape \(7,\)"),
        ((x, b.view(1, 8)), r"bias must be \(C,\) with C = 8"),
        ((x, x), r"bias must be \(C,\)"),
        ((x, b.int()), "bias must be a floating-point tensor, got torch.int32"),
        ((x, b.to("meta")), r"bias must be on the device of x \(cpu\), got meta"),
        ((x.int(), b), "x must be float16, bfloat16, float32 or float64, got torch.int32"),
        ((x.to(torch.complex64), b), "x must be float16"),
        ((x.bool(), None), "x must be float16"),
        ((x[0, 0, 0], None), "x must have at least one dim"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            sola_ops.bias_gelu(*args)
    for approximate in ("erf", "Tanh", "", None, 1):
        with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got"):
            sola_ops.bias_gelu(x, b, approximate)
    for args, match in [(([1.0, 2.0], b), "x must be a torch.Tensor"), ((x, 2.0), "bias must be a torch.Tensor or None"),
                        ((x, [1.0] * 8), "bias must be a torch.Tensor or None")]:
        with pytest.raises(TypeError, match=match):
            sola_ops.bias_gelu(*args)
    with pytest.raises(ValueError, match="bias must be a dense"):
        sola_ops.bias_gelu(x, b.to_sparse())


def test_raw_op_checks():
    """The C++ ops check for themselves (callers of torch.ops.sola_ops skip the Python checks)."""
    x, b = make_inputs((2, 5, 8), torch.float32)
    cases = [
        (lambda: ops.bias_gelu_fwd(x.int(), b), "x must be float16"),
        (lambda: ops.bias_gelu_fwd(x, b[:3]), r"bias must be \(C,\) with C = 8 channels of x, got shape \[3\]"),
        (lambda: ops.bias_gelu_fwd(x, b.int()), "bias must be a floating-point tensor"),
        (lambda: ops.bias_gelu_fwd(x, b, "erf"), "approximate must be 'none' or 'tanh', got 'erf'"),
        (lambda: ops.bias_gelu_fwd(x[0, 0, 0], None), "x must have at least one dim"),
        (lambda: ops.bias_gelu_bwd(x[:1], x, b), r"grad_out must have the shape of x \[2, 5, 8\]"),
        (lambda: ops.bias_gelu_bwd(x.half(), x, b), "grad_out must have the dtype of x"),
        (lambda: ops.bias_gelu_bwd(x, x, b[:2]), r"bias must be \(C,\)"),
        (lambda: ops.bias_gelu_bwd(x, x, b, "sigmoid"), "approximate must be 'none' or 'tanh', got 'sigmoid'"),
        (lambda: ops.bias_gelu_bwd(x, x, None, "none", True), "with_bias needs bias"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


@requires_cuda
@pytest.mark.cuda
def test_mixed_devices():
    x, b = make_inputs((2, 8), torch.float32)
    with pytest.raises(ValueError, match=r"bias must be on the device of x \(cpu\), got cuda"):
        sola_ops.bias_gelu(x, b.cuda())
    with pytest.raises(ValueError, match=r"bias must be on the device of x \(cuda:0\), got cpu"):
        sola_ops.bias_gelu(x.cuda(), b)
    with pytest.raises(ValueError, match="must be on the device of x"):
        ops.bias_gelu_bwd(x.cuda(), x.cuda(), b)
    with pytest.raises(ValueError, match="grad_out must be on the device of x"):
        ops.bias_gelu_bwd(x, x.cuda(), None, "none", False)


# ---- opcheck, torch.compile ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["fp32", "bf16_fp32_bias", "fp64_transposed", "rank1", "empty", "no_bias", "tanh",
                                  "slice"])
def test_opcheck(case):
    """The raw ops' schemas, fake kernels and autograd registration."""
    dtype = {"bf16_fp32_bias": torch.bfloat16, "fp64_transposed": torch.float64}.get(case, torch.float32)
    shape = {"rank1": (9,), "empty": (0, 4)}.get(case, (2, 5, 12))
    x, b = make_inputs(shape, dtype, seed=1, bias_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if case == "fp64_transposed":
        x = randn((2, 12, 5), dtype, seed=3).transpose(1, 2)
    elif case == "slice":
        x = randn((2, 5, 24), dtype, seed=2)[..., 12:]
    elif case == "no_bias":
        b = None
    approximate = "tanh" if case == "tanh" else "none"
    torch.library.opcheck(ops.bias_gelu_fwd.default, (leaf(x), None if b is None else leaf(b), approximate))
    torch.library.opcheck(ops.bias_gelu_bwd.default, (randn(shape, dtype, seed=4), x, b, approximate, b is not None))


@pytest.mark.parametrize("approximate", APPROX)
def test_compile(fresh_dynamo, approximate):
    """fullgraph compile with a dynamic size, F.linear then bias_gelu as the MLP calls it, forward and
    backward (x, fc1's weight and bias), against eager."""
    def fn(y, w, b):
        return sola_ops.bias_gelu(F.linear(y, w), b, approximate=approximate) * 2
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    w, b = leaf(randn((32, 16), torch.float32, seed=1)), leaf(randn((32,), torch.float32, seed=2))
    for N in (5, 9):
        y = leaf(randn((2, N, 16), torch.float32, seed=N))
        out = compiled(y, w, b)
        want = fn(y, w, b)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        g = randn(out.shape, torch.float32, seed=3)
        for a, c in zip(torch.autograd.grad(out, (y, w, b), g), torch.autograd.grad(want, (y, w, b), g)):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# ---- CUDA: vector and element paths, slabs, big grids --------------------------------------------------------------

@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("C", [1, 2, 4, 8, 12, 16, 62, 64, 510, 512, 4100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
def test_cuda_paths(dtype, C, approximate):
    """Widths at and off each dtype's vector width (2 fp64, 4 fp32, 8 fp16 / bf16; C > 256: several column
    groups), aligned and one element off, a channel slice, and the CPU kernels' result to one rounding."""
    x, b = make_inputs((333, C), dtype, "cuda", seed=C)
    check_bias_gelu(x, b, approximate)
    y = randn((333, 2 * C), dtype, "cuda", seed=C + 1, scale=2.0)
    check_bias_gelu(y[:, C:], b, approximate)
    off = randn((333 * C + 1,), dtype, "cuda", seed=C + 2, scale=2.0)[1:].view(333, C)  # misaligned: the element path
    out, dx, db = check_bias_gelu(off, b, approximate)
    g = randn(x.shape, dtype, "cuda", seed=7)
    cpu = (sola_ops.bias_gelu(off.cpu(), b.cpu(), approximate),
           *ops.bias_gelu_bwd(g.cpu(), off.cpu(), b.cpu(), approximate, True))
    for ours, ref in zip((out, dx, db), cpu):  # a sanity bound: each is held to one rounding above
        torch.testing.assert_close(ours.cpu().to(ref.dtype), ref, rtol=2 * ROUNDING[dtype] + 1e-5,
                                   atol=1e-10 if dtype == torch.float64 else 1e-3)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("C", [64, 7, 2048])
def test_cuda_grid_stride(monkeypatch, C):
    """SOLA_MAX_GRID=3 caps the grids: the forward's threads walk many items, the backward's blocks many slabs
    and column groups; dbias is bitwise the one of the uncapped grid (the slabs are set by the shape)."""
    x, b = make_inputs((2000, C), torch.bfloat16, "cuda", seed=2)
    g = randn(x.shape, torch.bfloat16, "cuda", seed=3)
    want = ops.bias_gelu_bwd(g, x, b, "none", True)
    monkeypatch.setenv("SOLA_MAX_GRID", "3")
    check_bias_gelu(x, b)
    got = ops.bias_gelu_bwd(g, x, b, "none", True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("rows,C", [(128 * 28 * 28, 512), (70000, 8), (3, 100000)])
def test_cuda_model_shapes_deterministic(rows, C):
    """The model's stage-2 MLP shape (1024 slabs of 98 rows), many rows of one vector (1024 slabs), one very
    wide row set (391 column groups): dbias to its fp64 reference and bitwise the same on a second run."""
    x, b = make_inputs((rows, C), torch.bfloat16, "cuda", seed=4)
    g = randn(x.shape, torch.bfloat16, "cuda", seed=5)
    dx, db = ops.bias_gelu_bwd(g, x, b, "none", True)
    dx2, db2 = ops.bias_gelu_bwd(g, x, b, "none", True)
    assert torch.equal(dx, dx2) and torch.equal(db, db2)
    x64, b64 = leaf(x.double()), leaf(b.double())
    (db64,) = torch.autograd.grad(F.gelu(x64 + b64), b64, g.double())
    mag = (g.double().abs() * (1 + (x64 + b64).detach().abs())).sum(0)
    assert ((db.double() - db64).abs() <= 64 * 2.0 ** -24 * mag + 1e-30).all()


@pytest.mark.cuda
@requires_cuda
def test_cuda_past_the_grid_cap():
    """2^27 + 64 bf16 elements: 2^24 + 8 vectors, more than 65535 blocks of 256 threads take at once, so the
    forward's capped grid walks; checked against torch in fp32 on the GPU."""
    rows, C = (1 << 21) + 1, 64
    x = torch.randn(rows, C, device="cuda", dtype=torch.bfloat16) * 2
    b = torch.randn(C, device="cuda")
    out = sola_ops.bias_gelu(x, b)
    want = F.gelu(x.float() + b)
    assert ((out.float() - want).abs() <= ROUNDING[torch.bfloat16] * want.abs() + 2.0 ** -20 * (x.float() + b).abs()
            + 1e-30).all()
