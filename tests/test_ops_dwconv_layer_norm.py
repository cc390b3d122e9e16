"""sola_ops.depthwise_conv3x3_layer_norm: (out, normed) = a depthwise conv and the LayerNorm of its output
as one autograd node, whose backward adds out's own gradient inside the LayerNorm's (layer_norm_bwd's
addend). Against the fp64 reference and the two separate ops; the raw op's addend; layouts, NaN, bad input,
compile."""
import pytest
import torch

import sola_ops
from sola_ops import reference
from conftest import (DEVICES, DTYPES, assert_fa_close, check_double_backward, leaf, ops_run, randn, requires_cuda,
                      upcast)
from test_ops_dwconv import dwconv_lowp, params as conv_params
from test_ops_layer_norm import layer_norm_lowp, params as norm_params

ops = torch.ops.sola_ops
NAMES = ("dx", "dconv_weight", "dconv_bias", "dnorm_weight", "dnorm_bias")


def make_inputs(shape, dtype, device, conv_bias=True, norm_weight=True, norm_bias=True):
    """x and the four parameters (None where not given): fp32 parameters, as a model's under autocast
    (fp64 for fp64 x, whose gradients would otherwise carry fp32's rounding)."""
    C = shape[-1]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    cw, cb = conv_params(C, device, pdtype, bias=conv_bias)
    nw, nb = norm_params(C, device, pdtype, weight=norm_weight, bias=norm_bias)
    return randn(shape, dtype, device), cw, cb, nw, nb


def two_calls(x, cw, cb, nw, nb, residual=True, eps=1e-5):
    out = sola_ops.depthwise_conv3x3(x, cw, cb, residual=residual)
    return out, sola_ops.layer_norm(out, nw, nb, eps)


def check_fused(x, cw, cb, nw, nb, residual=True, eps=1e-5):
    """Forward bitwise equal to the two ops (the same kernels); every gradient, from both outputs at once,
    against the fp64 reference and a PyTorch composite in x's dtype (FlashAttention rule)."""
    dtype = x.dtype
    inputs = [None if t is None else leaf(t) for t in (x, cw, cb, nw, nb)]
    out, normed = sola_ops.depthwise_conv3x3_layer_norm(*inputs, residual=residual, eps=eps)
    want_out, want_normed = two_calls(*inputs, residual=residual, eps=eps)
    assert out.dtype == normed.dtype == dtype and out.shape == normed.shape == x.shape
    assert torch.equal(out, want_out) and torch.equal(normed, want_normed)

    i64, ilp = upcast(inputs), upcast(inputs, dtype)
    out64 = reference.depthwise_conv3x3(*i64[:3], residual=residual)
    normed64 = reference.layer_norm(out64, *i64[3:], eps)
    out_lp = dwconv_lowp(*ilp[:3], residual=residual)
    normed_lp = layer_norm_lowp(out_lp, *ilp[3:], eps)
    assert_fa_close(out, out64, out_lp, dtype, "out")
    assert_fa_close(normed, normed64, normed_lp, dtype, "normed")

    g_out, g_normed = randn(x.shape, dtype, x.device, seed=7), randn(x.shape, dtype, x.device, seed=8)
    given = [(n, t, t64, tlp) for n, t, t64, tlp in zip(NAMES, inputs, i64, ilp) if t is not None]

    def grads(o, n, ts, go=g_out, gn=g_normed):
        return torch.autograd.grad((o, n), ts, (go.to(o.dtype), gn.to(n.dtype)))
    ours = grads(out, normed, [g[1] for g in given])
    r64 = grads(out64, normed64, [g[2] for g in given])
    rlp = grads(out_lp, normed_lp, [g[3] for g in given])
    for (name, t, _, _), o, a, b in zip(given, ours, r64, rlp):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_fa_close(o, a, b, dtype, name)
    return inputs, ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False])
def test_dtypes(device, dtype, residual):
    check_fused(*make_inputs((2, 9, 7, 24), dtype, device), residual=residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 3, 7), (2, 9, 17, 66), (1, 5, 4, 200), (1, 3, 3, 1000)])
def test_awkward_sizes(device, shape):
    """One channel, odd widths (the CUDA scalar paths), rows past the LayerNorm's register cache (1000)."""
    check_fused(*make_inputs(shape, torch.bfloat16, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("missing", ["conv_bias", "norm_weight", "norm_bias", "all"])
def test_optional_parameters(device, missing):
    have = {name: missing not in (name, "all") for name in ("conv_bias", "norm_weight", "norm_bias")}
    check_fused(*make_inputs((2, 5, 6, 16), torch.float32, device, **have))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_the_two_ops(device, dtype):
    """In fp32 / fp64 the sum's extra rounding is below the gradients' own: the two ops' autograd graph
    and the fused node agree to the last few bits."""
    inputs = [leaf(t) for t in make_inputs((2, 6, 5, 24), dtype, device)]
    g = (randn((2, 6, 5, 24), dtype, device, seed=7), randn((2, 6, 5, 24), dtype, device, seed=8))
    fused = torch.autograd.grad(sola_ops.depthwise_conv3x3_layer_norm(*inputs, residual=True), inputs, g)
    split = torch.autograd.grad(two_calls(*inputs), inputs, g)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, b in zip(NAMES, fused, split):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", ["out", "normed"])
def test_one_output_used(device, used):
    """An unused output's gradient is zero (materialised by autograd), so the other's alone comes back."""
    inputs = [leaf(t) for t in make_inputs((2, 5, 4, 8), torch.float64, device)]
    out, normed = sola_ops.depthwise_conv3x3_layer_norm(*inputs, residual=True)
    want_out, want_normed = two_calls(*inputs)
    ours = torch.autograd.grad((out if used == "out" else normed).square().sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((want_out if used == "out" else want_normed).square().sum(), inputs,
                               allow_unused=True)
    for name, a, b in zip(NAMES, ours, want):
        if b is None:  # the norm's parameters when only out is used
            assert a is None or (a == 0).all(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_parameters(device):
    """Parameters that want no gradient get none; the others' are unchanged."""
    x, cw, cb, nw, nb = make_inputs((2, 5, 4, 8), torch.float32, device)
    x, cw, nb = leaf(x), leaf(cw), leaf(nb)
    out, normed = sola_ops.depthwise_conv3x3_layer_norm(x, cw, cb, nw, nb, residual=True)
    (out.sum() + normed.square().sum()).backward()
    assert x.grad is not None and cw.grad is not None and nb.grad is not None
    assert cb.grad is None and nw.grad is None


def test_frozen_conv_skips_its_backward():
    """A frozen conv on an input that wants no gradient runs no conv backward (the norm's parameters still
    get theirs), as the two separate ops' graph would."""
    x, cw, cb, nw, nb = make_inputs((2, 5, 4, 8), torch.float32, "cpu")
    nw, nb = leaf(nw), leaf(nb)
    out, normed = sola_ops.depthwise_conv3x3_layer_norm(x, cw, cb, nw, nb, residual=True)
    names = ops_run(lambda: (out.sum() + normed.square().sum()).backward())
    assert "sola_ops::layer_norm_bwd" in names and "sola_ops::depthwise_conv3x3_bwd" not in names
    assert nw.grad is not None and nb.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    inputs = [leaf(t.double()) for t in make_inputs((1, 4, 5, 6), torch.float64, device)]
    for residual in (True, False):
        assert torch.autograd.gradcheck(
            lambda *a: sola_ops.depthwise_conv3x3_layer_norm(*a, residual=residual), inputs)


def test_reference_agrees_and_has_second_order():
    """sola_ops.reference.depthwise_conv3x3_layer_norm agrees with the op and is differentiable twice."""
    inputs = [leaf(t.double()) for t in make_inputs((1, 4, 5, 6), torch.float64, "cpu")]
    out, normed = sola_ops.depthwise_conv3x3_layer_norm(*inputs, residual=True)
    ref_out, ref_normed = reference.depthwise_conv3x3_layer_norm(*inputs, residual=True)
    torch.testing.assert_close(ref_out, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_normed, normed, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(
        lambda *a: reference.depthwise_conv3x3_layer_norm(*a, residual=True), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    inputs = [leaf(t) for t in make_inputs((4, 14, 14, 64), torch.bfloat16, device)]
    g = (randn((4, 14, 14, 64), torch.bfloat16, device, seed=7), randn((4, 14, 14, 64), torch.bfloat16, device, seed=8))
    first = torch.autograd.grad(sola_ops.depthwise_conv3x3_layer_norm(*inputs, residual=True), inputs, g)
    second = torch.autograd.grad(sola_ops.depthwise_conv3x3_layer_norm(*inputs, residual=True), inputs, g)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
def test_strided_x(device):
    """A channels-sliced x (the conv reads it in place) gives what its contiguous copy gives."""
    _, cw, cb, nw, nb = make_inputs((2, 5, 6, 12), torch.float16, device)
    x = randn((2, 5, 6, 24), torch.float16, device)[..., 5:17]
    assert not x.is_contiguous()
    for a, b in zip(sola_ops.depthwise_conv3x3_layer_norm(x, cw, cb, nw, nb, residual=True),
                    sola_ops.depthwise_conv3x3_layer_norm(x.contiguous(), cw, cb, nw, nb, residual=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_every_output_written(device):
    inputs = [leaf(t) for t in make_inputs((2, 10, 5, 12), torch.bfloat16, device)]
    with sola_ops.debug_nan_fill():
        outs = sola_ops.depthwise_conv3x3_layer_norm(*inputs, residual=True)
        grads = torch.autograd.grad(outs, inputs, (torch.ones_like(outs[0]), torch.ones_like(outs[1])))
    for t in (*outs, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    inputs = [leaf(t) for t in make_inputs((0, 4, 4, 8), torch.float32, device)]
    out, normed = sola_ops.depthwise_conv3x3_layer_norm(*inputs, residual=True)
    assert out.shape == normed.shape == (0, 4, 4, 8)
    (out.sum() + normed.sum()).backward()
    for t in inputs:
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_autocast():
    """Under autocast x goes to the autocast dtype (as depthwise_conv3x3's does); both outputs come in it."""
    x, cw, cb, nw, nb = make_inputs((2, 5, 5, 8), torch.float32, "cpu")
    want = sola_ops.depthwise_conv3x3_layer_norm(x.bfloat16(), cw, cb, nw, nb, residual=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sola_ops.depthwise_conv3x3_layer_norm(x, cw, cb, nw, nb, residual=True)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_bad_input():
    x, cw, cb, nw, nb = make_inputs((2, 5, 6, 8), torch.float32, "cpu")
    fused = sola_ops.depthwise_conv3x3_layer_norm
    cases = [
        ((x[0], cw, cb, nw, nb), {}, ValueError, "x must be 4-D"),
        ((x, cw[:4], cb, nw, nb), {}, ValueError, "conv_weight must be"),
        ((x, cw, cb[:3], nw, nb), {}, ValueError, "conv_bias must be"),
        ((x, cw, cb, nw[:3], nb), {}, ValueError, "norm_weight must be"),
        ((x, cw, cb, nw, nb.to("meta")), {}, ValueError, "norm_bias must be on the device of x"),
        ((x, cw, cb, nw, nb), dict(eps=float("nan")), ValueError, "eps must be a finite number"),
        ((x, cw, cb, nw, nb), dict(eps="big"), TypeError, "eps must be a real number"),
        ((x, 1.0, cb, nw, nb), {}, TypeError, "conv_weight must be a torch.Tensor"),
        ((x, cw, cb, [1.0], nb), {}, TypeError, "norm_weight must be a torch.Tensor or None"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fused(*args, **kwargs)


# ---- the raw op's addend: dx = addend + the LayerNorm's input gradient -------------------------------

def raw_bwd(grad, x, weight, addend=None):
    _, mean, rstd = ops.layer_norm_fwd(x, weight, None, 1e-5)
    return ops.layer_norm_bwd(grad, x, weight, mean, rstd, weight is not None, True, addend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 7, 64, 1000])
def test_layer_norm_addend(device, dtype, C):
    """dx with an addend is the fp32 (fp64) sum rounded once: equal to the sum of dx and the addend in fp64,
    within one rounding for the others; the weight and bias gradients are unchanged."""
    x, grad, addend = (randn((3, 5, C), dtype, device, seed=s) for s in (0, 1, 2))
    weight, _ = norm_params(C, device)
    dx, dw, db = raw_bwd(grad, x, weight, addend)
    dx0, dw0, db0 = raw_bwd(grad, x, weight)
    assert torch.equal(dw, dw0) and torch.equal(db, db0)
    want = dx0.double() + addend.double()
    if dtype == torch.float64:
        torch.testing.assert_close(dx, want, rtol=1e-14, atol=1e-14)
    else:  # dx0's own rounding plus the sum's
        eps = torch.finfo(dtype).eps
        assert ((dx.double() - want).abs() <= 2 * eps * (dx0.double().abs() + addend.double().abs()) + 1e-30).all()
    if device == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # rounded once: the fp32 sum (the same fp32 arithmetic on the upcast inputs) rounded to dtype, bitwise
        dx32 = raw_bwd(grad.float(), x.float(), weight, addend.float())[0]
        assert torch.equal(dx, dx32.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_addend_strided(device):
    """A non-contiguous addend is copied; the values are what its contiguous copy gives."""
    x, grad = randn((4, 16), torch.float32, device), randn((4, 16), torch.float32, device, seed=1)
    addend = randn((16, 4), torch.float32, device, seed=2).t()
    assert not addend.is_contiguous()
    assert torch.equal(raw_bwd(grad, x, None, addend)[0], raw_bwd(grad, x, None, addend.contiguous())[0])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_layer_norm_misaligned_addend(dtype):
    """x, grad and dx 16-byte aligned but the addend one element off: the vector kernel would fault on its
    loads, so the scalar one runs; same values as an aligned copy of the addend."""
    x, grad = randn((300, 64), dtype, "cuda"), randn((300, 64), dtype, "cuda", seed=1)
    addend = randn((300 * 64 + 1,), dtype, "cuda", seed=2)[1:].view(300, 64)
    assert addend.data_ptr() % 16 != 0
    weight, _ = norm_params(64, "cuda")
    dx = raw_bwd(grad, x, weight, addend)[0]
    torch.testing.assert_close(dx, raw_bwd(grad, x, weight, addend.clone())[0], rtol=1e-6, atol=1e-6)


def test_layer_norm_addend_bad_input():
    x = randn((4, 16), torch.float32)
    _, mean, rstd = ops.layer_norm_fwd(x, None, None, 1e-5)
    for addend, match in ((x[:2], "addend must have the shape of x"), (x.double(), "addend must have the dtype of x"),
                          (x.to("meta"), "addend must be on the device of x")):
        with pytest.raises((ValueError, RuntimeError), match=match):
            ops.layer_norm_bwd(x, x, None, mean, rstd, False, False, addend)


def test_layer_norm_addend_opcheck():
    x, grad, addend = (randn((3, 16), torch.float32, seed=s) for s in (0, 1, 2))
    weight, _ = norm_params(16)
    _, mean, rstd = ops.layer_norm_fwd(x, weight, None, 1e-5)
    torch.library.opcheck(ops.layer_norm_bwd.default, (grad, x, weight, mean, rstd, True, True, addend))


def test_compile(fresh_dynamo):
    """fullgraph compile with dynamic sizes, forward and backward, against eager."""
    def fn(x, cw, cb, nw, nb):
        out, normed = sola_ops.depthwise_conv3x3_layer_norm(x, cw, cb, nw, nb, residual=True)
        return out * 2 + normed
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for H in (5, 9):
        inputs = [leaf(t) for t in make_inputs((2, H, 4, 8), torch.float32, "cpu")]
        out, want = compiled(*inputs), fn(*inputs)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        for g, w in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_compile_one_tensor_twice(fresh_dynamo):
    """One parameter as both biases (the autograd.Function gets a view of it the second time, which
    torch.compile takes): fullgraph compile, and its gradient the sum of the two uses, as eagerly."""
    def fn(x, cw, p):
        out, normed = sola_ops.depthwise_conv3x3_layer_norm(x, cw, p, None, p, residual=True)
        return out * 2 + normed
    x, cw, _, _, _ = make_inputs((2, 5, 4, 8), torch.float32, "cpu")
    x, cw, p = leaf(x), leaf(cw), leaf(randn((8,), torch.float32, seed=9))
    out = torch.compile(fn, fullgraph=True)(x, cw, p)
    want = fn(x, cw, p)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(torch.autograd.grad(out.sum(), (x, cw, p)), torch.autograd.grad(want.sum(), (x, cw, p))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # the bias's gradient is the conv bias's plus the norm bias's
    x64, cw64, p64 = (t.detach().double().requires_grad_(True) for t in (x, cw, p))
    out64 = reference.depthwise_conv3x3(x64, cw64, p64, residual=True)
    normed64 = reference.layer_norm(out64, None, p64)
    (want64,) = torch.autograd.grad((out64 * 2 + normed64).sum(), p64)
    torch.testing.assert_close(torch.autograd.grad(fn(x, cw, p).sum(), p)[0].double(), want64, rtol=1e-4, atol=1e-4)


def test_double_backward_through_the_reference():
    inputs = [leaf(t) for t in make_inputs((1, 4, 4, 8), torch.float64, "cpu")]
    for residual in (True, False):
        check_double_backward(lambda *a: sola_ops.depthwise_conv3x3_layer_norm(*a, residual=residual),
                              lambda *a: reference.depthwise_conv3x3_layer_norm(*a, residual=residual), inputs)
    # third order, against finite differences (F.layer_norm's own is wrong: pytorch/pytorch#175754)
    x, w = (leaf(randn(shape, torch.float64, seed=s)) for shape, s in (((1, 3, 3, 4), 1), ((4, 1, 3, 3), 2)))

    def grads(x, w):
        out, normed = sola_ops.depthwise_conv3x3_layer_norm(x, w, residual=True, eps=1.0)
        return torch.autograd.grad(out.sin().sum() + normed.sin().sum(), (x, w), create_graph=True)
    assert torch.autograd.gradgradcheck(grads, (x, w))
