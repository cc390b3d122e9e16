"""sola_ops.linear_attention(rope=(cos, sin)): RoPE of phi(q), phi(k) in the numerator, unrotated in the
normaliser (MLLA / SoLA-Vision), against the fp64 reference (FlashAttention rule, conftest.py) and
against the composition it replaces (sola_ops.rope, then linear_attention with q_norm / k_norm).
The CPU kernels take the tables themselves; on CUDA, fp16 / bf16 with Dk, Dv <= 128 run the fused
tensor-core kernels and the rest composes."""
import pytest
import torch

import sola_ops
from conftest import (DEVICES, DTYPES, FEATURE_MAPS, assert_fa_close, check_grads, check_linear, leaf,
                      linear_attention_lowp, make_qkv, randn, strided_like, torch_threads, upcast)
from sola_ops import reference

ops = torch.ops.sola_ops


def tables(N, D, device="cpu", dtype=torch.float32, seed=3):
    """cos, sin (N, D / 2) of random angles (every entry differs, unlike a real RoPE schedule)."""
    angles = randn((N, D // 2), torch.float32, seed=seed, scale=3.0)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def lowp(q, k, v, cos, sin, feature_map="elu", **opts):
    """The computation by plain PyTorch in the inputs' dtype, as a model writes it."""
    phi = reference.FEATURE_MAPS[feature_map]
    fq, fk = phi(q), phi(k)
    rq, rk = (reference._rotate(f, cos.to(q.dtype), sin.to(q.dtype)) for f in (fq, fk))
    norms = dict(q_norm=fq, k_norm=fk) if opts.get("normalize", True) else {}
    return linear_attention_lowp(rq, rk, v, feature_map="identity", **norms, **opts)


def check_rope_linear(q, k, v, cos, sin, feature_map="elu", grad=True, **opts):
    """out and dq, dk, dv against the fp64 reference with the FlashAttention rule."""
    dtype = q.dtype
    inputs = [leaf(t, grad) for t in (q, k, v)]
    out = sola_ops.linear_attention(*inputs, feature_map=feature_map, rope=(cos, sin), **opts)
    assert out.dtype == dtype and out.shape == q.shape[:3] + v.shape[3:]
    i64 = upcast(inputs)
    ref64 = reference.linear_attention(*i64, feature_map=feature_map, rope=(cos.double(), sin.double()), **opts)
    ilp = upcast(inputs, dtype)
    ref_lp = lowp(*ilp, cos, sin, feature_map, **opts)
    assert_fa_close(out, ref64, ref_lp, dtype, "linear_attention(rope) out")
    if grad:
        check_grads("linear_attention(rope)", ("q", "k", "v"), out, ref64, ref_lp, inputs, i64, ilp)
    return out


def _qkv(B, H, N, Dk, Dv, dtype, device, feature_map, seed=0):
    # identity with normalize divides by phi(q)^T z, which crosses 0 for signed inputs
    return make_qkv(B, H, N, N, Dk, Dv, dtype, device, seed=seed, positive=feature_map == "identity")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_feature_map(device, dtype, feature_map):
    q, k, v = _qkv(2, 3, 37, 32, 24, dtype, device, feature_map)
    check_rope_linear(q, k, v, *tables(37, 32, device), feature_map)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_normalize_off(device, dtype):
    q, k, v = _qkv(1, 2, 19, 16, 16, dtype, device, "elu", seed=4)
    check_rope_linear(q, k, v, *tables(19, 16, device), "elu", normalize=False)


# (B, H, N, Dk, Dv): N past one row tile / several token chunks, head dims of every bucket, partial
# vectors (Dk 10: half = 5 pairs, not a whole 16-byte table vector), Dk != Dv, a state wider than 128
# (CUDA: composed, not fused).
SIZES = [(1, 1, 1, 8, 8), (2, 2, 17, 10, 6), (1, 2, 113, 64, 64), (2, 1, 300, 32, 32), (1, 1, 70, 100, 48),
         (1, 1, 65, 128, 128), (1, 1, 40, 136, 8), (1, 1, 1100, 32, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,H,N,Dk,Dv", SIZES, ids=lambda x: str(x))
def test_awkward_sizes(device, dtype, B, H, N, Dk, Dv):
    q, k, v = _qkv(B, H, N, Dk, Dv, dtype, device, "elu", seed=N)
    check_rope_linear(q, k, v, *tables(N, Dk, device, seed=Dk), "elu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_token_segments(dtype):
    """N = 3100 over 2 heads: the CPU kernels sum each head's tokens in 3 segments (S, z forward; dS, dz
    backward), each segment's rows rotated by their own angles as they load: the reference's result, and
    the same bits on 1 and 3 threads."""
    N, Dk, Dv = 3100, 24, 40
    q, k, v = _qkv(1, 2, N, Dk, Dv, dtype, "cpu", "elu", seed=12)
    cos, sin = tables(N, Dk, seed=13)
    g = randn((1, 2, N, Dv), dtype, "cpu", seed=14)

    def run():
        ins = [leaf(t.clone()) for t in (q, k, v)]
        out = sola_ops.linear_attention(*ins, rope=(cos, sin))
        return [out.detach()] + list(torch.autograd.grad(out, ins, g))

    with torch_threads(1):
        one = run()
    with torch_threads(3):
        three = run()
        check_rope_linear(q, k, v, cos, sin)
    for name, a, b in zip(("out", "dq", "dk", "dv"), one, three):
        assert torch.equal(a, b), f"{name} differs between 1 and 3 threads"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_the_composition(device, dtype):
    """rope= is linear_attention(rope(phi(q)), rope(phi(k)), v, identity, q_norm=phi(q), k_norm=phi(k)).
    fp32: out and dv bitwise, dq and dk within fp32 rounding (the CPU kernels take the tables, CUDA
    composes: either way the intermediates are fp32). fp16 / bf16: within the intermediates' rounding,
    which the fused kernels (CPU, CUDA tensor cores) skip: all of it on the CPU; the normaliser's
    features on CUDA, whose 16-bit products round the rotated ones as the composition does."""
    q, k, v = (leaf(t) for t in _qkv(2, 2, 45, 32, 32, dtype, device, "elu", seed=9))
    cos, sin = tables(45, 32, device)
    grad = randn((2, 2, 45, 32), dtype, device, seed=10)
    ours = sola_ops.linear_attention(q, k, v, rope=(cos, sin))
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    (rq, fq), (rk, fk) = (sola_ops.rope(t, cos, sin, feature_map="elu", return_features=True) for t in (q, k))
    composed = sola_ops.linear_attention(rq, rk, v, feature_map="identity", q_norm=fq, k_norm=fk)
    composed_grads = torch.autograd.grad(composed, (q, k, v), grad)
    if dtype == torch.float32:
        assert torch.equal(ours, composed)
        assert torch.equal(ours_grads[2], composed_grads[2]), "dv"
        for a, b in zip(ours_grads[:2], composed_grads[:2]):  # fused multiply-adds may differ
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        return
    torch.testing.assert_close(ours, composed, rtol=2e-2, atol=2e-2)
    assert not torch.equal(ours, composed), "the fused kernels keep the normaliser's features in fp32"
    for a, b in zip(ours_grads, composed_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map,normalize", [("elu", True), ("relu", True), ("identity", False)])
def test_gradcheck(device, feature_map, normalize):
    q, k, v = (leaf(t) for t in make_qkv(1, 2, 6, 6, 4, 3, torch.float64, device, seed=2,
                                          positive=feature_map == "identity"))
    cos, sin = (t.double() for t in tables(6, 4, device))
    fn = lambda q, k, v: sola_ops.linear_attention(q, k, v, feature_map=feature_map, normalize=normalize,  # noqa: E731
                                                   rope=(cos, sin))
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_layout(device, dtype):
    """q and k as head slices of one (B, N, 2 heads, D) projection, SDPA-layout views (no copy), as
    SoLA-Vision's mixers pass them; the tables in any float dtype."""
    B, N, H, D = 2, 49, 2, 32
    qk = randn((B, N, 2 * H, D), dtype, device, seed=5).transpose(1, 2)
    q, k = qk[:, :H], qk[:, H:]
    v = strided_like(randn((B, H, N, D), dtype, device, seed=6), "transposed")
    cos, sin = tables(N, D, device, dtype=torch.float64)
    check_rope_linear(q, k, v, cos, sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [32, 64])
def test_blocks_walk_row_tiles(device, D):
    """768 heads of 200 rows in bf16: more heads than a GPU holds row blocks at once, so each block of
    the tensor-core row kernels walks all 4 row tiles of its head, the next tile's inputs arriving
    in the second cp.async stage while one is multiplied (kD 32 and 64)."""
    q, k, v = _qkv(8, 96, 200, D, D, torch.bfloat16, device, "elu", seed=7)
    check_rope_linear(q, k, v, *tables(200, D, device))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("inputs", ["rope", "norms"])
@pytest.mark.parametrize("variant,D", [("unstaged", 32), ("unstaged", 64), ("staged_presplit", 64)])
def test_cuda_row_variants_same_bits(D, inputs, variant, monkeypatch):
    """SOLA_LINEAR_ROWS=unstaged / staged_presplit (bench/kernels.py's sola_ops_unstaged /
    sola_ops_presplit) run other variants of the row kernels: the same arithmetic from other buffers,
    so out and the gradients keep their bits. 768 heads of 200 rows: the blocks walk all their head's
    tiles. With RoPE, or with q_norm / k_norm (staged as a third input). (staged_presplit at head dim 32
    is the staged kernel itself, RowsTcConfig::kCanonical: no case there.) Products on tf32
    (SOLA_LINEAR_MMA): by default bf16's staged row kernels multiply 16-bit operands, the unstaged ones tf32."""
    monkeypatch.setenv("SOLA_LINEAR_MMA", "tf32")
    q, k, v = (leaf(t) for t in _qkv(8, 96, 200, D, D, torch.bfloat16, "cuda", "elu", seed=3))
    if inputs == "rope":
        kw = dict(rope=tables(200, D, "cuda"))
    else:
        kw = dict(q_norm=leaf(randn(q.shape, q.dtype, "cuda", seed=5)),
                  k_norm=leaf(randn(k.shape, k.dtype, "cuda", seed=6)))
    grads_of = (q, k, v) + tuple(t for t in kw.values() if isinstance(t, torch.Tensor))
    g = randn(v.shape, v.dtype, "cuda", seed=4)

    def run():
        out = sola_ops.linear_attention(q, k, v, **kw)
        return (out,) + torch.autograd.grad(out, grads_of, g)

    staged = run()
    monkeypatch.setenv("SOLA_LINEAR_ROWS", variant)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dqn", "dkn"), staged, run()):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("D", [32, 64])  # the token reduction's 32 and 64 tiles
@pytest.mark.parametrize("inputs", ["plain", "rope", "norms"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tf32_products(dtype, D, inputs, monkeypatch):
    """SOLA_LINEAR_MMA=tf32 (bench/kernels.py's sola_ops_tf32) keeps the products on tf32; by default the
    forward's token reduction (but for fp16 with RoPE) and bf16's row kernels multiply 16-bit operands.
    Both pass the FlashAttention rule (out and gradients), and they round differently: the switch
    reaches the kernels."""
    q, k, v = _qkv(2, 3, 300, D, D, dtype, "cuda", "elu", seed=7)
    kw = {}
    if inputs == "rope":
        kw = dict(rope=tables(300, D, "cuda"))
    elif inputs == "norms":
        kw = dict(q_norm=randn(q.shape, dtype, "cuda", seed=8), k_norm=randn(k.shape, dtype, "cuda", seed=9))
    default = sola_ops.linear_attention(q, k, v, **kw)
    monkeypatch.setenv("SOLA_LINEAR_MMA", "tf32")
    if inputs == "rope":
        tf32 = check_rope_linear(q, k, v, *kw["rope"])
    else:
        tf32 = check_linear(q, k, v, **kw)
    same_kernel = dtype == torch.float16 and inputs == "rope"
    assert torch.equal(default, tf32) == same_kernel


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64])  # 32: QueryGrad sums dS; 64: the token reduction over q, g (chunked)
def test_cuda_backward_deterministic(dtype, D):
    q, k, v = (leaf(t) for t in _qkv(4, 2, 700, D, D, dtype, "cuda", "elu", seed=1))
    cos, sin = tables(700, D, "cuda")
    g = randn((4, 2, 700, D), dtype, "cuda", seed=2)
    runs = [torch.autograd.grad(sola_ops.linear_attention(q, k, v, rope=(cos, sin)), (q, k, v), g) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_and_nan(device, dtype):
    q, k, v = (leaf(t) for t in make_qkv(0, 2, 5, 5, 8, 8, dtype, device))
    out = sola_ops.linear_attention(q, k, v, rope=tables(5, 8, device))
    assert out.shape == (0, 2, 5, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
    q, k, v = make_qkv(2, 2, 5, 5, 8, 8, dtype, device)
    k[1, 1, 2, 3] = float("nan")
    out = sola_ops.linear_attention(q, k, v, rope=tables(5, 8, device))
    assert torch.isnan(out[1, 1]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_tables(device):
    """Tables whose rows are whole 16-byte vectors but whose storage is not 16-byte aligned (element
    loads), in fp64 (converted to fp32 by the op) and fp32 views at an odd offset."""
    N, D = 33, 16
    cos, sin = tables(N, D, device)
    shifted = [torch.cat((t.new_zeros(1), t.flatten()))[1:].view(N, D // 2) for t in (cos, sin)]
    assert shifted[0].data_ptr() % 16 and torch.equal(shifted[0], cos)
    q, k, v = _qkv(2, 2, N, D, D, torch.bfloat16, device, "elu", seed=3)
    want = sola_ops.linear_attention(q, k, v, rope=(cos, sin))
    assert torch.equal(sola_ops.linear_attention(q, k, v, rope=tuple(shifted)), want)
    check_rope_linear(q, k, v, *shifted)


def test_bad_input():
    q, k, v = make_qkv(1, 2, 5, 5, 8, 8, torch.float32)
    cos, sin = tables(5, 8)
    la = sola_ops.linear_attention
    cases = [
        ((q, k, v), dict(rope=(cos, sin), q_norm=q), ValueError, "cannot be combined with rope"),
        ((q, k, v), dict(rope=(cos[:4], sin)), ValueError, r"rope\[0\] \(cos\) must be \(N, D / 2\)"),
        ((q, k, v), dict(rope=(cos, sin[:, :3])), ValueError, r"rope\[1\] \(sin\) must be"),
        ((q, k, v), dict(rope=(cos, sin.int())), ValueError, "must be a floating-point"),
        ((q, k, v), dict(rope=(cos, sin.to("meta"))), ValueError, "must be on the device of q"),
        ((q, k[:, :, :4], v[:, :, :4]), dict(rope=(cos, sin)), ValueError, "as many queries as keys"),
        ((q[..., :7], k[..., :7], v), dict(rope=(cos[:, :3], sin[:, :3])), ValueError, "even head dim"),
        ((q, k, v), dict(rope=(cos.detach().requires_grad_(), sin)), ValueError, "require grad"),
        ((q, k, v), dict(rope=cos), TypeError, "rope must be a \\(cos, sin\\) pair"),
        ((q, k, v), dict(rope=(cos, [1.0])), TypeError, r"rope\[1\] \(sin\) must be a torch.Tensor"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            la(*args, **kwargs)


def test_raw_op_checks():
    """The C++ op checks for itself (callers of torch.ops.sola_ops skip the Python checks)."""
    q, k, v = make_qkv(1, 2, 5, 5, 8, 8, torch.float32)
    cos, sin = tables(5, 8)
    with pytest.raises(ValueError, match="rope_cos and rope_sin must be given together"):
        ops.linear_attention_fwd(q, k, v, None, None, "elu", True, 1e-6, cos, None)
    with pytest.raises(ValueError, match="cannot be combined with rope"):
        ops.linear_attention_fwd(q, k, v, None, k, "elu", True, 1e-6, cos, sin)
    with pytest.raises(ValueError, match="rope_sin must be"):
        ops.linear_attention_fwd(q, k, v, None, None, "elu", True, 1e-6, cos, sin[:3])
    with pytest.raises(ValueError, match="as many queries as keys"):
        ops.linear_attention_fwd(q[:, :, :4], k, v, None, None, "elu", True, 1e-6, cos, sin)
    # the fake (meta) implementation, which torch.compile traces, checks the same
    meta = [t.to("meta") for t in (q, k, v, cos, sin)]
    with pytest.raises(ValueError, match="cannot be combined with rope"):
        ops.linear_attention_fwd(*meta[:3], None, meta[1], "elu", True, 1e-6, *meta[3:])
    with pytest.raises(ValueError, match="as many queries as keys"):
        ops.linear_attention_fwd(meta[0][:, :, :4], *meta[1:3], None, None, "elu", True, 1e-6, *meta[3:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,normalize", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)])
def test_opcheck(device, dtype, normalize):
    q, k, v = make_qkv(2, 2, 6, 6, 8, 4, dtype, device, seed=1)
    cos, sin = tables(6, 8, device)
    args = (leaf(q), leaf(k), leaf(v), None, None, "elu", normalize, 1e-6, cos, sin)
    torch.library.opcheck(ops.linear_attention_fwd.default, args)
    out, state, z = ops.linear_attention_fwd(q, k, v, None, None, "elu", normalize, 1e-6, cos, sin)
    g = randn(out.shape, dtype, device, seed=4)
    torch.library.opcheck(ops.linear_attention_bwd.default,
                          (g, q, k, v, None, None, state, z, "elu", normalize, 1e-6, cos, sin))


def test_compile(fresh_dynamo):
    """fullgraph compile with a dynamic size, forward and backward, against eager."""
    def fn(q, k, v, cos, sin):
        return sola_ops.linear_attention(q, k, v, rope=(cos, sin))
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for N in (5, 9):
        q, k, v = (leaf(t) for t in make_qkv(2, 2, N, N, 8, 8, torch.float32, seed=N))
        cos, sin = tables(N, 8)
        out = compiled(q, k, v, cos, sin)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want = fn(q, k, v, cos, sin)
        want_grads = torch.autograd.grad(want.sum(), (q, k, v))
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
