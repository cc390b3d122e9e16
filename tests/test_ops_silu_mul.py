"""sola_ops.silu_mul: x * F.silu(gate) fused, forward and backward, against the fp64 reference.

Each output is computed in fp32 (fp64 for fp64 inputs) and rounded once, so besides the FlashAttention
rule (conftest.py; the baseline is torch's x * F.silu(gate) in the input dtype) every element is held to
one rounding of the output dtype plus a few fp32 (fp64) ulps of the computation (`assert_one_rounding`).

The inputs are read in place when they are "rows" views (last dim contiguous, leading dims collapsing to
one row stride, as the model's channel slice gate = y[..., :C] is), else copied; the CUDA kernels take
16-byte vectors when every row start is 16-byte aligned and C a multiple of the vector (8 fp16 / bf16, 4
fp32, 2 fp64), else elements: the sizes and views below cover each."""
import pytest
import torch
import torch.nn.functional as F

import sola_ops
from sola_ops import reference
from conftest import (ACC_EPS, COPIES, DEVICES, DTYPES, ROUNDING, ROWS_VIEW_IN_PLACE, ROWS_VIEW_KINDS, TINY,
                      assert_fa_close, check_double_backward, leaf, ops_run, randn, requires_cuda, rows_view,
                      torch_threads)

ops = torch.ops.sola_ops


def make_inputs(shape, dtype, device="cpu", seed=0):
    """x ~ N(0, 1), gate ~ N(0, 3^2) (through silu's bend and into its flat negative side)."""
    return randn(shape, dtype, device, seed), randn(shape, dtype, device, seed + 1, scale=3.0)


def assert_one_rounding(ours, want, dtype, magnitude, name):
    """|ours - want| <= one rounding to dtype of |want| + 16 ulps of the computation times `magnitude`
    (the size of the terms it sums: cancellation in silu' costs absolute, not relative, accuracy)."""
    assert ours.shape == want.shape and ours.dtype == dtype, name
    err = (ours.double() - want).abs()
    bound = ROUNDING[dtype] * want.abs() + 16 * ACC_EPS[dtype] * magnitude + TINY[dtype]
    bad = err > bound
    assert not bad.any(), (f"{name} ({dtype}): {int(bad.sum())} elements off by more than one rounding, worst "
                           f"{(err - bound).max().item():.3e} over the bound")


def check_silu_mul(x, gate, grad_out=None, lowp=True):
    """out, dx and dgate of sola_ops.silu_mul against the fp64 autograd of x * F.silu(gate): one rounding
    each, and (lowp) the FlashAttention rule against torch in the input dtype. x, gate: any views."""
    dtype = x.dtype
    x, gate = leaf(x), leaf(gate)
    out = sola_ops.silu_mul(x, gate)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device and out.is_contiguous()
    x64, g64 = leaf(x.detach().double()), leaf(gate.detach().double())
    out64 = x64 * F.silu(g64)
    assert_one_rounding(out, out64.detach(), dtype, out64.detach().abs(), "out")
    g = randn(x.shape, dtype, x.device, seed=7) if grad_out is None else grad_out
    dx, dgate = torch.autograd.grad(out, (x, gate), g)
    dx64, dgate64 = torch.autograd.grad(out64, (x64, g64), g.double())
    assert dx.dtype == dgate.dtype == dtype and dx.is_contiguous() and dgate.is_contiguous()
    assert_one_rounding(dx, dx64, dtype, dx64.abs(), "dx")
    # dgate = g x sigma (1 + gate (1 - sigma)): its terms are at most |g x| (1 + |gate|)
    assert_one_rounding(dgate, dgate64, dtype, (g.double() * x64.detach()).abs() * (1 + g64.detach().abs()), "dgate")
    if lowp and x.numel():
        xlp, glp = leaf(x.detach().clone()), leaf(gate.detach().clone())
        out_lp = xlp * F.silu(glp)
        assert_fa_close(out, out64, out_lp, dtype, "silu_mul out")
        for name, ours, r64, rlp in zip(("dx", "dgate"), (dx, dgate), (dx64, dgate64),
                                        torch.autograd.grad(out_lp, (xlp, glp), g)):
            assert_fa_close(ours, r64, rlp, dtype, f"silu_mul {name}")
    return out, dx, dgate


def assert_same(a, b, name=""):
    """The same values from another layout (another code path): bitwise on the CPU, whose vector loops and
    their scalar tails run the same IEEE operations; on CUDA to one rounding (the vector and element
    kernels might contract a multiply-add differently)."""
    if a.device.type == "cpu":
        assert torch.equal(a, b), name
    else:
        torch.testing.assert_close(a, b, rtol=2 * ROUNDING[a.dtype] + 1e-6, atol=1e-6, msg=name)


# ---- values against the fp64 reference -------------------------------------------------------------------------

SHAPES = [(7,), (1,), (5, 1), (3, 33), (2, 3, 7), (4, 200), (2, 3, 4, 64), (2, 1, 3, 2, 3), (2, 2, 2, 3, 40)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_shapes(device, dtype, shape):
    """Every dtype, ranks 1 to 5, C = 1, 3, 7, 33 (off every vector width), 40, 64, 200."""
    check_silu_mul(*make_inputs(shape, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4099), (20000, 24), (1, 100003)])
def test_large_rows(device, shape):
    """Long rows (the CPU kernel's chunks cut rows; on CUDA many vectors a row), and many short ones."""
    check_silu_mul(*make_inputs(shape, torch.bfloat16, device, seed=3))


def test_matches_torch_fp32_closely():
    """fp32 on the CPU: torch's formulas in the same precision, so within a few ulps of torch's own result."""
    x, gate = (leaf(t) for t in make_inputs((64, 96), torch.float32, seed=5))
    out = sola_ops.silu_mul(x, gate)
    want = x * F.silu(gate)
    torch.testing.assert_close(out, want, rtol=4e-7, atol=1e-30)
    g = randn(out.shape, torch.float32, seed=6)
    for a, b in zip(torch.autograd.grad(out, (x, gate), g), torch.autograd.grad(want, (x, gate), g)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


# ---- layouts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [64, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channel_slices_read_in_place(device, dtype, C):
    """The model's gate: y[..., :C] of a (B, H, W, 2C) projection, and x = y[..., C:] (a row start C
    elements in: 16-byte aligned for C = 64, not for C = 7); both read in place (no copy op runs on the
    CPU), and their gradients land in the right halves of y's."""
    y = leaf(randn((2, 5, 6, 2 * C), dtype, device, seed=1, scale=2.0))
    x, gate = y[..., C:], y[..., :C]
    assert not gate.is_contiguous() and gate.stride()[:3] == (5 * 6 * 2 * C, 6 * 2 * C, 2 * C)
    check_silu_mul(x, gate)
    if device == "cpu":
        assert not ops_run(sola_ops.silu_mul, x.detach(), gate.detach()) & COPIES
        g = randn(x.shape, dtype, seed=2)
        assert not ops_run(ops.silu_mul_bwd, g[..., :], x.detach(), gate.detach()) & COPIES
    out = sola_ops.silu_mul(x, gate)
    g = randn(out.shape, dtype, device, seed=2)
    (dy,) = torch.autograd.grad(out, y, g)
    dx, dgate = ops.silu_mul_bwd(g, x.detach().contiguous(), gate.detach().contiguous())
    assert_same(dy[..., C:], dx, "dx")
    assert_same(dy[..., :C], dgate, "dgate")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [64, 33])
@pytest.mark.parametrize("kind", ROWS_VIEW_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_strided_inputs(device, dtype, kind, C):
    """x, gate and grad_out in any layout give the contiguous result bitwise; views that are not rows
    views are copied (the profiler sees the copy: the check above can fail), rows views are not."""
    shape = (3, 13, C)
    x, gate = rows_view(kind, shape, dtype, device, 1), rows_view(kind, shape, dtype, device, 2)
    g = rows_view(kind, shape, dtype, device, 3)
    out, dx, dgate = check_silu_mul(x, gate, grad_out=g)
    want = sola_ops.silu_mul(x.contiguous(), gate.contiguous())
    assert_same(out, want, "out")
    for name, a, b in zip(("dx", "dgate"), (dx, dgate),
                          ops.silu_mul_bwd(g.contiguous(), x.contiguous(), gate.contiguous())):
        assert_same(a, b, name)
    if device == "cpu":
        copied = bool(ops_run(sola_ops.silu_mul, x, gate) & COPIES)
        assert copied == (kind not in ROWS_VIEW_IN_PLACE), kind
    # one input strided, the other contiguous
    assert_same(sola_ops.silu_mul(x.contiguous(), gate), want, "x contiguous")
    assert_same(sola_ops.silu_mul(x, gate.contiguous()), want, "gate contiguous")


@pytest.mark.parametrize("device", DEVICES)
def test_size_one_dims(device):
    """Leading dims of size 1 have any stride; a size-1 last dim too: still rows views."""
    y = randn((4, 1, 3, 2), torch.float32, device)
    x, gate = y[..., :1], y[..., 1:]  # (4, 1, 3, 1), last-dim stride 1 but row stride 2
    check_silu_mul(x, gate)
    col = randn((5, 3), torch.float32, device, seed=4).t()[:1]  # (1, 5), last-dim stride 3: copied
    check_silu_mul(col, col.flip(-1))
    if device == "cpu":
        assert not ops_run(sola_ops.silu_mul, x, gate) & COPIES


# ---- special values ------------------------------------------------------------------------------------------------

SPECIAL_X = [0.0, -0.0, 1.0, -2.5, 1e4, float("inf"), float("-inf"), float("nan")]
SPECIAL_GATE = [0.0, -0.0, 1.0, -1.0, -1.28, 5.0, -5.0, 20.0, -20.0, 87.5, -87.5, 88.5, -88.5, -89.0, 100.0, -100.0,
                1e4, -1e4, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_match_torch(device, dtype):
    """Every pair of special values: out, dx and dgate NaN / inf exactly where torch's x * F.silu(gate) and
    its autograd (computed in fp32, fp64 for fp64, as the op is) have them, the finite values within one
    rounding. torch on the CPU: silu(+inf) = inf, silu(-inf) = NaN, silu'(+-inf) = NaN, silu(NaN) = NaN."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xs, gs = torch.meshgrid(torch.tensor(SPECIAL_X), torch.tensor(SPECIAL_GATE), indexing="ij")
    x, gate = leaf(xs.reshape(-1).to(device, dtype)), leaf(gs.reshape(-1).to(device, dtype))
    # 16 lanes of each pair, so the CPU's vector loops and the CUDA vector kernels see them too
    x, gate = (leaf(t.detach().repeat_interleave(16)) for t in (x, gate))
    out = sola_ops.silu_mul(x, gate)
    g = torch.ones_like(out)
    dx, dgate = torch.autograd.grad(out, (x, gate), g)
    xa, ga = leaf(x.detach().cpu().to(acc)), leaf(gate.detach().cpu().to(acc))
    want = xa * F.silu(ga)
    want_dx, want_dgate = torch.autograd.grad(want, (xa, ga), torch.ones_like(want))
    for name, ours, ref in (("out", out, want), ("dx", dx, want_dx), ("dgate", dgate, want_dgate)):
        ours, ref = ours.cpu().double(), ref.detach().to(dtype).double()  # ref rounded once, as ours is
        assert torch.equal(ours.isnan(), ref.isnan()), f"{name}: NaN where torch has none or vice versa"
        assert torch.equal(ours.isinf(), ref.isinf()) and torch.equal(ours[ours.isinf()], ref[ref.isinf()]), name
        # one rounding each (ours and the reference's) and the computation's ulps: of |x| (1 + |gate|) for
        # dgate (its cancellation near gate = -1.28), of the value otherwise
        mag = (xa.detach().abs() * (1 + ga.detach().abs())).double() if name == "dgate" else ref.abs()
        bound = 2 * ROUNDING[dtype] * ref.abs() + 16 * ACC_EPS[dtype] * mag + 2 * TINY[dtype]
        fin = ref.isfinite()
        assert ((ours[fin] - ref[fin]).abs() <= bound[fin]).all(), name
    one = torch.ones(1, dtype=dtype, device=device)
    assert sola_ops.silu_mul(one, one * float("inf")).item() == float("inf")
    assert sola_ops.silu_mul(one, one * float("-inf")).isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_element(device):
    x, gate = make_inputs((3, 40, 64), torch.float32, device)
    x[1, 17, 5] = float("nan")
    gate[2, 3, 60] = float("nan")
    x, gate = leaf(x), leaf(gate)
    out = sola_ops.silu_mul(x, gate)
    dx, dgate = torch.autograd.grad(out, (x, gate), torch.ones_like(out))
    for t in (out, dx, dgate):
        assert t.isnan().sum().item() <= 2 and torch.isnan(t[2, 3, 60])
    assert out[1, 17, 5].isnan() and dgate[1, 17, 5].isnan() and not dx[1, 17, 5].isnan()


# ---- empty, debug fill, determinism -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_empty(device, shape):
    x, gate = (leaf(t) for t in make_inputs(shape, torch.bfloat16, device))
    out = sola_ops.silu_mul(x, gate)
    assert out.shape == shape and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.shape == gate.grad.shape == shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7, 59), (37, 64), (4, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_output_written(device, dtype, shape):
    """With outputs pre-filled with NaN (debug mode), out, dx and dgate come back finite."""
    x, gate = (leaf(t) for t in make_inputs(shape, dtype, device))
    with sola_ops.debug_nan_fill():
        out = sola_ops.silu_mul(x, gate)
        grads = torch.autograd.grad(out, (x, gate), torch.ones_like(out))
    for t in (out, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    """Elementwise, so bitwise the same on every run (and on 1 or 2 CPU threads)."""
    x, gate = (leaf(t) for t in make_inputs((300, 70), torch.bfloat16, device))
    g = randn(x.shape, torch.bfloat16, device, seed=9)
    runs = []
    for n in (1, 2, 2):
        with torch_threads(n):
            out = sola_ops.silu_mul(x, gate)
            runs.append((out, *torch.autograd.grad(out, (x, gate), g)))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[1], runs[2]):
        assert torch.equal(a, b)


# ---- autograd ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,sliced", [((3, 5), False), ((2, 3, 7), True), ((4,), False)])
def test_gradcheck(device, shape, sliced):
    x = leaf(randn(shape, torch.float64, device))
    if sliced:
        gate = leaf(randn((*shape[:-1], 2 * shape[-1]), torch.float64, device, seed=1, scale=3.0))
        fn = lambda x, y: sola_ops.silu_mul(x, y[..., :shape[-1]])  # noqa: E731
    else:
        gate = leaf(randn(shape, torch.float64, device, seed=1, scale=3.0))
        fn = sola_ops.silu_mul
    assert torch.autograd.gradcheck(fn, (x, gate), eps=1e-6, atol=1e-8)


def test_one_input_requires_grad():
    """Only the input that requires grad gets one."""
    x, gate = make_inputs((4, 8), torch.float32)
    gate = leaf(gate)
    sola_ops.silu_mul(x, gate).sum().backward()
    assert x.grad is None and gate.grad is not None
    x64, g64 = leaf(x.double()), leaf(gate.detach().double())
    (want,) = torch.autograd.grad((x64 * F.silu(g64)).sum(), g64)
    torch.testing.assert_close(gate.grad.double(), want, rtol=1e-6, atol=1e-7)


def test_double_backward_through_the_reference():
    x, gate = (leaf(t) for t in make_inputs((3, 6), torch.float64))
    check_double_backward(sola_ops.silu_mul, reference.silu_mul, (x, gate))
    check_double_backward(lambda x: sola_ops.silu_mul(x, x * 0.5), lambda x: reference.silu_mul(x, x * 0.5), (x,))


# ---- autocast ------------------------------------------------------------------------------------------------------

AUTOCAST = [("cpu", torch.bfloat16),
            pytest.param("cuda", torch.bfloat16, marks=[pytest.mark.cuda, requires_cuda]),
            pytest.param("cuda", torch.float16, marks=[pytest.mark.cuda, requires_cuda])]


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST)
def test_autocast(device, amp_dtype):
    """Under autocast float16 / bfloat16 / float32 inputs are cast to the autocast dtype (as SDPA and
    depthwise_conv3x3 are), so mixed x and gate dtypes work there and the output is the autocast dtype;
    the gradients come back in each input's own dtype. float64 stays float64 (and so a float64 x with a
    bfloat16 gate is an error naming gate, as outside autocast)."""
    for x_dtype, g_dtype in ((torch.float32, amp_dtype), (amp_dtype, torch.float32), (torch.float32, torch.float32),
                             (amp_dtype, amp_dtype)):
        x, gate = make_inputs((3, 11, 40), torch.float32, device)
        x, gate = leaf(x.to(x_dtype)), leaf(gate.to(g_dtype))
        with torch.autocast(device, dtype=amp_dtype):
            out = sola_ops.silu_mul(x, gate)
        assert out.dtype == amp_dtype
        plain = sola_ops.silu_mul(x.to(amp_dtype), gate.to(amp_dtype))
        assert torch.equal(out, plain)
        g = randn(out.shape, amp_dtype, device, seed=2)
        dx, dgate = torch.autograd.grad(out, (x, gate), g)
        assert dx.dtype == x_dtype and dgate.dtype == g_dtype
        want = ops.silu_mul_bwd(g, x.detach().to(amp_dtype), gate.detach().to(amp_dtype))
        assert torch.equal(dx, want[0].to(x_dtype)) and torch.equal(dgate, want[1].to(g_dtype))
    x64, gate64 = make_inputs((3, 8), torch.float64, device)
    with torch.autocast(device, dtype=amp_dtype):
        assert sola_ops.silu_mul(x64, gate64).dtype == torch.float64
        with pytest.raises(ValueError, match="gate must have the dtype of x"):
            sola_ops.silu_mul(x64, gate64.to(amp_dtype))


# ---- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input():
    x, gate = make_inputs((2, 5, 8), torch.float32)
    cases = [
        ((x, gate[..., :7]), r"gate must have the shape of x \[2, 5, 8\] \(no broadcasting\), got \[2, 5, 7\]"),
        ((x, gate[0]), r"gate must have the shape of x"),  # broadcastable, still refused
        ((x, gate[:, :1]), r"gate must have the shape of x"),
        ((x, gate.double()), r"gate must have the dtype of x \(torch.float32\), got torch.float64"),
        ((x, gate.bfloat16()), "gate must have the dtype of x"),
        ((x, gate.int()), "gate must have the dtype of x"),
        ((x.int(), gate.int()), "x must be float16, bfloat16, float32 or float64, got torch.int32"),
        ((x.to(torch.complex64), gate.to(torch.complex64)), "x must be float16"),
        ((x.bool(), gate), "x must be float16"),
        ((x, gate.to("meta")), r"gate must be on the device of x \(cpu\), got meta"),
        ((x[0, 0, 0], gate[0, 0, 0]), "x must have at least one dim"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            sola_ops.silu_mul(*args)
    for args, match in [(([1.0, 2.0], gate), "x must be a torch.Tensor"), ((x, None), "gate must be a torch.Tensor"),
                        ((x, 2.0), "gate must be a torch.Tensor")]:
        with pytest.raises(TypeError, match=match):
            sola_ops.silu_mul(*args)
    with pytest.raises(ValueError, match="gate must be a dense"):
        sola_ops.silu_mul(x, gate.to_sparse())


def test_raw_op_checks():
    """The C++ ops check for themselves (callers of torch.ops.sola_ops skip the Python checks)."""
    x, gate = make_inputs((2, 5, 8), torch.float32)
    cases = [
        (lambda: ops.silu_mul_fwd(x.int(), gate.int()), "x must be float16"),
        (lambda: ops.silu_mul_fwd(x, gate[..., :3]), r"gate must have the shape of x \[2, 5, 8\] \(no broadcasting\)"),
        (lambda: ops.silu_mul_fwd(x, gate.double()), r"gate must have the dtype of x \(Float\), got Double"),
        (lambda: ops.silu_mul_fwd(x[0, 0, 0], gate[0, 0, 0]), "x must have at least one dim"),
        (lambda: ops.silu_mul_bwd(x[:1], x, gate), "grad_out must have the shape of x"),
        (lambda: ops.silu_mul_bwd(x.half(), x, gate), "grad_out must have the dtype of x"),
        (lambda: ops.silu_mul_bwd(x, x, gate[:, :2]), "gate must have the shape of x"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


@requires_cuda
@pytest.mark.cuda
def test_mixed_devices():
    x, gate = make_inputs((2, 8), torch.float32)
    with pytest.raises(ValueError, match=r"gate must be on the device of x \(cpu\), got cuda"):
        sola_ops.silu_mul(x, gate.cuda())
    with pytest.raises(ValueError, match=r"gate must be on the device of x \(cuda:0\), got cpu"):
        sola_ops.silu_mul(x.cuda(), gate)
    with pytest.raises(ValueError, match="must be on the device of x"):
        ops.silu_mul_bwd(x.cuda(), x.cuda(), gate)


# ---- opcheck, torch.compile ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["fp32", "bf16_slice", "fp64_transposed", "rank1", "empty"])
def test_opcheck(case):
    """The raw ops' schemas, fake kernels and autograd registration."""
    dtype = {"bf16_slice": torch.bfloat16, "fp64_transposed": torch.float64}.get(case, torch.float32)
    shape = {"rank1": (9,), "empty": (0, 4)}.get(case, (2, 5, 12))
    x, gate = make_inputs(shape, dtype, seed=1)
    if case == "bf16_slice":
        gate = randn((2, 5, 24), dtype, seed=2)[..., :12]
    elif case == "fp64_transposed":
        x = randn((2, 12, 5), dtype, seed=3).transpose(1, 2)
    torch.library.opcheck(ops.silu_mul_fwd.default, (leaf(x), leaf(gate)))
    torch.library.opcheck(ops.silu_mul_bwd.default, (randn(shape, dtype, seed=4), x, gate))


def test_compile(fresh_dynamo):
    """fullgraph compile with a dynamic size and a channel-slice gate, forward and backward, against eager."""
    def fn(x, y):
        C = x.shape[-1]
        return sola_ops.silu_mul(x * 2, y[..., :C]) + 1
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for N in (5, 9):
        x = leaf(randn((2, N, 16), torch.float32, seed=N))
        y = leaf(randn((2, N, 32), torch.float32, seed=N + 1))
        out = compiled(x, y)
        want = fn(x, y)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        g = randn(out.shape, torch.float32, seed=3)
        for a, b in zip(torch.autograd.grad(out, (x, y), g), torch.autograd.grad(want, (x, y), g)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- CUDA: vector and element paths, big grids ---------------------------------------------------------------------

@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("C", [1, 2, 4, 8, 12, 16, 62, 64, 510, 512, 4100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_paths(dtype, C):
    """Widths at and off each dtype's vector width (2 fp64, 4 fp32, 8 fp16 / bf16), aligned and one
    element off, the model's channel slices (vector path when 2C is a multiple of the vector), and the
    CPU kernels' result to one rounding."""
    x, gate = make_inputs((333, C), dtype, "cuda", seed=C)
    check_silu_mul(x, gate)
    y = randn((333, 2 * C), dtype, "cuda", seed=C + 1, scale=2.0)
    check_silu_mul(y[:, C:], y[:, :C])
    off = randn((333 * C + 1,), dtype, "cuda", seed=C + 2)[1:].view(333, C)  # misaligned: the element path
    out, dx, dgate = check_silu_mul(off, gate)
    g = randn(x.shape, dtype, "cuda", seed=7)
    want = (sola_ops.silu_mul(off.cpu(), gate.cpu()), *ops.silu_mul_bwd(g.cpu(), off.cpu(), gate.cpu()))
    for ours, ref in zip((out, dx, dgate), want):  # a sanity bound: each is held to one rounding above
        torch.testing.assert_close(ours.cpu(), ref, rtol=2 * ROUNDING[dtype] + 1e-5,
                                   atol=1e-10 if dtype == torch.float64 else 1e-3)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("C", [64, 7])
def test_cuda_grid_stride(monkeypatch, C):
    """SOLA_MAX_GRID=3 caps the grid: every thread walks many (row, vector) items."""
    monkeypatch.setenv("SOLA_MAX_GRID", "3")
    check_silu_mul(*make_inputs((2000, C), torch.bfloat16, "cuda", seed=2))


@pytest.mark.cuda
@requires_cuda
def test_cuda_past_the_grid_cap():
    """2^27 + 8 bf16 elements (x, gate: 256 MB each): 2^24 + 1 vectors, more than 65535 blocks of 256
    threads take at once, so the capped grid walks; checked against torch in fp32 on the GPU."""
    rows, C = (1 << 21) + 1, 64
    x = torch.randn(rows, C, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(rows, C, device="cuda", dtype=torch.bfloat16) * 3
    out = sola_ops.silu_mul(x, gate)
    want = x.float() * F.silu(gate.float())
    assert ((out.float() - want).abs() <= (ROUNDING[torch.bfloat16] + 2.0 ** -20) * want.abs() + 1e-30).all()
