"""Shared helpers of the sola_ops kernel tests.

Tolerances follow the FlashAttention rule (DESIGN.md, "Tests"): the error of our kernel against an
fp64 reference may be at most twice the error of the same computation done by plain PyTorch in the
input's precision, plus a small absolute floor:

    max|ours - ref64| <= 2 * max|ref_lp - ref64| + floor * max(1, max|ref64|)

ref64 runs the reference on inputs upcast to fp64. ref_lp is *not* sola_ops.reference (which
accumulates in fp32 like the kernels) but the "naive PyTorch" composite below, whose matmuls,
feature maps and softmax all run in the input dtype. For fp64 inputs ref_lp == ref64, so fp64 is
held to the floor alone.
"""
import contextlib
import math
import os
import sys

import pytest
import torch

import sola_ops
from sola_ops import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LOW_DTYPES = [torch.float16, torch.bfloat16]
FEATURE_MAPS = ["elu", "relu", "identity"]

# Absolute floors of the tolerance rule (scaled by max(1, max|ref64|)).
ATOL_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def size_id(case):
    """Test id of a (B, H, Nq, Nk, Dk, Dv, dtype) case."""
    B, H, Nq, Nk, Dk, Dv, dtype = case
    return f"B{B}H{H}q{Nq}k{Nk}d{Dk}v{Dv}-{str(dtype).replace('torch.', '')}"


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32



@contextlib.contextmanager
def torch_threads(n):
    """torch's CPU thread count set to n inside the block (the CPU kernels pick their tasks by it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests start and end with an empty Dynamo cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- devices --------------------------------------------------------------------------------

def cuda_ok():
    return torch.cuda.is_available() and bool(sola_ops.build_info()["cuda"])


CUDA_REASON = "needs a CUDA device and a CUDA build of sola_ops"
requires_cuda = pytest.mark.skipif(not cuda_ok(), reason=CUDA_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


def pytest_collection_modifyitems(config, items):
    """Every test marked `cuda` skips when there is no GPU or no CUDA build."""
    if cuda_ok():
        return
    skip = pytest.mark.skip(reason=CUDA_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With SOLA_TESTS_REPORT_NOW=1 (scripts/gpu_check.sh) each failure is named on stderr as it happens: a
    GPU step killed by its time limit still says what failed (pytest's summary comes only at the end)."""
    # (under pytest-xdist the controller gets every worker's reports: the workers stay quiet)
    if report.failed and os.environ.get("SOLA_TESTS_REPORT_NOW") == "1" and "PYTEST_XDIST_WORKER" not in os.environ:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = (crash.message if crash is not None else str(report.longrepr)).strip().splitlines() or [""]
        print(f"\nFAILED (now) {report.nodeid} [{report.when}]: {message[0][:300]}", file=sys.stderr, flush=True)


# ---- inputs ---------------------------------------------------------------------------------

def randn(shape, dtype, device="cpu", seed=0, positive=False, scale=1.0):
    """Reproducible normal (or |normal| + 0.1 when positive) values, drawn in fp32 and cast."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32) * scale
    if positive:
        x = x.abs() + 0.1
    return x.to(device=device, dtype=dtype)


def make_qkv(B, H, Nq, Nk, Dk, Dv, dtype, device="cpu", seed=0, positive=False, requires_grad=False):
    q = randn((B, H, Nq, Dk), dtype, device, seed, positive)
    k = randn((B, H, Nk, Dk), dtype, device, seed + 1, positive)
    v = randn((B, H, Nk, Dv), dtype, device, seed + 2)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def strided_like(x, kind, seed=100):
    """A tensor equal to x in value (B, H, N, D) but with another memory layout.

    transposed:   x.view(B, N, H, D).transpose(1, 2) layout (last dim contiguous, no copy needed)
    slice:        a slice of a bigger tensor (every stride but the last one unusual)
    lastdim:      the last dim has stride != 1 (the kernels must copy it)
    """
    B, H, N, D = x.shape
    if kind == "contiguous":
        y = x.clone()
    elif kind == "transposed":
        y = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert y.stride(-1) == 1 and (not y.is_contiguous() or H == 1 or N == 1)
    elif kind == "slice":
        big = randn((B + 1, H + 2, N + 3, D + 5), x.dtype, x.device, seed)
        y = big[1:, 2:, 1:N + 1, 3:D + 3]
        y.copy_(x)
        assert y.stride(-1) == 1 and (not y.is_contiguous() or B * H * N == 1)
    elif kind == "lastdim":
        big = randn((B, H, D, N), x.dtype, x.device, seed)
        y = big.transpose(2, 3)
        y.copy_(x)
        assert y.stride(-1) != 1 or D == 1 or N == 1
    else:
        raise ValueError(kind)
    assert torch.equal(y, x)
    return y


# The elementwise ops' error terms: the final rounding (unit roundoff of the output dtype; fp32 / fp64
# outputs are the computation's own), the computation's ulp, and half the smallest subnormal step of the
# output dtype.
ROUNDING = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 0.0, torch.float64: 0.0}
ACC_EPS = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -24, torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
TINY = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134, torch.float32: 2.0 ** -149, torch.float64: 0.0}


# The layouts rows_view makes, and those the row-wise elementwise ops (silu_mul, bias_gelu) read in place.
ROWS_VIEW_KINDS = ["transposed", "every_other", "window", "broadcast_row", "misaligned"]
ROWS_VIEW_IN_PLACE = {"broadcast_row", "misaligned"}


def rows_view(kind, shape, dtype, device, seed, scale=1.0):
    """A random tensor of `shape` (B, N, C) in another layout: transposed (last dim not contiguous: copied),
    every other element of the last dim (copied), a (B, N, C) window of a (B, N + 3, C) tensor (last dim
    contiguous, but the leading dims do not collapse to one row stride: copied), a row broadcast over the
    leading dims (row stride 0: read in place), or contiguous one element off alignment (in place)."""
    B, N, C = shape
    if kind == "transposed":
        t = randn((B, C, N), dtype, device, seed, scale=scale).transpose(1, 2)
    elif kind == "every_other":
        t = randn((B, N, 2 * C), dtype, device, seed, scale=scale)[..., ::2]
    elif kind == "window":
        t = randn((B, N + 3, C), dtype, device, seed, scale=scale)[:, 1:N + 1]
    elif kind == "broadcast_row":
        t = randn((C,), dtype, device, seed, scale=scale).expand(B, N, C)
    elif kind == "misaligned":
        t = randn((B * N * C + 1,), dtype, device, seed, scale=scale)[1:].view(B, N, C)
    else:
        raise ValueError(kind)
    assert t.shape == shape
    return t


COPIES = {"aten::copy_", "aten::clone", "aten::contiguous"}


def ops_run(fn, *args):
    """The names of the aten / sola_ops ops fn(*args) runs, by the profiler (which sees the ops that the C++
    op layer calls too); `& COPIES` are the copies among them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return {e.name for e in prof.events()}


def leaf(x, requires_grad=True):
    """x (possibly a strided view) as a leaf tensor keeping its strides."""
    return x.detach().requires_grad_(requires_grad)


def check_double_backward(op, ref, inputs):
    """A gradient of op's gradient (create_graph=True: the op's backward differentiated through the reference)
    passes gradgradcheck and equals the reference's, for fp64 leaves `inputs`."""
    assert torch.autograd.gradgradcheck(op, inputs)

    def second(fn):
        outs = fn(*inputs)
        outs = (outs,) if isinstance(outs, torch.Tensor) else outs
        grads = torch.autograd.grad(sum((o ** 2).sum() for o in outs), inputs, create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in grads), inputs, allow_unused=True,
                                   materialize_grads=True)
    for i, (a, b) in enumerate(zip(second(op), second(ref))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"input {i}: {m}")


def upcast(ts, dtype=torch.float64):
    return [None if t is None else leaf(t.detach().to(dtype), t.requires_grad) for t in ts]


# ---- "naive PyTorch" composites in the input dtype -------------------------------------------

def linear_attention_lowp(q, k, v, *, feature_map="elu", normalize=True, eps=1e-6, q_norm=None, k_norm=None):
    """Linear attention done by plain PyTorch entirely in the input dtype (no fp32 accumulation
    beyond what torch's own matmuls do)."""
    phi = reference.FEATURE_MAPS[feature_map]
    fq, fk = phi(q), phi(k)
    state = torch.einsum("bhnd,bhne->bhde", fk, v) / k.shape[2]
    out = torch.einsum("bhnd,bhde->bhne", fq, state)
    if normalize:
        fqn = fq if q_norm is None else phi(q_norm)
        fkn = fk if k_norm is None else phi(k_norm)
        z = fkn.mean(dim=2)
        out = out / (torch.einsum("bhnd,bhd->bhn", fqn, z) + eps).unsqueeze(-1)
    return out


def softmax_attention_lowp(q, k, v, *, scale=None, return_lse=False):
    """Softmax attention done by plain PyTorch in the input dtype."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    out = torch.softmax(scores, dim=-1) @ v
    if return_lse:
        return out, torch.logsumexp(scores, dim=-1)
    return out


# ---- the tolerance rule -----------------------------------------------------------------------

def fa_bound(ref64, ref_lp, dtype, factor=2.0):
    ref64 = ref64.double()
    lp_err = (ref_lp.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    assert math.isfinite(lp_err), "the low-precision PyTorch baseline is not finite: the test would be vacuous"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    return factor * lp_err + ATOL_FLOOR[dtype] * scale, lp_err


def assert_fa_close(ours, ref64, ref_lp, dtype, name="out"):
    """The FlashAttention tolerance rule; dtype picks the floor (the *input* dtype)."""
    assert ours is not None, f"{name}: no value (gradient missing?)"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ref64).all(), f"{name}: the fp64 reference is not finite"
    if ours.numel() == 0:
        return
    bound, lp_err = fa_bound(ref64, ref_lp, dtype)
    err = (ours.detach().double() - ref64.double()).abs().max().item()
    assert err <= bound, (f"{name} ({dtype}): max|ours - ref64| = {err:.3e} > bound {bound:.3e} "
                          f"(naive PyTorch error {lp_err:.3e}, max|ref64| = {ref64.abs().max().item():.3e})")


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    gs = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
    it = iter(gs)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def check_grads(op, names, out, ref64, ref_lp, inputs, i64, ilp, grad_out=None):
    """Gradients of every given input (None entries are skipped) of `out` against the fp64 reference's
    (`ref64` from `i64`) with the FlashAttention rule, the low-precision baseline from `ilp`."""
    dtype = out.dtype
    if grad_out is None:
        grad_out = randn(out.shape, dtype, out.device, seed=7)
    g_ours = _grads(out, inputs, grad_out)
    g64 = _grads(ref64, i64, grad_out.double())
    glp = _grads(ref_lp, ilp, grad_out)
    for name, t, a, b, c in zip(names, inputs, g_ours, g64, glp):
        if t is not None:
            assert a.dtype == dtype and a.shape == t.shape
            assert_fa_close(a, b, c, dtype, f"{op} d{name}")


NAMES_LINEAR = ("q", "k", "v", "q_norm", "k_norm")
NAMES_SOFTMAX = ("q", "k", "v")


def check_linear(q, k, v, *, q_norm=None, k_norm=None, grad=True, grad_out=None, **opts):
    """Checks sola_ops.linear_attention (forward and, with grad=True, the gradients of every input
    given) against the fp64 reference with the FlashAttention rule. Inputs may be any views."""
    dtype = q.dtype
    inputs = [q, k, v, q_norm, k_norm]
    if grad:
        inputs = [None if t is None else leaf(t) for t in inputs]
    q, k, v, q_norm, k_norm = inputs
    out = sola_ops.linear_attention(q, k, v, q_norm=q_norm, k_norm=k_norm, **opts)
    assert out.dtype == dtype and out.device == q.device
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    i64 = upcast(inputs)
    ref64 = reference.linear_attention(i64[0], i64[1], i64[2], q_norm=i64[3], k_norm=i64[4], **opts)
    ilp = upcast(inputs, dtype)
    ref_lp = linear_attention_lowp(ilp[0], ilp[1], ilp[2], q_norm=ilp[3], k_norm=ilp[4], **opts)
    assert_fa_close(out, ref64, ref_lp, dtype, "linear_attention out")
    if not grad:
        return out
    check_grads("linear_attention", NAMES_LINEAR, out, ref64, ref_lp, inputs, i64, ilp, grad_out)
    return out


def check_softmax(q, k, v, *, grad=True, grad_out=None, check_lse=True, **opts):
    """Checks sola_ops.softmax_attention (out, lse and, with grad=True, dq, dk, dv) against the fp64
    reference with the FlashAttention rule."""
    dtype = q.dtype
    inputs = [q, k, v]
    if grad:
        inputs = [leaf(t) for t in inputs]
    q, k, v = inputs
    out, lse = sola_ops.softmax_attention(q, k, v, return_lse=True, **opts)
    assert out.dtype == dtype and out.device == q.device
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert lse.dtype == acc_dtype(dtype) and lse.shape == q.shape[:3]
    assert lse.requires_grad == out.requires_grad

    i64 = upcast(inputs)
    ref64, lse64 = reference.softmax_attention(*i64, return_lse=True, **opts)
    ilp = upcast(inputs, dtype)
    ref_lp, lse_lp = softmax_attention_lowp(*ilp, return_lse=True, **opts)
    assert_fa_close(out, ref64, ref_lp, dtype, "softmax_attention out")
    if check_lse:
        if dtype in LOW_DTYPES:
            # lse is fp32 for fp16/bf16 inputs, computed from the exactly representable inputs:
            # hold it to the fp32 rule rather than to the (much looser) low-precision baseline.
            _, lse_lp = softmax_attention_lowp(*upcast(inputs, torch.float32), return_lse=True, **opts)
        assert_fa_close(lse, lse64, lse_lp, torch.float32 if dtype in LOW_DTYPES else dtype,
                        "softmax_attention lse")
    if not grad:
        return out
    check_grads("softmax_attention", NAMES_SOFTMAX, out, ref64, ref_lp, inputs, i64, ilp, grad_out)
    return out
