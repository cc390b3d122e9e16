"""sola_ops.linear_attention against the fp64 reference (FlashAttention tolerance rule), fp64
gradcheck of the extension op, strided inputs, determinism. CPU always; CUDA when available."""
import pytest
import torch

import sola_ops
from conftest import (DEVICES, DTYPES, FEATURE_MAPS, check_linear, leaf, make_qkv, randn,
                      size_id, strided_like, torch_threads)
from sola_ops import reference


def _inputs(B, H, Nq, Nk, Dk, Dv, dtype, device, feature_map, normalize=True, seed=0):
    # identity with normalize divides by phi(q)^T z, which crosses 0 for signed inputs (an
    # ill-posed problem, not a kernel test); positive inputs keep the denominator away from 0.
    positive = feature_map == "identity" and normalize
    return make_qkv(B, H, Nq, Nk, Dk, Dv, dtype, device, seed=seed, positive=positive)


# ---- forward + gradients vs the reference -------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_feature_map(device, dtype, feature_map):
    q, k, v = _inputs(2, 3, 7, 113, 59, 8, dtype, device, feature_map)
    check_linear(q, k, v, feature_map=feature_map)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_off(device, dtype, feature_map):
    q, k, v = _inputs(2, 2, 113, 7, 8, 59, dtype, device, feature_map, normalize=False, seed=3)
    check_linear(q, k, v, feature_map=feature_map, normalize=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["q_norm", "k_norm", "both"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_norm_k_norm(device, dtype, which):
    B, H, Nq, Nk, Dk, Dv = 2, 2, 9, 31, 16, 24
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, dtype, device, seed=5)
    norms = {}
    if which in ("q_norm", "both"):
        norms["q_norm"] = randn((B, H, Nq, Dk), dtype, device, seed=11)
    if which in ("k_norm", "both"):
        norms["k_norm"] = randn((B, H, Nk, Dk), dtype, device, seed=12)
    check_linear(q, k, v, feature_map="elu", **norms)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", ["relu", "identity"])
def test_q_norm_k_norm_other_feature_maps(device, feature_map):
    B, H, Nq, Nk, Dk, Dv = 1, 2, 13, 17, 8, 12
    pos = feature_map == "identity"
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, torch.float32, device, seed=6, positive=pos)
    qn = randn(q.shape, torch.float32, device, seed=21, positive=pos)
    kn = randn(k.shape, torch.float32, device, seed=22, positive=pos)
    check_linear(q, k, v, feature_map=feature_map, q_norm=qn, k_norm=kn)


def test_norms_change_only_the_denominator():
    """q_norm = q, k_norm = k gives the plain op; other norms change the result (not ignored)."""
    q, k, v = make_qkv(1, 2, 9, 11, 8, 8, torch.float64)
    plain = sola_ops.linear_attention(q, k, v)
    same = sola_ops.linear_attention(q, k, v, q_norm=q.clone(), k_norm=k.clone())
    torch.testing.assert_close(same, plain, rtol=1e-12, atol=1e-12)
    other = sola_ops.linear_attention(q, k, v, q_norm=q * 0.5, k_norm=k)
    assert (other - plain).abs().max() > 1e-3
    # out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps): the two outputs differ by a per-row factor.
    col = plain.abs().argmax(dim=-1, keepdim=True)
    factor = other.gather(-1, col) / plain.gather(-1, col)
    torch.testing.assert_close(other, plain * factor, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_eps(device, eps):
    q, k, v = make_qkv(2, 1, 7, 9, 8, 5, torch.float32, device, seed=9)
    check_linear(q, k, v, eps=eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_zero_subnormal_denominator(device, dtype):
    """eps = 0 with features so small that phi(q) . z is subnormal in fp32 (8e-40 here): 1 / den
    overflows, so out must be num / den itself (here the mean of v over the keys), not inf or NaN.
    v ~ 1e20 keeps the numerator (8e-20 v) normal. bf16 inputs accumulate in fp32 too (fp16 ones
    cannot be this small)."""
    q = torch.full((1, 2, 5, 8), 1e-20, dtype=dtype, device=device)
    v = (randn((1, 2, 5, 8), torch.float64, device, seed=1) * 1e20).to(dtype)
    out = sola_ops.linear_attention(q, q.clone(), v, feature_map="identity", eps=0.0)
    expected = v.double().mean(dim=2, keepdim=True).expand_as(out)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double() / 1e20, expected / 1e20, rtol=tol, atol=tol)


SIZES = [  # (B, H, Nq, Nk, Dk, Dv, dtype)
    (1, 1, 1, 1, 8, 8, torch.float32),
    (1, 2, 1, 1023, 256, 59, torch.bfloat16),
    (2, 1, 1023, 7, 8, 111, torch.float16),
    (1, 1, 113, 113, 111, 256, torch.float32),
    (1, 1, 1023, 1023, 59, 8, torch.float64),
    (2, 3, 7, 1, 256, 256, torch.float16),
    (1, 1, 130, 65, 111, 111, torch.bfloat16),  # > one 64-row chunk of queries and keys
    # CUDA: 512 heads of head dim 32, so each QueryGrad block sums dS over several row tiles
    (32, 16, 301, 8, 32, 32, torch.float32),
    (32, 16, 301, 8, 20, 32, torch.bfloat16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,H,Nq,Nk,Dk,Dv,dtype", SIZES, ids=map(size_id, SIZES))
def test_awkward_sizes(device, B, H, Nq, Nk, Dk, Dv, dtype):
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, dtype, device, seed=Nq + Dk)
    check_linear(q, k, v, feature_map="elu")


@pytest.mark.parametrize("dtype, lowest", [(torch.float32, -87.33), (torch.float64, -708.39)])
def test_cpu_exp_accuracy(dtype, lowest):
    """The CPU kernels' own exp (a vectorised polynomial, csrc/cpu_math.h) within 2 ulp of torch.exp
    down to its underflow threshold, 0 below it, NaN kept. With one key k = 0, v = 1 and head dim 1,
    linear attention (elu, normalize=False) returns phi(q) = exp(q) for q <= 0."""
    x = torch.linspace(lowest, 0.0, 200_001, dtype=dtype)
    edges = torch.tensor([-1e4, float("-inf"), float("nan")], dtype=dtype)
    k, v = torch.zeros(1, 1, 1, 1, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype)
    out = sola_ops.linear_attention(torch.cat([x, edges]).view(1, 1, -1, 1), k, v, normalize=False).view(-1)
    expected = torch.exp(x.double())
    rel = ((out[:-3].double() - expected).abs() / expected).max().item()
    assert rel <= 2 * torch.finfo(dtype).eps, rel
    assert out[-3] == 0 and out[-2] == 0 and out[-1].isnan()


# ---- layouts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["transposed", "slice", "lastdim"])
def test_strided_inputs(device, dtype, kind):
    q, k, v = make_qkv(2, 3, 11, 70, 16, 9, dtype, device, seed=4)
    qn = randn(q.shape, dtype, device, seed=13)
    kn = randn(k.shape, dtype, device, seed=14)
    ins = [strided_like(t, kind, seed=200 + i) for i, t in enumerate((q, k, v, qn, kn))]
    check_linear(ins[0], ins[1], ins[2], q_norm=ins[3], k_norm=ins[4])
    # and each tensor strided on its own next to contiguous ones
    for i in range(3):
        mixed = [q, k, v]
        mixed[i] = ins[i]
        check_linear(*mixed, feature_map="relu")


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_inputs(device):
    """k and v broadcast over heads (stride 0): gradients sum into the shared head."""
    B, H, N, D = 2, 3, 19, 8
    q = randn((B, H, N, D), torch.float32, device, seed=1)
    kb = leaf(randn((B, 1, N, D), torch.float32, device, seed=2))
    vb = leaf(randn((B, 1, N, D), torch.float32, device, seed=3))
    out = sola_ops.linear_attention(q, kb.expand(B, H, N, D), vb.expand(B, H, N, D))
    k64, v64 = leaf(kb.double()), leaf(vb.double())
    ref = reference.linear_attention(q.double(), k64.expand(B, H, N, D), v64.expand(B, H, N, D))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    g = randn(out.shape, torch.float32, device, seed=4)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(kb.grad.double(), k64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vb.grad.double(), v64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["expanded", "lastdim"])
def test_noncontiguous_grad_out(device, kind):
    """out.sum().backward() hands the kernel a stride-0 grad_out; a transposed one must be copied."""
    q, k, v = make_qkv(1, 2, 9, 12, 8, 6, torch.float32, device, seed=8)
    g = torch.ones(1, dtype=torch.float32, device=device).expand(1, 2, 9, 6) if kind == "expanded" \
        else strided_like(randn((1, 2, 9, 6), torch.float32, device, seed=9), "lastdim")
    assert g.stride(-1) != 1
    check_linear(q, k, v, grad_out=g)


# ---- fp64 gradcheck of the extension op -------------------------------------------------------------

GRADCHECK_CASES = [  # (feature_map, normalize, q_norm, k_norm)
    ("elu", True, False, False),
    ("elu", True, True, True),
    ("elu", True, True, False),
    ("elu", True, False, True),
    ("elu", False, False, False),
    ("relu", True, False, False),
    ("relu", True, True, True),
    ("relu", False, False, False),
    ("identity", True, False, False),
    ("identity", True, True, True),
    ("identity", False, False, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map,normalize,use_qn,use_kn", GRADCHECK_CASES)
def test_gradcheck(device, feature_map, normalize, use_qn, use_kn):
    B, H, Nq, Nk, Dk, Dv = 2, 2, 5, 7, 3, 4
    pos = feature_map == "identity" and normalize
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, torch.float64, device, seed=17, positive=pos, requires_grad=True)
    qn = leaf(randn(q.shape, torch.float64, device, seed=18, positive=pos)) if use_qn else None
    kn = leaf(randn(k.shape, torch.float64, device, seed=19, positive=pos)) if use_kn else None

    def fn(q, k, v, qn, kn):
        return sola_ops.linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, eps=1e-3,
                                         q_norm=qn, k_norm=kn)

    assert torch.autograd.gradcheck(fn, (q, k, v, qn, kn), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_strided(device):
    B, H, Nq, Nk, D = 1, 2, 9, 6, 5
    q = leaf(strided_like(randn((B, H, Nq, D), torch.float64, device, seed=1), "transposed"))
    k = leaf(strided_like(randn((B, H, Nk, D), torch.float64, device, seed=2), "slice"))
    v = leaf(strided_like(randn((B, H, Nk, 3), torch.float64, device, seed=3), "lastdim"))
    kn = leaf(strided_like(randn((B, H, Nk, D), torch.float64, device, seed=4), "lastdim"))
    fn = lambda q, k, v, kn: sola_ops.linear_attention(q, k, v, k_norm=kn)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, kn), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---- determinism --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device):
    """Two runs of the backward on the same inputs are bitwise equal (several heads and chunks)."""
    q, k, v = make_qkv(2, 3, 200, 300, 32, 24, torch.float32, device, seed=2)
    qn, kn = randn(q.shape, torch.float32, device, seed=3), randn(k.shape, torch.float32, device, seed=4)
    g = randn((2, 3, 200, 24), torch.float32, device, seed=5)

    def run():
        ins = [leaf(t.clone()) for t in (q, k, v, qn, kn)]
        out = sola_ops.linear_attention(ins[0], ins[1], ins[2], q_norm=ins[3], k_norm=ins[4])
        return [out.detach()] + list(torch.autograd.grad(out, ins, g))

    first, second = run(), run()
    for name, a, b in zip(("out",) + ("dq", "dk", "dv", "dq_norm", "dk_norm"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("poison", ["q", "k", "v"])
def test_relu_nan_stays_where_relu_is_active(device, dtype, poison):
    """One NaN input turns its head's state gradient NaN, but relu passes no gradient where it is
    flat: like torch's relu backward, the gradient there is exactly 0, not 0 * NaN."""
    q, k, v = make_qkv(1, 2, 6, 7, 4, 5, dtype, device, seed=9)
    {"q": q, "k": k, "v": v}[poison][0, 0, 1, 2] = float("nan")
    ins = [leaf(t.clone()) for t in (q, k, v)]
    sola_ops.linear_attention(*ins, feature_map="relu").sum().backward()
    r64 = [leaf(t.detach().double()) for t in (q, k, v)]
    reference.linear_attention(*r64, feature_map="relu").sum().backward()
    for name, x, ours, ref in zip("qkv", (q, k, v), (t.grad for t in ins), (t.grad for t in r64)):
        assert torch.equal(ours.isnan(), ref.isnan().to(ours.device)), f"d{name}: NaN where the reference has none, or not"
        if name != "v":
            flat = (x <= 0) & ~x.isnan()
            assert (ours[flat] == 0).all(), f"d{name} is not 0 where relu is flat"
        assert torch.isfinite(ours[0, 1]).all(), f"d{name}: the NaN reached the other head"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("dtype, big", [(torch.bfloat16, 1e30), (torch.float32, 1e30), (torch.float64, 1e200)])
def test_huge_denominator(device, feature_map, dtype, big):
    """One key entry near the dtype's range makes the normaliser den ~ big, so den^2 overflows:
    the query gradient's normaliser term must be -(g . num / den) / den, not g . num / den^2 (which
    flushed it to 0 and left dq wrong by orders of magnitude)."""
    q, k, v = make_qkv(1, 2, 33, 40, 8, 6, dtype, device, seed=4)
    k[0, 0, 3, 5] = big
    check_linear(q, k, v, feature_map=feature_map)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_token_segments(dtype):
    """With few heads the CPU kernels split each head's tokens into segments summed by separate tasks
    (S, z in the forward, dS, dz in the backward), then add the segments in order: still the
    reference's result, and the same bits on 1 and 3 threads."""
    B, H, Nq, Nk, Dk, Dv = 1, 2, 2500, 3100, 24, 40  # 2 query and 3 key segments per head
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, dtype, "cpu", seed=8)
    qn, kn = randn(q.shape, dtype, "cpu", seed=9), randn(k.shape, dtype, "cpu", seed=10)
    g = randn((B, H, Nq, Dv), dtype, "cpu", seed=11)

    def run():
        ins = [leaf(t.clone()) for t in (q, k, v, qn, kn)]
        out = sola_ops.linear_attention(*ins[:3], feature_map="elu", q_norm=ins[3], k_norm=ins[4])
        return [out.detach()] + list(torch.autograd.grad(out, ins, g))

    with torch_threads(1):
        one = run()
    with torch_threads(3):
        three = run()
        check_linear(q, k, v, feature_map="elu", q_norm=qn, k_norm=kn, grad_out=g)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dqn", "dkn"), one, three):
        assert torch.equal(a, b), f"{name} differs between 1 and 3 threads"
