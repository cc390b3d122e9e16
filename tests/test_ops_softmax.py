"""sola_ops.softmax_attention against the fp64 reference (FlashAttention tolerance rule), lse, scale,
fp64 gradcheck of the extension op, strided inputs, determinism. CPU always; CUDA when available."""
import math

import pytest
import torch

import sola_ops
from sola_ops import reference
from conftest import (DEVICES, DTYPES, check_softmax, leaf, make_qkv, randn, requires_cuda, size_id,
                      strided_like, torch_threads)


# ---- forward, lse and gradients vs the reference ---------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(device, dtype):
    q, k, v = make_qkv(2, 3, 7, 113, 59, 111, dtype, device)
    check_softmax(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nq_gt_nk(device, dtype):
    q, k, v = make_qkv(1, 2, 113, 7, 8, 16, dtype, device, seed=1)
    check_softmax(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [None, 0.3, 0.0, -0.5, 4.0])
def test_scale(device, dtype, scale):
    # scale 4.0 with D = 32 gives scores of +-50: a peaked softmax that tests the online rescaling.
    q, k, v = make_qkv(2, 2, 40, 100, 32, 24, dtype, device, seed=2)
    check_softmax(q, k, v, scale=scale)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_zero_is_a_scale(device):
    """scale=0.0 means uniform attention (the mean of v, lse = log Nk), not "default scale"."""
    q, k, v = make_qkv(1, 2, 5, 9, 8, 3, torch.float64, device, seed=3)
    out, lse = sola_ops.softmax_attention(q, k, v, scale=0.0, return_lse=True)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(9)), rtol=1e-12, atol=1e-12)
    default = sola_ops.softmax_attention(q, k, v)
    assert (default - out).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_default_scale(device):
    """scale=None is 1/sqrt(Dk) (Dk, not Dv); checked against torch's SDPA in fp64."""
    q, k, v = make_qkv(2, 2, 17, 23, 16, 7, torch.float64, device, seed=4)
    out, lse = sola_ops.softmax_attention(q, k, v, return_lse=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, sdpa, rtol=1e-10, atol=1e-12)
    ref_lse = torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    explicit = sola_ops.softmax_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(explicit, out, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_return_lse_flag(device):
    q, k, v = make_qkv(1, 1, 4, 6, 8, 8, torch.float32, device)
    out = sola_ops.softmax_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 4, 8)
    res = sola_ops.softmax_attention(q, k, v, return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2
    assert res[1].shape == (1, 1, 4) and res[1].dtype == torch.float32
    lse64 = sola_ops.softmax_attention(q.double(), k.double(), v.double(), return_lse=True)[1]
    assert lse64.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_out", [True, False])
def test_lse_gradient(device, dtype, with_out):
    """lse is differentiable (d lse_i / d s_ij = P_ij): a loss on lse, alone or next to one on out,
    gets the reference's gradients; v gets none from lse."""
    q, k, v = make_qkv(2, 3, 37, 50, 16, 12, dtype, device, seed=11)
    g = randn((2, 3, 37, 12), dtype, device, seed=12)
    h = randn((2, 3, 37), torch.float64 if dtype == torch.float64 else torch.float32, device, seed=13)

    def grads(fn, ins):
        out, lse = fn(*ins, return_lse=True)
        loss = (lse * h.to(lse.dtype)).sum() + ((out * g.to(out.dtype)).sum() if with_out else 0)
        return torch.autograd.grad(loss, ins, allow_unused=True)

    ours = grads(sola_ops.softmax_attention, [leaf(t.clone()) for t in (q, k, v)])
    ref = grads(reference.softmax_attention, [leaf(t.detach().double()) for t in (q, k, v)])
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for name, a, b in zip("qkv", ours, ref):
        if b is None:  # v without the out term
            assert a is None or not a.any(), f"d{name} from lse alone must be 0"
            continue
        err = (a.double() - b.to(a.device)).abs().max().item() / max(1.0, b.abs().max().item())
        assert err <= tol, f"d{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_logits_low_precision(device, dtype):
    """Scores far beyond fp16's exp range (|s| ~ 300) must not overflow: the max is subtracted."""
    q, k, v = make_qkv(1, 2, 33, 130, 64, 16, dtype, device, seed=5)
    check_softmax(q, k, v, scale=5.0)


SIZES = [  # (B, H, Nq, Nk, Dk, Dv, dtype)
    (1, 1, 1, 1, 8, 8, torch.float32),
    (1, 2, 1, 1023, 256, 59, torch.bfloat16),
    (2, 1, 1023, 7, 8, 111, torch.float16),
    (1, 1, 113, 113, 111, 256, torch.float64),
    (1, 1, 1023, 1023, 59, 8, torch.float32),
    (2, 3, 7, 1, 256, 256, torch.float16),
    (1, 1, 33, 65, 111, 59, torch.bfloat16),  # one past a 32-query / 64-key tile
    (1, 1, 64, 129, 8, 8, torch.float32),
    (1, 1, 65, 129, 40, 72, torch.float32),  # one past the CPU's 64 x 64 tiles; Dv 72 = 64 + a 16-column tail
    (1, 2, 70, 257, 40, 24, torch.float32),  # one past the CPU forward's 256-key tile
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,H,Nq,Nk,Dk,Dv,dtype", SIZES, ids=map(size_id, SIZES))
def test_awkward_sizes(device, B, H, Nq, Nk, Dk, Dv, dtype):
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, dtype, device, seed=Nq + Dk)
    check_softmax(q, k, v)


# The flash kernels (tensor cores for fp16/bf16, SIMT for fp32/fp64) tile queries by 64 and keys by
# 64 or 32 and pad head dims to 32/64/128/256: every (N, D) below lands on a different tile edge.
FLASH_N = [1, 17, 113, 1023, 4097]
FLASH_D = [8, 40, 59, 96, 111, 256]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", FLASH_D)
@pytest.mark.parametrize("N", FLASH_N)
def test_flash_tile_edges(N, D, dtype):
    q, k, v = make_qkv(1, 2, N, N, D, D, dtype, "cuda", seed=N + D)
    check_softmax(q, k, v)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Nq,Nk,D", [(113, 200, 32), (200, 113, 64), (130, 75, 96)])
def test_flash_row_groups(Nq, Nk, D, dtype, monkeypatch):
    """Two row groups per warp (128-row blocks) against one, each forced by SOLA_FLASH_GROUPS: at
    test sizes the grid is smaller than the GPU and the kernels would keep one. Up to head dim 64
    both walk the other side in the same steps, so they agree bitwise."""
    q, k, v = make_qkv(2, 3, Nq, Nk, D, D, dtype, "cuda", seed=Nq + D)
    g = randn((2, 3, Nq, D), dtype, "cuda", seed=7)

    def run(groups):
        monkeypatch.setenv("SOLA_FLASH_GROUPS", groups)
        ins = [leaf(t.clone()) for t in (q, k, v)]
        out, lse = sola_ops.softmax_attention(*ins, return_lse=True)
        return [out.detach(), lse] + list(torch.autograd.grad(out, ins, g))

    one, two = run("1"), run("2")
    check_softmax(q, k, v)  # still under SOLA_FLASH_GROUPS=2
    if D <= 64:
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, two):
            assert torch.equal(a, b), f"{name}: one and two row groups differ"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype,D,twins", [(torch.float16, 96, ("dq",)), (torch.bfloat16, 128, ("dq",)),
                                           (torch.float16, 256, ("dq", "dkdv")), (torch.bfloat16, 200, ("dq", "dkdv")),
                                           (torch.float32, 64, ("dq", "dkdv")), (torch.float32, 100, ("dkdv",))])
def test_flash_bwd_twins(dtype, D, twins, monkeypatch):
    """The backward's twins for GPUs with 99 KB of shared memory a block (single-buffered; dkdv's lse / delta
    in the padding of its query rows; dq in 32-key steps at 16-bit head dim 256), forced on this GPU by
    SOLA_FLASH_BWD_TWIN=1: against the reference, and the profiler shows the twins ran. dk and dv walk the
    queries in the same steps as the default kernels, so they agree with them bitwise."""
    q, k, v = make_qkv(1, 2, 130, 75, D, D, dtype, "cuda", seed=D)
    g = randn((1, 2, 130, D), dtype, "cuda", seed=3)

    def grads():
        ins = [leaf(t.clone()) for t in (q, k, v)]
        return torch.autograd.grad(sola_ops.softmax_attention(*ins), ins, g)

    default = grads()
    monkeypatch.setenv("SOLA_FLASH_BWD_TWIN", "1")
    twin = grads()
    for name, a, b in zip(("dk", "dv"), default[1:], twin[1:]):
        assert torch.equal(a, b), f"{name}: the twin and the default kernel differ"
    check_softmax(q, k, v)  # under SOLA_FLASH_BWD_TWIN=1
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("before sm_80 the backward runs the row kernels (no flash kernels, no twins): results checked")
    ins = [leaf(t.clone()) for t in (q, k, v)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sola_ops.softmax_attention(*ins).sum().backward()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "sola::" in e.name}
    if not names:
        pytest.skip("the profiler saw no CUDA kernels here (no CUPTI?): results checked, not which kernels ran")
    for kernel in ("dq", "dkdv"):
        ran = [n for n in names if f"{kernel}_kernel<" in n]
        assert ran and all(("false, false>" in n) == (kernel in twins) for n in ran), (kernel, ran)  # kWg, kDeep


def _hopper_with_wgmma():
    return (torch.cuda.is_available() and sola_ops.build_info().get("sm90a", False)
            and torch.cuda.get_device_capability() == (9, 0))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.skipif(not _hopper_with_wgmma(), reason="wgmma kernels: an H100 / H200 and a 9.0a build")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", ["1", "2"])
@pytest.mark.parametrize("Nq,Nk,D", [(113, 200, 32), (200, 113, 64), (130, 75, 96), (70, 140, 128), (1, 1, 8),
                                     (70, 1000, 64), (130, 333, 128)])
def test_flash_wgmma(Nq, Nk, D, groups, dtype, monkeypatch):
    """Forward and backward on Hopper's wgmma (SOLA_FLASH_WGMMA=1) against the reference, with one
    and two 64-row tiles per block, and key sequences long enough that the forward's ring of K / V
    stages wraps around; the profiler shows that the wgmma kernels ran, not mma.sync."""
    monkeypatch.setenv("SOLA_FLASH_WGMMA", "1")
    monkeypatch.setenv("SOLA_FLASH_GROUPS", groups)
    q, k, v = make_qkv(2, 3, Nq, Nk, D, D, dtype, "cuda", seed=Nq + D)
    check_softmax(q, k, v)
    ins = [leaf(t.clone()) for t in (q, k, v)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sola_ops.softmax_attention(*ins).sum().backward()
        torch.cuda.synchronize()
    if not any("sola::" in e.name for e in prof.events()):
        pytest.skip("the profiler saw no CUDA kernels here (no CUPTI?): results checked, not which kernels ran")
    names = {e.name for e in prof.events() if "sola::" in e.name}
    assert any("fwd_wg_kernel" in n for n in names) and not any("fwd_kernel<" in n for n in names), names
    for kernel in ("dq_kernel", "dkdv_kernel"):
        ran = [n for n in names if kernel in n]
        assert ran and all(", true>" in n for n in ran), (kernel, ran)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Nq,Nk,Dk,Dv", [(4097, 17, 40, 96), (17, 4097, 96, 40), (200, 70, 256, 8), (70, 200, 8, 256)])
def test_flash_unequal_sizes(Nq, Nk, Dk, Dv, dtype):
    q, k, v = make_qkv(2, 3, Nq, Nk, Dk, Dv, dtype, "cuda", seed=Nq + Dv)
    check_softmax(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
def test_single_key_is_identity(device):
    """Nk == 1: every query attends to the one key, out = v, lse = scale * q.k."""
    q, k, v = make_qkv(2, 3, 7, 1, 16, 5, torch.float64, device, seed=6)
    out, lse = sola_ops.softmax_attention(q, k, v, scale=0.7, return_lse=True)
    torch.testing.assert_close(out, v.expand_as(out), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, 0.7 * (q * k).sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_key_scored_minus_inf_gets_no_gradient(device, dtype):
    """A key with an infinite entry that every query scores -inf (scale < 0) takes no weight: out stays
    finite, its dk and dv rows are 0, and dq is NaN only where 0 * inf meets that entry (as in the
    reference). 70 queries leave the CUDA backward's last query step rows past Nq, whose zero rows once
    scored that key inf * 0 = NaN and gave it NaN dk and dv (found by the emulator's random cases)."""
    q, k, v = make_qkv(1, 2, 70, 140, 32, 24, dtype, device, seed=7)
    q[..., 0] = 1.0
    k[:, :, 2, 0] = math.inf
    q, k, v = leaf(q), leaf(k), leaf(v)
    out = sola_ops.softmax_attention(q, k, v, scale=-0.3)
    out.backward(randn(out.shape, dtype, device, seed=8))
    assert torch.isfinite(out).all()
    assert (k.grad[:, :, 2] == 0).all() and (v.grad[:, :, 2] == 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert q.grad[..., 0].isnan().all() and torch.isfinite(q.grad[..., 1:]).all()


# ---- layouts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["transposed", "slice", "lastdim"])
def test_strided_inputs(device, dtype, kind):
    q, k, v = make_qkv(2, 3, 37, 70, 16, 9, dtype, device, seed=4)
    ins = [strided_like(t, kind, seed=300 + i) for i, t in enumerate((q, k, v))]
    check_softmax(*ins)
    for i in range(3):
        mixed = [q, k, v]
        mixed[i] = ins[i]
        check_softmax(*mixed, scale=0.4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["expanded", "lastdim"])
def test_noncontiguous_grad_out(device, kind):
    q, k, v = make_qkv(1, 2, 9, 12, 8, 6, torch.float32, device, seed=8)
    g = torch.ones(1, dtype=torch.float32, device=device).expand(1, 2, 9, 6) if kind == "expanded" \
        else strided_like(randn((1, 2, 9, 6), torch.float32, device, seed=9), "lastdim")
    assert g.stride(-1) != 1
    check_softmax(q, k, v, grad_out=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Dv", [32, 36])
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "slice", "misaligned"])
def test_grad_out_layouts(device, dtype, Dv, kind):
    """grad_out read in place: on CUDA delta_kernel takes 16-byte loads when Dv is whole vectors and the rows
    are aligned (contiguous, transposed at Dv 32) and one element a lane otherwise (Dv 36 in bf16, a slice's
    odd row stride, one element off alignment)."""
    q, k, v = make_qkv(2, 3, 37, 50, 16, Dv, dtype, device, seed=10)
    g = randn((2, 3, 37, Dv), dtype, device, seed=11)
    if kind == "misaligned":
        g = randn((g.numel() + 1,), dtype, device, seed=11)[1:].view(g.shape)
    else:
        g = strided_like(g, kind, seed=12)
    check_softmax(q, k, v, grad_out=g)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_inputs(device):
    """k, v broadcast over heads (stride 0), as in multi-query attention."""
    B, H, N, D = 2, 3, 19, 8
    q = randn((B, H, 11, D), torch.float32, device, seed=1)
    kb = leaf(randn((B, 1, N, D), torch.float32, device, seed=2))
    vb = leaf(randn((B, 1, N, D), torch.float32, device, seed=3))
    out = sola_ops.softmax_attention(q, kb.expand(B, H, N, D), vb.expand(B, H, N, D))
    k64, v64 = leaf(kb.double()), leaf(vb.double())
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k64.expand(B, H, N, D), v64.expand(B, H, N, D))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    g = randn(out.shape, torch.float32, device, seed=4)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(kb.grad.double(), k64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vb.grad.double(), v64.grad, rtol=1e-4, atol=1e-5)


# ---- fp64 gradcheck of the extension op -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 2, 5, 7, 3, 4), (1, 2, 9, 1, 5, 2), (1, 1, 1, 9, 4, 4)])
@pytest.mark.parametrize("scale", [None, 0.37, 0.0, -1.3])
def test_gradcheck(device, shape, scale):
    B, H, Nq, Nk, Dk, Dv = shape
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, torch.float64, device, seed=17, requires_grad=True)
    fn = lambda q, k, v: sola_ops.softmax_attention(q, k, v, scale=scale)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_strided(device):
    B, H, Nq, Nk, D = 1, 2, 9, 6, 5
    q = leaf(strided_like(randn((B, H, Nq, D), torch.float64, device, seed=1), "transposed"))
    k = leaf(strided_like(randn((B, H, Nk, D), torch.float64, device, seed=2), "slice"))
    v = leaf(strided_like(randn((B, H, Nk, 3), torch.float64, device, seed=3), "lastdim"))
    assert torch.autograd.gradcheck(sola_ops.softmax_attention, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---- determinism ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_deterministic(device, dtype):
    """The backward is bitwise reproducible (DESIGN.md): two runs, several heads and tiles."""
    q, k, v = make_qkv(2, 3, 100, 150, 32, 24, dtype, device, seed=2)
    g = randn((2, 3, 100, 24), dtype, device, seed=5)

    def run():
        ins = [leaf(t.clone()) for t in (q, k, v)]
        out, lse = sola_ops.softmax_attention(*ins, return_lse=True)
        return [out.detach(), lse] + list(torch.autograd.grad(out, ins, g))

    first, second = run(), run()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_same_bits_any_thread_count(dtype):
    """The CPU forward takes 64-256 query rows a task and the backward runs one task per head or (fewer
    heads than threads) one per key tile and one per query tile, by the thread count; every sum runs in
    the same order either way, so the thread count never changes a bit."""
    q, k, v = make_qkv(1, 2, 130, 70, 40, 24, dtype, "cpu", seed=4)
    g = randn((1, 2, 130, 24), dtype, "cpu", seed=6)
    g_lse = randn((1, 2, 130), torch.float64 if dtype == torch.float64 else torch.float32, "cpu", seed=7)

    def run():
        ins = [leaf(t.clone()) for t in (q, k, v)]
        out, lse = sola_ops.softmax_attention(*ins, return_lse=True)
        return [out.detach(), lse.detach()] + list(torch.autograd.grad((out, lse), ins, (g, g_lse)))

    with torch_threads(1):
        one = run()  # 256 query rows a forward task, a backward task per head
    with torch_threads(3):
        three = run()  # 64 rows a forward task, backward tasks per key tile and per query tile
        check_softmax(q, k, v)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, three):
        assert torch.equal(a, b), f"{name} differs between 1 and 3 threads"


@pytest.mark.parametrize("Nq,Nk,which", [(2, 16384, "out"), (64, 4096, "dq"), (8192, 8, "dv")])
def test_cpu_fp32_long_sums(Nq, Nk, which):
    """fp32 sums over many keys (out, dq) or queries (dk, dv) stay as accurate as torch's: each tile's
    product is summed apart before joining the running sum. Accumulated straight into one sum, out's
    error at Nk = 16384 was 25-40x the fp32 reference's and SDPA's (error ~ sqrt(chain length))."""
    torch.manual_seed(1)
    q = 0.3 * torch.randn(1, 1, Nq, 16) if which != "out" else torch.zeros(1, 1, Nq, 8)
    k = 0.3 * torch.randn(1, 1, Nk, q.shape[-1])
    v = torch.randn(1, 1, Nk, q.shape[-1]) + 3
    g = torch.randn(1, 1, Nq, q.shape[-1])

    def result(f, dtype):
        qq, kk, vv = (leaf(t.to(dtype)) for t in (q, k, v))
        out = f(qq, kk, vv)
        if which == "out":
            return out.double()
        out.backward(g.to(dtype))
        return (qq if which == "dq" else vv).grad.double()

    exact = result(reference.softmax_attention, torch.float64)
    err = {name: ((result(f, torch.float32) - exact).abs().max() / exact.abs().max()).item()
           for name, f in (("ours", sola_ops.softmax_attention), ("reference", reference.softmax_attention),
                           ("sdpa", torch.nn.functional.scaled_dot_product_attention))}
    assert err["ours"] <= 3 * max(err["reference"], err["sdpa"]), err
