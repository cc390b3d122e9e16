"""The contract around the kernels: build info, bad input and its errors, odd layouts, empty inputs, NaN/Inf,
the NaN-fill debug mode, torch.library.opcheck and torch.compile(fullgraph=True)."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import sola_ops
from conftest import (DEVICES, FEATURE_MAPS, check_double_backward, check_linear, check_softmax, leaf, make_qkv, randn,
                      requires_cuda, size_id, strided_like)
from sola_ops import reference

OPS = ["linear", "softmax"]
CHECK = {"linear": check_linear, "softmax": check_softmax}  # op and gradients vs the fp64 reference


def run_op(op, q, k, v, **kw):
    if op == "linear":
        return sola_ops.linear_attention(q, k, v, **kw)
    return sola_ops.softmax_attention(q, k, v, **kw)


# ---- build info -----------------------------------------------------------------------------------------

def test_build_info():
    info = sola_ops.build_info()
    assert {"cpu", "cuda", "cuda_archs", "cpu_gemm"} <= set(info)
    assert info["cpu"] is True
    assert info["cpu_gemm"] in ("avx512", "avx2", "baseline")
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build lists the archs it was compiled for"
        for arch in info["cuda_archs"]:
            major, minor = str(arch).split(".")
            assert major.isdigit() and minor.isdigit(), arch
    else:
        assert info["cuda_archs"] == []
    info["cpu"] = False  # a copy: callers cannot change what the next call reports
    assert sola_ops.build_info()["cpu"] is True


def test_ops_registered():
    for name in ("linear_attention_fwd", "linear_attention_bwd", "softmax_attention_fwd", "softmax_attention_bwd",
                 "rope_fwd", "rope_bwd", "depthwise_conv3x3_fwd", "depthwise_conv3x3_bwd"):
        assert hasattr(torch.ops.sola_ops, name)
        schema = str(getattr(torch.ops.sola_ops, name).default._schema)
        assert schema.startswith(f"sola_ops::{name}(")


# ---- bad input -------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)


def _bad_cases(device):
    """(id, op, q, k, v, kwargs, regex naming the argument) for both ops."""
    d = dict(device=device)
    q, k, v = _t(2, 3, 5, 8, **d), _t(2, 3, 6, 8, **d), _t(2, 3, 6, 4, **d)
    cases = [
        ("q_rank3", _t(3, 5, 8, **d), k, v, {}, r"q must be 4-D"),
        ("q_rank5", _t(1, 2, 3, 5, 8, **d), k, v, {}, r"q must be 4-D"),
        ("k_rank3", q, _t(3, 6, 8, **d), v, {}, r"k must be 4-D"),
        ("v_rank5", q, k, _t(1, 2, 3, 6, 4, **d), {}, r"v must be 4-D"),
        ("k_batch", q, _t(1, 3, 6, 8, **d), v, {}, r"k (and v )?must have the batch and heads of q"),
        ("k_heads", q, _t(2, 1, 6, 8, **d), v, {}, r"k (and v )?must have the batch and heads of q"),
        ("v_batch", q, k, _t(3, 3, 6, 4, **d), {}, r"(v|k and v) must have the batch and heads of q"),
        ("v_heads", q, k, _t(2, 4, 6, 4, **d), {}, r"(v|k and v) must have the batch and heads of q"),
        ("k_headdim", q, _t(2, 3, 6, 7, **d), v, {}, r"k must have the head dim of q \(8\)"),
        ("v_seqlen", q, k, _t(2, 3, 7, 4, **d), {}, r"v must have the sequence length of k \(6\)"),
        ("nk_zero", q, _t(2, 3, 0, 8, **d), _t(2, 3, 0, 4, **d), {}, r"k must have at least one key"),
        ("k_fp16", q, k.half(), v, {}, r"k must have the dtype of q"),
        ("v_bf16", q, k, v.bfloat16(), {}, r"v must have the dtype of q"),
        ("v_fp64", q, k, v.double(), {}, r"v must have the dtype of q"),
        ("q_int32", q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), {},
         r"q must be float16, bfloat16, float32 or float64"),
        ("k_int64", q, k.to(torch.int64), v, {}, r"k must be float16, bfloat16, float32 or float64"),
        ("v_bool", q, k, v > 0, {}, r"v must be float16, bfloat16, float32 or float64"),
    ]
    out = [(cid, op, *rest) for cid, *rest in cases for op in OPS]
    qn_bad = _t(2, 3, 4, 8, **d)
    out += [
        ("feature_map", "linear", q, k, v, dict(feature_map="gelu"),
         r"feature_map must be 'elu', 'relu' or 'identity'"),
        ("feature_map_case", "linear", q, k, v, dict(feature_map="ELU"), r"feature_map"),
        ("q_norm_unnormalized", "linear", q, k, v, dict(normalize=False, q_norm=q), r"q_norm"),
        ("k_norm_unnormalized", "linear", q, k, v, dict(normalize=False, k_norm=k), r"k_norm"),
        ("q_norm_shape", "linear", q, k, v, dict(q_norm=qn_bad), r"q_norm must have the shape of q"),
        ("k_norm_shape", "linear", q, k, v, dict(k_norm=q), r"k_norm must have the shape of k"),
        ("q_norm_dtype", "linear", q, k, v, dict(q_norm=q.double()), r"q_norm must have the dtype of q"),
        ("k_norm_rank", "linear", q, k, v, dict(k_norm=k[0]), r"k_norm must be 4-D"),
        ("k_norm_int", "linear", q, k, v, dict(k_norm=k.to(torch.int32)), r"k_norm must be float16"),
    ]
    return out


_CASE_IDS = [f"{c[1]}-{c[0]}" for c in _bad_cases("cpu")]


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta runs the fake (torch.compile) checks
@pytest.mark.parametrize("case", range(len(_CASE_IDS)), ids=_CASE_IDS)
def test_bad_input(device, case):
    cid, op, q, k, v, kw, match = _bad_cases(device)[case]
    with pytest.raises((ValueError, RuntimeError), match=match):
        run_op(op, q, k, v, **kw)


class _NoKernel:
    """Stands in for torch.ops.sola_ops: any use of a C++ op fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"bad input reached the C++ op {name}")


_BAD_NUMBERS = [("linear", "eps", float("nan")), ("linear", "eps", float("inf")), ("linear", "eps", -1e-6),
                ("softmax", "scale", float("nan")), ("softmax", "scale", float("-inf"))]


@pytest.mark.parametrize("case", range(len(_CASE_IDS)), ids=_CASE_IDS)
def test_bad_input_rejected_before_the_kernel(monkeypatch, case):
    """The public functions reject bad arguments in Python, before any C++ op runs: on the GPU box
    (torch 2.11, GCC 13, 2026-12-04) an error thrown by our C++ checks crashed the process, so what
    a user passes must never depend on one."""
    cid, op, q, k, v, kw, match = _bad_cases("cpu")[case]
    monkeypatch.setattr(sola_ops._ops, "ops", _NoKernel())  # what sola_ops._ops.call runs
    with pytest.raises(ValueError, match=match):
        run_op(op, q, k, v, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,name,value", _BAD_NUMBERS, ids=[f"{o}-{n}={v}" for o, n, v in _BAD_NUMBERS])
def test_bad_number_is_value_error(device, op, name, value):
    q, k, v = make_qkv(1, 2, 3, 4, 8, 8, torch.float32, device)
    with pytest.raises(ValueError, match=rf"{name} must be finite"):
        run_op(op, q, k, v, **{name: value})


@pytest.mark.parametrize("op,name", [("linear", "eps"), ("softmax", "scale")])
def test_number_past_float32_range(monkeypatch, op, name):
    """eps / scale beyond half fp32's range: a ValueError for fp32 / bf16 inputs (the kernels compute in fp32,
    where it would be inf: linear attention all 0, softmax NaN; the tensor-core kernels take scale * log2(e))
    before any C++ op runs; fp64 inputs take it."""
    q, k, v = make_qkv(1, 2, 3, 4, 8, 8, torch.float64)
    big = {name: 2e38 if name == "eps" else -2e38}
    ref = run_op(op, q, k, v, **big)
    assert ref.isfinite().all()
    monkeypatch.setattr(sola_ops._ops, "ops", _NoKernel())
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"{name} must be at most 1.7e38 in magnitude for {dtype} inputs"):
            run_op(op, q.to(dtype), k.to(dtype), v.to(dtype), **big)


@pytest.mark.parametrize("op", OPS)
def test_bad_input_is_value_error(op):
    """The contract's error type for argument errors is ValueError (not a bare RuntimeError)."""
    q, k = _t(1, 2, 3, 8), _t(1, 2, 4, 8)
    with pytest.raises(ValueError, match="k must have the head dim of q"):
        run_op(op, q, _t(1, 2, 4, 7), _t(1, 2, 4, 8))
    with pytest.raises(ValueError, match="v must have the dtype of q"):
        run_op(op, q, k, k.half())


def _nested(t):
    return torch.nested.nested_tensor(list(t.unbind(0)))


def _jagged(t):
    return torch.nested.nested_tensor(list(t.unbind(0)), layout=torch.jagged)


_DENSE = r"must be a dense \(strided\) tensor, got a "
# (id, op, argument, its bad value made from the good one, error type, regex naming the argument)
_ARG_CASES = [(f"{op}-{cid}", op, *rest) for op in OPS for cid, *rest in [
    ("q_none", "q", lambda t: None, TypeError, r"q must be a torch.Tensor, got NoneType"),
    ("q_list", "q", lambda t: t.tolist(), TypeError, r"q must be a torch.Tensor, got list"),
    ("k_ndarray", "k", lambda t: t.numpy(), TypeError, r"k must be a torch.Tensor, got ndarray"),
    ("v_float", "v", lambda t: 1.0, TypeError, r"v must be a torch.Tensor, got float"),
    ("v_sparse_coo", "v", lambda t: t.to_sparse(), ValueError, r"v " + _DENSE + r"torch.sparse_coo"),
    ("q_sparse_csr", "q", lambda t: t.to_sparse_csr(), ValueError, r"q " + _DENSE + r"torch.sparse_csr"),
    ("k_quantized", "k", lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), ValueError,
     r"k " + _DENSE + "quantized"),
    ("q_nested", "q", _nested, ValueError, r"q " + _DENSE + "nested"),
    ("v_jagged", "v", _jagged, ValueError, r"v " + _DENSE + "nested"),
]] + [
    ("linear-q_norm_float", "linear", "q_norm", lambda t: 1.0, TypeError,
     r"q_norm must be a torch.Tensor or None, got float"),
    ("linear-k_norm_sparse", "linear", "k_norm", lambda t: t.to_sparse(), ValueError, r"k_norm " + _DENSE),
    ("linear-eps_none", "linear", "eps", lambda t: None, TypeError, r"eps must be a real number, got NoneType"),
    ("linear-eps_list", "linear", "eps", lambda t: [1e-6], TypeError, r"eps must be a real number, got list"),
    ("linear-eps_str", "linear", "eps", lambda t: "small", TypeError, r"eps must be a real number, got str"),
    ("softmax-scale_overflow", "softmax", "scale", lambda t: 10**400, ValueError, r"scale is too large for a float"),
    ("softmax-scale_list", "softmax", "scale", lambda t: [0.5], TypeError, r"scale must be a real number"),
]


@pytest.mark.filterwarnings("ignore:.*nested tensors is in prototype", "ignore:Sparse CSR tensor support",
                            "ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("case", _ARG_CASES, ids=[c[0] for c in _ARG_CASES])
def test_bad_argument_type(case):
    """Non-tensors, non-dense tensors and non-numbers get a TypeError / ValueError naming the argument
    (not an AttributeError, a schema error or the dispatcher's NotImplementedError)."""
    _, op, name, make, exc, match = case
    q, k, v = make_qkv(2, 3, 5, 6, 8, 4, torch.float32)
    args = dict(q=q, k=k, v=v)
    args[name] = make(dict(args, q_norm=q, k_norm=k).get(name))  # eps / scale ignore it
    with pytest.raises(exc, match=match):
        run_op(op, **args)


def test_scalar_arguments_still_accepted():
    """eps and scale take what float() takes: ints, numpy scalars, one-element tensors."""
    q, k, v = make_qkv(1, 2, 3, 4, 8, 4, torch.float32)
    ref_s, ref_l = sola_ops.softmax_attention(q, k, v, scale=0.5), sola_ops.linear_attention(q, k, v, eps=0.5)
    for x in (np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5])):
        assert torch.equal(sola_ops.softmax_attention(q, k, v, scale=x), ref_s)
        assert torch.equal(sola_ops.linear_attention(q, k, v, eps=x), ref_l)
    assert torch.equal(sola_ops.softmax_attention(q, k, v, scale=1), sola_ops.softmax_attention(q, k, v, scale=1.0))


def test_scale_requiring_grad_is_refused():
    """A scale tensor that requires grad (a learned temperature) would lose its gradient in float():
    a clear error instead, naming the way round it."""
    q, k, v = make_qkv(1, 2, 3, 4, 8, 4, torch.float32)
    tau = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(ValueError, match=r"scale is a tensor that requires grad.*q \* scale"):
        sola_ops.softmax_attention(q, k, v, scale=tau)
    with pytest.raises(ValueError, match="eps is a tensor that requires grad"):
        sola_ops.linear_attention(q, k, v, eps=tau)
    (sola_ops.softmax_attention(q * tau, k, v, scale=1.0)).sum().backward()
    assert tau.grad is not None and tau.grad != 0


def test_raw_op_checks():
    """The C++ ops check what the Python wrappers cannot see (called directly via torch.ops)."""
    ops = torch.ops.sola_ops
    q, k, v = make_qkv(1, 2, 5, 6, 8, 4, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="feature_map must be 'elu', 'relu' or 'identity'"):
        ops.linear_attention_fwd(q, k, v, None, None, "softplus", True, 1e-6)
    with pytest.raises((ValueError, RuntimeError), match="q_norm and k_norm"):
        ops.linear_attention_fwd(q, k, v, q, None, "elu", False, 1e-6)
    out, state, z = ops.linear_attention_fwd(q, k, v, None, None, "elu", True, 1e-6)
    assert state.shape == (1, 2, 8, 4) and z.shape == (1, 2, 8) and state.dtype == z.dtype == torch.float32
    with pytest.raises((ValueError, RuntimeError), match="grad_out must have the output's shape"):
        ops.linear_attention_bwd(out[:, :, :4], q, k, v, None, None, state, z, "elu", True, 1e-6)
    with pytest.raises((ValueError, RuntimeError), match="state"):
        ops.linear_attention_bwd(out, q, k, v, None, None, state.half(), z, "elu", True, 1e-6)
    with pytest.raises((ValueError, RuntimeError), match="grad_out must have the dtype of q"):
        ops.linear_attention_bwd(out.double(), q, k, v, None, None, state, z, "elu", True, 1e-6)
    out, lse = ops.softmax_attention_fwd(q, k, v, 0.5)
    with pytest.raises((ValueError, RuntimeError), match="grad_out must have the output's shape"):
        ops.softmax_attention_bwd(out[..., :3], q, k, v, out, lse, 0.5)
    with pytest.raises((ValueError, RuntimeError), match="lse"):
        ops.softmax_attention_bwd(out, q, k, v, out, lse.double(), 0.5)
    with pytest.raises((ValueError, RuntimeError), match="out must have the output's shape"):
        ops.softmax_attention_bwd(out, q, k, v, out[:, :1], lse, 0.5)


@pytest.mark.parametrize("op", OPS)
def test_mixed_devices_cpu_meta(op):
    q, k, v = make_qkv(1, 2, 5, 6, 8, 4, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match=r"k must be on the device of q"):
        run_op(op, q, k.to("meta"), v)
    with pytest.raises((ValueError, RuntimeError), match=r"v must be on the device of q"):
        run_op(op, q, k, v.to("meta"))
    with pytest.raises((ValueError, RuntimeError), match=r"k must be on the device of q"):
        run_op(op, q.to("meta"), k, v.to("meta"))
    if op == "linear":
        with pytest.raises((ValueError, RuntimeError), match=r"q_norm must be on the device of q"):
            run_op(op, q, k, v, q_norm=q.to("meta"))


def _raw_op_calls(device):
    """A valid call of every raw op on device: (name, kwargs)."""
    ops = torch.ops.sola_ops
    q, k, v = make_qkv(1, 2, 5, 5, 8, 4, torch.float32, device)
    out, state, z = ops.linear_attention_fwd(q, k, v, q, k, "elu", True, 1e-6)
    s_out, lse = ops.softmax_attention_fwd(q, k, v, 0.5)
    cos, sin = torch.ones(5, 4, device=device), torch.zeros(5, 4, device=device)
    rot, feat = ops.rope_fwd(q, cos, sin, "elu", True)
    x, w, b = (torch.randn(shape, device=device) for shape in ((1, 4, 4, 3), (3, 1, 3, 3), (3,)))
    y = ops.depthwise_conv3x3_fwd(x, w, b, False, "relu")
    ln_out, mean, rstd = ops.layer_norm_fwd(x, b, b, 1e-5)
    return [
        ("linear_attention_fwd", dict(q=q, k=k, v=v, q_norm=q, k_norm=k, feature_map="elu", normalize=True, eps=1e-6)),
        ("linear_attention_fwd", dict(q=q, k=k, v=v, q_norm=None, k_norm=None, feature_map="elu", normalize=True,
                                      eps=1e-6, rope_cos=cos, rope_sin=sin)),
        ("linear_attention_bwd", dict(grad_out=out, q=q, k=k, v=v, q_norm=q, k_norm=k, state=state, z=z,
                                      feature_map="elu", normalize=True, eps=1e-6)),
        ("softmax_attention_fwd", dict(q=q, k=k, v=v, scale=0.5)),
        ("softmax_attention_bwd", dict(grad_out=s_out, q=q, k=k, v=v, out=s_out, lse=lse, scale=0.5, grad_lse=lse)),
        ("rope_fwd", dict(x=q, cos=cos, sin=sin, feature_map="elu", with_features=True)),
        ("rope_bwd", dict(grad_rot=rot, grad_feat=feat, x=q, cos=cos, sin=sin, feature_map="elu")),
        ("depthwise_conv3x3_fwd", dict(x=x, weight=w, bias=b, residual=False, addend=x)),
        ("depthwise_conv3x3_bwd", dict(grad_out=y, x=x, weight=w, residual=False, with_bias=True, bias=b,
                                       activation="relu", out=y)),
        ("layer_norm_fwd", dict(x=x, weight=b, bias=b, eps=1e-5)),
        ("layer_norm_bwd", dict(grad_out=ln_out, x=x, weight=b, mean=mean, rstd=rstd, with_weight=True, with_bias=True,
                                addend=x)),
        ("silu_mul_fwd", dict(x=x, gate=x)),
        ("silu_mul_bwd", dict(grad_out=x, x=x, gate=x)),
        ("bias_gelu_fwd", dict(x=x, bias=b)),
        ("bias_gelu_bwd", dict(grad_out=x, x=x, bias=b)),
    ]


RAW_ARG_AS_PUBLIC = {"rope_cos": r"rope\[0\] \(cos\)", "rope_sin": r"rope\[1\] \(sin\)"}  # as the checks name them


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_one_meta_argument(device):
    """One meta argument among CPU / CUDA tensors sends a raw op's call to its fake implementation (the
    Meta dispatch key): it must raise naming that argument, not return empty tensors."""
    for op_name, kwargs in _raw_op_calls(device):
        op = getattr(torch.ops.sola_ops, op_name)
        op(**kwargs)  # the valid call runs
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                said = RAW_ARG_AS_PUBLIC.get(name, name)
                with pytest.raises(ValueError, match=rf"(^|\s){said} must be on the device of|device of {said} \(meta\)"):
                    op(**dict(kwargs, **{name: value.to("meta")}))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("op", OPS)
def test_mixed_devices_cuda_cpu(op):
    q, k, v = make_qkv(1, 2, 5, 6, 8, 4, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match=r"k must be on the device of q"):
        run_op(op, q.cuda(), k, v.cuda())
    with pytest.raises((ValueError, RuntimeError), match=r"v must be on the device of q"):
        run_op(op, q.cuda(), k.cuda(), v)
    with pytest.raises((ValueError, RuntimeError), match=r"k must be on the device of q"):
        run_op(op, q, k.cuda(), v)
    if op == "linear":
        with pytest.raises((ValueError, RuntimeError), match=r"k_norm must be on the device of q"):
            run_op(op, q.cuda(), k.cuda(), v.cuda(), k_norm=k)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_graph_capture(op, dtype):
    """Forward and backward replay from a CUDA graph (as in torch.compile's reduce-overhead mode and
    bench/models.py) and give the eager call's bits: the kernels are deterministic."""
    q, k, v = make_qkv(2, 3, 70, 50, 32, 24, dtype, "cuda", requires_grad=True)
    dout = randn((2, 3, 70, 24), dtype, "cuda", seed=9)

    def step():
        out = run_op(op, q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    # Every eager call on a side stream, as torch.cuda.graph asks: a backward on the default stream
    # would leave autograd's leaf nodes on the legacy stream, which the capture cannot wait on
    # ("operation would make the legacy stream depend on a capturing blocking stream", pytorch#164302).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [t.clone() for t in step()]
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in captured:
        t.fill_(float("nan"))  # replay must write every element again
    graph.replay()
    torch.cuda.synchronize()
    for name, got, want in zip(("out", "dq", "dk", "dv"), captured, eager):
        assert torch.equal(got, want), f"{name} from the graph replay differs from the eager call"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_head_dim_limit(op):
    """Head dims up to 256 run on CUDA; beyond the kernels' maximum is an error naming the argument."""
    limit = sola_ops.build_info().get("max_cuda_head_dim", 256)
    assert limit >= 256
    q, k, v = make_qkv(1, 1, 4, 5, 256, 256, torch.float16, "cuda")
    out = run_op(op, q, k, v)
    ref = run_op(op, q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-2, atol=2e-2)
    q, k, v = make_qkv(1, 1, 4, 5, limit + 1, 8, torch.float16, "cuda")
    with pytest.raises((ValueError, RuntimeError), match=r"q head dim"):
        run_op(op, q, k, v)
    q, k, v = make_qkv(1, 1, 4, 5, 8, limit + 1, torch.float16, "cuda")
    with pytest.raises((ValueError, RuntimeError), match=r"v head dim"):
        run_op(op, q, k, v)


# ---- layouts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_head_dim_one(device, op):
    """Dk = Dv = 1 with last-dim strides != 1 (a size-1 dim may have any stride)."""
    q = randn((1, 2, 5, 3), torch.float32, device, seed=13)[..., 1:2]
    k = randn((1, 2, 7, 3), torch.float32, device, seed=14)[..., ::3]
    v = randn((1, 2, 7, 1), torch.float32, device, seed=12)
    assert q.stride(-1) == 1 and k.stride(-1) == 3
    CHECK[op](q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_sdpa_layout_view(device, op):
    """x.view(B, N, H, D).transpose(1, 2), as a projection's output is reshaped in a model."""
    B, N, H, D = 2, 37, 3, 16
    x = randn((B, N, 3 * H * D), torch.float32, device, seed=31)
    q, k, v = (t.transpose(1, 2) for t in x.view(B, N, 3, H, D).unbind(2))
    assert q.stride(-1) == 1 and not q.is_contiguous()
    CHECK[op](q, k, v)


def _interleaved_qkv(device, B=2, N=37, H=3, D=16, dtype=torch.float32):
    """q, k, v as a model gets them from one projection: (B, N, 3, H, D) unbound and transposed."""
    x = randn((B, N, 3 * H * D), dtype, device, seed=41)
    return [leaf(t.transpose(1, 2)) for t in x.view(B, N, 3, H, D).unbind(2)]


def _fake_like(ts):
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    return mode, [mode.from_tensor(t) for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_outputs_take_the_heads_interleaved_layout(device, op):
    """A (B, N, H, D)-in-memory q gives an output, and q, k, v gradients, in that layout, so the model's
    out.transpose(1, 2).reshape(B, N, H * D) is a view; every element written (NaN-fill mode), values
    as the reference's; the fake implementation gives the same strides."""
    q, k, v = _interleaved_qkv(device)
    with sola_ops.debug_nan_fill(True):
        out = run_op(op, q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), randn(out.shape, torch.float32, device, seed=5))
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    for t, g in zip((q, k, v), grads):
        assert g.transpose(1, 2).is_contiguous() and not g.isnan().any(), g.stride()
    assert not out.isnan().any()
    CHECK[op](q, k, v)
    fwd = torch.ops.sola_ops.linear_attention_fwd if op == "linear" else torch.ops.sola_ops.softmax_attention_fwd
    args = (None, None, "elu", True, 1e-6) if op == "linear" else (0.25,)
    mode, fakes = _fake_like((q.detach(), k.detach(), v.detach()))
    with mode:
        fake_out = fwd(*fakes, *args)[0]
    assert fake_out.stride() == fwd(q.detach(), k.detach(), v.detach(), *args)[0].stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 1, 5, 8), (2, 3, 1, 8), (1, 3, 5, 8)], ids=lambda s: "x".join(map(str, s)))
def test_outputs_of_other_layouts_are_contiguous(device, op, shape):
    """Contiguous inputs, strided views of another kind, and a single head or token (where both layouts
    coincide) give contiguous outputs and gradients."""
    B, H, N, D = shape
    base = randn((B, N, H, 2 * D), torch.float32, device, seed=7)
    cases = {"contiguous": randn(shape, torch.float32, device, seed=8),
             "heads_interleaved": base[..., :D].transpose(1, 2)}
    for name, t in cases.items():
        q = leaf(t)
        k, v = leaf(t.clone()), leaf(t.clone())
        out = run_op(op, q, k, v)
        dq, = torch.autograd.grad(out, (q,), torch.ones_like(out))
        if name == "contiguous" or H == 1 or N == 1:
            assert out.is_contiguous() and dq.is_contiguous(), (name, out.stride(), dq.stride())


@pytest.mark.parametrize("device", DEVICES)
def test_rope_outputs_take_the_heads_interleaved_layout(device):
    B, N, H, D = 2, 9, 4, 8
    x = leaf(randn((B, N, H, 2 * D), torch.float32, device, seed=3)[..., :D].transpose(1, 2))
    cos, sin = randn((N, D // 2), torch.float32, device, seed=1), randn((N, D // 2), torch.float32, device, seed=2)
    rot, feat = sola_ops.rope(x, cos, sin, feature_map="elu", return_features=True)
    dx, = torch.autograd.grad((rot, feat), (x,), (torch.ones_like(rot), torch.ones_like(feat)))
    for t in (rot, feat, dx):
        assert t.transpose(1, 2).is_contiguous(), t.stride()
    torch.testing.assert_close(rot, sola_ops.rope(x.contiguous(), cos, sin, feature_map="elu"))
    mode, (fx, fc, fs) = _fake_like((x.detach(), cos, sin))
    with mode:
        frot, ffeat = torch.ops.sola_ops.rope_fwd(fx, fc, fs, "elu", True)
    assert frot.stride() == ffeat.stride() == rot.stride()


# ---- empty inputs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_fill", [False, True], ids=["plain", "nan_fill"])
@pytest.mark.parametrize("empty", ["B", "H", "Nq"])
@pytest.mark.parametrize("op", OPS)
def test_empty(device, op, empty, nan_fill):
    B, H, Nq, Nk, Dk, Dv = 2, 3, 5, 6, 8, 4
    B, H, Nq = (0 if empty == "B" else B), (0 if empty == "H" else H), (0 if empty == "Nq" else Nq)
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, torch.float32, device, requires_grad=True)
    norms = {}
    if op == "linear":
        norms = dict(q_norm=leaf(randn(q.shape, torch.float32, device, 3)),
                     k_norm=leaf(randn(k.shape, torch.float32, device, 4)))
    ins = [q, k, v] + list(norms.values())
    with sola_ops.debug_nan_fill(nan_fill):
        if op == "linear":
            out = sola_ops.linear_attention(q, k, v, **norms)
        else:
            out, lse = sola_ops.softmax_attention(q, k, v, return_lse=True)
            assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32
        assert out.shape == (B, H, Nq, Dv) and out.dtype == torch.float32 and out.device == q.device
        grads = torch.autograd.grad(out, ins, torch.ones_like(out))
    for t, g in zip(ins, grads):
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype
        # no queries (or nothing at all): every gradient is zero, written rather than left unset
        assert torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("op", OPS)
def test_empty_through_sum_backward(op):
    """The everyday path: loss = out.sum(); loss.backward() with Nq == 0."""
    q, k, v = make_qkv(1, 2, 0, 3, 8, 4, torch.float32, requires_grad=True)
    run_op(op, q, k, v).sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("empty", ["B", "Nq"])
@pytest.mark.parametrize("op", OPS)
def test_empty_strided(op, empty):
    """Empty inputs whose last dim is not unit-stride (a transposed or sliced empty view): an empty
    tensor counts as contiguous, so .contiguous() leaves its strides alone; still a valid input."""
    B, Nq = (0, 5) if empty == "B" else (2, 0)
    q = leaf(torch.randn(B, 2, max(Nq, 1), 16)[:, :, :Nq, ::2])  # stride(-1) == 2
    k = leaf(torch.randn(B, 2, 6, 8))
    v = leaf(torch.randn(B, 2, 12, 6)[:, :, ::2].transpose(2, 3).contiguous().transpose(2, 3))
    assert q.stride(-1) != 1 and q.numel() == 0
    out = run_op(op, q, k, v)
    assert out.shape == (B, 2, Nq, 6)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for t, g in zip((q, k, v), grads):
        assert torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_many_heads(device, op):
    """B * H beyond CUDA's 65535 limit on a grid's y/z dimension."""
    B, H = 2, 40000
    q, k, v = make_qkv(B, H, 3, 2, 8, 4, torch.float32, device, seed=1)
    out = run_op(op, q, k, v)
    ref_fn = reference.linear_attention if op == "linear" else reference.softmax_attention
    ref = ref_fn(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.slow
@requires_cuda
@pytest.mark.parametrize("op", OPS)
def test_more_than_2_31_elements(op):
    """Index math is 64-bit: q, k, v, out each hold more than 2**31 fp16 elements (16+ GiB in all)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with >= 40 GiB")
    H, N, D = 2**31 // (64 * 64) + 3, 64, 64
    q, k, v = (torch.empty((1, H, N, D), dtype=torch.float16, device="cuda").normal_() for _ in range(3))
    out = run_op(op, q, k, v)
    ref_fn = reference.linear_attention if op == "linear" else reference.softmax_attention
    for heads in (slice(0, 2), slice(H // 2, H // 2 + 1), slice(H - 2, H)):
        ref = ref_fn(q[:, heads].double(), k[:, heads].double(), v[:, heads].double())
        torch.testing.assert_close(out[:, heads].double(), ref, rtol=2e-2, atol=2e-2)
    del q, k, v, out
    torch.cuda.empty_cache()


# ---- NaN / Inf propagate -------------------------------------------------------------------------------------

def _poisoned(op, where, value, device, feature_map="elu"):
    q, k, v = make_qkv(2, 2, 7, 9, 8, 5, torch.float32, device, seed=1)
    qn = randn(q.shape, torch.float32, device, seed=2)
    t = {"q": q, "k": k, "v": v, "q_norm": qn}[where]
    t[1, 0, 3, 2] = value
    ins = [leaf(x) for x in (q, k, v)]
    kw = {}
    if op == "linear":
        kw = dict(feature_map=feature_map)
        if where == "q_norm":
            kw["q_norm"] = leaf(qn)
    out = run_op(op, *ins, **kw)
    return out, ins + ([kw["q_norm"]] if "q_norm" in kw else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_propagates(device, op, where, value):
    out, ins = _poisoned(op, where, value, device)
    bad_head, other_head = out[1, 0], out[0, 1]
    assert torch.isfinite(other_head).all(), "a non-finite input leaked into another head"
    if where == "q":
        row = bad_head[3]
        # softmax: a NaN/inf score row gives NaN. linear (elu): phi(-inf) = 0 keeps the row finite.
        if not (op == "linear" and value == float("-inf")):
            assert not torch.isfinite(row).all(), "the poisoned query row came out finite"
        others = torch.cat([bad_head[:3], bad_head[4:]])
        assert torch.isfinite(others).all(), "a non-finite query leaked into other query rows"
    elif not (op == "linear" and where == "k" and value == float("-inf")):
        assert not torch.isfinite(bad_head).all(), "the poisoned key/value did not show in the output"
    if value != value and where != "q":
        assert torch.isnan(bad_head).any()
    # the backward runs through non-finite values without crashing
    grads = torch.autograd.grad(out, ins, torch.ones_like(out))
    assert all(g.shape == t.shape for g, t in zip(grads, ins))
    assert all(torch.isfinite(g[0, 1]).all() for g in grads), "a non-finite input leaked into another head's gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k"])
def test_lse_of_nonfinite_scores_is_torchs(device, where, value):
    """A +inf score gives lse = +inf (torch.logsumexp), not inf - inf = NaN; NaN stays NaN and
    rows the bad value does not reach stay finite and exact."""
    q, k, v = make_qkv(2, 2, 7, 9, 8, 5, torch.float32, device, seed=1)
    {"q": q, "k": k}[where][1, 0, 3, 2] = value
    _, lse = sola_ops.softmax_attention(q, k, v, return_lse=True)
    _, ref = reference.softmax_attention(q.double(), k.double(), v.double(), return_lse=True)
    if value != value:
        assert torch.isnan(lse[1, 0, 3] if where == "q" else lse[1, 0]).all()
    else:
        assert (lse == float("inf")).any(), "no row had a +inf score: the test checks nothing"
    torch.testing.assert_close(lse.double(), ref, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_lse_of_a_row_with_inf_and_nan_scores(device):
    """The README's exception: a row holding +inf and NaN scores keeps lse = +inf (the running max skips
    NaN), where torch.logsumexp gives NaN; out is NaN either way. -inf and NaN: lse NaN, as torch's."""
    q, v = torch.ones(1, 1, 1, 1, device=device), torch.ones(1, 1, 3, 1, device=device)
    k = torch.tensor([[float("inf"), float("nan"), 1.0], [float("-inf"), float("nan"), 1.0]], device=device)
    for row, expected in ((0, float("inf")), (1, float("nan"))):
        out, lse = sola_ops.softmax_attention(q, k[row].view(1, 1, 3, 1), v, return_lse=True)
        assert out.isnan().all()
        torch.testing.assert_close(lse.view(()).cpu(), torch.tensor(expected), equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where,value", [("q", float("inf")), ("k", float("-inf")), ("k", float("nan"))])
def test_softmax_gradients_are_nan_where_the_references_are(device, dtype, where, value):
    """A row with a +inf score has out = NaN (lse = +inf): its probabilities are NaN in the backward too, so
    every gradient it reaches (dv of all keys) is NaN as the reference's, not exp(s - inf) = 0 for the
    finite scores (dv came out finite)."""
    q, k, v = make_qkv(1, 2, 5, 6, 4, 3, dtype, device, seed=2, requires_grad=False)
    {"q": q, "k": k}[where][0, 0, 1, 0] = value
    ins = [t.requires_grad_() for t in (q, k, v)]
    g = torch.ones(1, 2, 5, 3, dtype=dtype, device=device)
    ours = torch.autograd.grad(sola_ops.softmax_attention(*ins), ins, g)
    want = torch.autograd.grad(reference.softmax_attention(*ins), ins, g)
    for name, a, b in zip("qkv", ours, want):
        assert torch.equal(a.isnan(), b.isnan()), f"d{name}'s NaNs differ from the reference's"
        assert b.isnan().any() and not b[:, 1].isnan().any(), "the case checks nothing"
        torch.testing.assert_close(a[:, 1], b[:, 1])


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_nan_propagates_linear_feature_maps(feature_map):
    """NaN passes every feature map (relu(NaN) is NaN, as torch.relu), also through q_norm."""
    for where in ("q", "k", "q_norm"):
        out, ins = _poisoned("linear", where, float("nan"), "cpu", feature_map)
        bad = out[1, 0, 3] if where in ("q", "q_norm") else out[1, 0]
        assert torch.isnan(bad).any(), f"NaN in {where} vanished with feature_map={feature_map}"
        assert torch.isfinite(out[0]).all()
        torch.autograd.grad(out, ins, torch.ones_like(out))


@pytest.mark.parametrize("op", OPS)
def test_all_nan_input_terminates(op):
    q, k, v = (torch.full((1, 2, 70, 16), float("nan")) for _ in range(3))
    out = run_op(op, q, k, v)
    assert torch.isnan(out).all()


# ---- NaN-fill debug mode -------------------------------------------------------------------------------------

def test_debug_nan_fill_toggles():
    C = sola_ops._C
    before = C.debug_nan_fill()
    with sola_ops.debug_nan_fill():
        assert C.debug_nan_fill() is True
        with sola_ops.debug_nan_fill(False):
            assert C.debug_nan_fill() is False
        assert C.debug_nan_fill() is True
    assert C.debug_nan_fill() is before
    with pytest.raises(KeyError):
        with sola_ops.debug_nan_fill():
            raise KeyError("boom")
    assert C.debug_nan_fill() is before, "the mode must be restored after an exception"
    C.set_debug_nan_fill(True)
    try:
        assert C.debug_nan_fill() is True
    finally:
        C.set_debug_nan_fill(before)


def test_debug_nan_fill_env_var():
    code = "import sola_ops; print(sola_ops._C.debug_nan_fill())"
    env = dict(os.environ)
    res = {}
    for val in ("1", "0"):
        env["SOLA_DEBUG_NAN_FILL"] = val
        res[val] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()
    assert res == {"1": "True", "0": "False"}



CPU_GEMM_BUILDS = ["baseline", "avx2", "avx512"]  # narrowest first


@pytest.mark.parametrize("build", ["avx2", "baseline"])
def test_cpu_gemm_builds(build):
    """The CPU kernels' gemm is built per ISA and a CPU runs its widest; SOLA_CPU_GEMM picks a narrower
    one, so its results are checked here too: the awkward-size and gradcheck tests of both ops."""
    widest = sola_ops.build_info()["cpu_gemm"]
    if CPU_GEMM_BUILDS.index(build) > CPU_GEMM_BUILDS.index(widest):
        pytest.skip(f"this CPU runs the {widest} build at most")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SOLA_CPU_GEMM=build)
    chosen = subprocess.run([sys.executable, "-c", "import sola_ops; print(sola_ops.build_info()['cpu_gemm'])"],
                            env=env, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    assert chosen == build
    tests = [f"tests/test_ops_{op}.py::{name}" for op in OPS for name in ("test_awkward_sizes", "test_gradcheck")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests, "-k", "cpu"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


NAN_FILL_CASES = [  # (B, H, Nq, Nk, Dk, Dv, dtype)
    (2, 3, 33, 65, 59, 111, torch.float32),
    (1, 1, 1, 1, 8, 8, torch.float16),
    (1, 2, 130, 7, 256, 8, torch.bfloat16),
    (2, 1, 7, 129, 8, 59, torch.float64),
    (1, 1, 200, 200, 16, 16, torch.float32),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", NAN_FILL_CASES, ids=map(size_id, NAN_FILL_CASES))
@pytest.mark.parametrize("op", ["linear", "linear_norms", "linear_unnormalized", "softmax"])
def test_debug_nan_fill_outputs_fully_written(device, op, case):
    """With every kernel output pre-filled with NaN, finite inputs still give finite outputs and
    gradients (and lse): no element is left unwritten. The results match a run without the mode."""
    B, H, Nq, Nk, Dk, Dv, dtype = case
    q, k, v = make_qkv(B, H, Nq, Nk, Dk, Dv, dtype, device, seed=3)
    qn, kn = randn(q.shape, dtype, device, seed=4), randn(k.shape, dtype, device, seed=5)
    g = randn((B, H, Nq, Dv), dtype, device, seed=6)

    def run():
        ins = [leaf(t.clone()) for t in (q, k, v, qn, kn)]
        if op == "softmax":
            out, lse = sola_ops.softmax_attention(*ins[:3], return_lse=True)
            extra, ins = [lse], ins[:3]
        elif op == "linear_norms":
            out, extra = sola_ops.linear_attention(ins[0], ins[1], ins[2], q_norm=ins[3], k_norm=ins[4]), []
        else:
            out, extra, ins = sola_ops.linear_attention(*ins[:3], normalize=op == "linear"), [], ins[:3]
        return [out.detach()] + extra + list(torch.autograd.grad(out, ins, g))

    with sola_ops.debug_nan_fill():
        filled = run()
    for i, t in enumerate(filled):
        assert torch.isfinite(t).all(), f"result {i} has non-finite (unwritten?) elements"
    plain = run()
    for a, b in zip(filled, plain):
        assert torch.equal(a, b)


# ---- double backward ---------------------------------------------------------------------------------------

def _fp64_inputs(op):
    """fp64 leaves q, k, v (and q_norm, k_norm for linear, so their gradients are covered too)."""
    q, k, v = make_qkv(1, 2, 3, 4, 5, 3, torch.float64, seed=1, requires_grad=True)
    kw = {}
    if op == "linear":
        kw = dict(q_norm=leaf(randn(q.shape, torch.float64, seed=4)), k_norm=leaf(randn(k.shape, torch.float64, seed=5)))
    return [q, k, v] + list(kw.values()), kw


@pytest.mark.parametrize("op", OPS)
def test_double_backward_through_the_reference(op):
    """A gradient of a gradient (create_graph=True) differentiates the op's backward through the reference: a
    Hessian and every input's second derivative equal the reference's (they used to come out as zeros, with a
    warning at best, then as an error)."""
    ref = {"linear": reference.linear_attention, "softmax": reference.softmax_attention}[op]
    q, k, v = make_qkv(1, 1, 3, 3, 2, 2, torch.float64, seed=1)
    torch.testing.assert_close(torch.autograd.functional.hessian(lambda x: (run_op(op, x, k, v) ** 2).sum(), q),
                               torch.autograd.functional.hessian(lambda x: (ref(x, k, v) ** 2).sum(), q))
    ins, kw = _fp64_inputs(op)
    names = list(kw)
    check_double_backward(lambda q, k, v, *n: run_op(op, q, k, v, **dict(zip(names, n))),
                          lambda q, k, v, *n: ref(q, k, v, **dict(zip(names, n))), ins)
    # k a function of q: each input's own (partial) derivative
    check_double_backward(lambda q, v: run_op(op, q, q * 0.5, v[:, :, :3]), lambda q, v: ref(q, q * 0.5, v[:, :, :3]),
                          [ins[0], ins[2]])


@pytest.mark.parametrize("op", OPS)
def test_create_graph_first_order(op):
    """create_graph=True still gives the first-order gradients, bitwise those of a plain backward;
    neither warns (the plain one builds no graph around the _bwd op)."""
    ins, kw = _fp64_inputs(op)
    g = randn((1, 2, 3, 3), torch.float64, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_op(op, *ins[:3], **kw)
        plain = torch.autograd.grad(out, ins, g, retain_graph=True)
        recorded = torch.autograd.grad(out, ins, g, create_graph=True)
    for a, b in zip(plain, recorded):
        assert not a.requires_grad and b.requires_grad
        assert torch.equal(a, b.detach())



@pytest.mark.parametrize("op", OPS)
def test_create_graph_runs_the_reference_only_for_a_second_order(op, monkeypatch):
    """create_graph=True alone costs no reference computation (softmax's is Nq x Nk scores); the reference runs
    once a backward differentiates the gradients, once per op backward."""
    name = {"linear": "linear_attention", "softmax": "softmax_attention"}[op]
    calls, ref = [], getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *a, **kw: calls.append(name) or ref(*a, **kw))
    ins, kw = _fp64_inputs(op)
    (dq,) = torch.autograd.grad(run_op(op, *ins[:3], **kw).sum(), ins[0], create_graph=True)
    assert dq.requires_grad and not calls
    torch.autograd.grad((dq ** 2).sum(), ins[1])
    assert calls == [name]

# ---- autocast ---------------------------------------------------------------------------------------------

def _autocast_inputs(op):
    """q from an nn.Linear (so autocast makes it low precision), fp32 leaves k, v (and k_norm)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = randn((1, 2, 5, 8), torch.float32, seed=1)
    k, v = leaf(randn((1, 2, 6, 8), torch.float32, seed=2)), leaf(randn((1, 2, 6, 4), torch.float32, seed=3))
    kw = dict(k_norm=leaf(randn(k.shape, torch.float32, seed=4))) if op == "linear" else {}
    return lin, x, [k, v] + list(kw.values()), kw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", OPS)
def test_autocast_cpu(op, dtype):
    """As SDPA under autocast: q (autocast dtype) with fp32 k, v runs in the autocast dtype, the
    same as on inputs cast by hand, and gradients reach the fp32 leaves in fp32."""
    lin, x, leaves, kw = _autocast_inputs(op)
    with torch.autocast("cpu", dtype):
        q = lin(x)
        out = run_op(op, q, *leaves[:2], **kw)
    assert q.dtype == dtype and out.dtype == dtype
    cast = [leaf(t.detach().to(dtype)) for t in [q] + leaves]
    by_hand = run_op(op, *cast[:3], **dict(zip(kw, cast[3:])))
    assert torch.equal(out, by_hand)
    ref_fn = reference.linear_attention if op == "linear" else reference.softmax_attention
    ref = ref_fn(*[t.detach().double() for t in cast[:3]], **{n: t.detach().double() for n, t in zip(kw, cast[3:])})
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)

    g = randn(out.shape, dtype, seed=5)
    out.backward(g)
    by_hand.backward(g)
    for t, c in zip(leaves, cast[1:]):
        assert t.grad.dtype == torch.float32
        assert torch.equal(t.grad, c.grad.float())
    assert lin.weight.grad.dtype == torch.float32 and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("op", OPS)
def test_autocast_leaves_fp64_and_disabled(op):
    """SDPA's autocast rule leaves fp64 alone; autocast(enabled=False) changes nothing."""
    q, k, v = make_qkv(1, 2, 3, 4, 8, 4, torch.float64)
    with torch.autocast("cpu", torch.bfloat16):
        assert run_op(op, q, k, v).dtype == torch.float64
    q, k, v = make_qkv(1, 2, 3, 4, 8, 4, torch.float32)
    with torch.autocast("cpu", torch.bfloat16, enabled=False):
        assert torch.equal(run_op(op, q, k, v), run_op(op, q, k, v))
        assert run_op(op, q, k, v).dtype == torch.float32


def test_autocast_fp64_mixed_with_fp32_names_what_was_passed():
    """fp64 q with fp32 k, v under autocast: autocast would leave q and cast k, v to bf16, so the plain dtype check
    would report a bf16 k the caller never passed; the error names the dtypes given instead."""
    q, k, v = make_qkv(1, 2, 3, 4, 8, 4, torch.float32)
    for op in OPS:
        with torch.autocast("cpu", torch.bfloat16), pytest.raises(
                ValueError, match=r"float64 inputs stay float64 .* got torch.float64, torch.float32, torch.float32"):
            run_op(op, q.double(), k, v)
    with torch.autocast("cpu", torch.bfloat16), pytest.raises(ValueError, match=r"cannot be mixed"):
        sola_ops.silu_mul(q.double(), q)


# ---- opcheck ---------------------------------------------------------------------------------------------------

def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", ["plain", "norms", "k_norm_identity", "unnormalized", "strided_fp64", "interleaved"])
def test_opcheck_linear(case):
    ops = torch.ops.sola_ops
    dtype = torch.float64 if case == "strided_fp64" else torch.float32
    fm = {"k_norm_identity": "identity", "norms": "relu"}.get(case, "elu")
    q, k, v = make_qkv(2, 2, 5, 7, 4, 3, dtype, seed=1, positive=case == "k_norm_identity")
    if case == "strided_fp64":
        q, k = strided_like(q, "transposed"), strided_like(k, "slice")
    qn = randn(q.shape, dtype, seed=2) if case == "norms" else None
    kn = randn(k.shape, dtype, seed=3, positive=True) if case in ("norms", "k_norm_identity") else None
    if case == "interleaved":  # outputs and gradients in the inputs' (B, N, H, D) layout, q_norm / k_norm too
        q, k, v, qn, kn = (t.detach().transpose(1, 2) for t in randn((2, 5, 5, 2, 4), dtype, seed=5).unbind(2))
    normalize = case != "unnormalized"
    fwd_args = [leaf(t) if t is not None else None for t in (q, k, v, qn, kn)] + [fm, normalize, 1e-6]
    _opcheck(ops.linear_attention_fwd.default, tuple(fwd_args))
    out, state, z = ops.linear_attention_fwd(q, k, v, qn, kn, fm, normalize, 1e-6)
    g = randn(out.shape, dtype, seed=4)
    _opcheck(ops.linear_attention_bwd.default, (g, q, k, v, qn, kn, state, z, fm, normalize, 1e-6))


@pytest.mark.parametrize("case", ["plain", "scale0", "strided_fp64", "bf16", "interleaved"])
def test_opcheck_softmax(case):
    ops = torch.ops.sola_ops
    dtype = {"strided_fp64": torch.float64, "bf16": torch.bfloat16}.get(case, torch.float32)
    q, k, v = make_qkv(2, 2, 5, 7, 4, 3, dtype, seed=1)
    if case == "interleaved":  # outputs and gradients in the inputs' (B, N, H, D) layout
        q, k, v = (t.transpose(1, 2) for t in randn((2, 5, 3, 2, 4), dtype, seed=5).unbind(2))
    if case == "strided_fp64":
        q, v = strided_like(q, "transposed"), strided_like(v, "lastdim")
    scale = 0.0 if case == "scale0" else 0.6
    _opcheck(ops.softmax_attention_fwd.default, (leaf(q), leaf(k), leaf(v), scale))
    out, lse = ops.softmax_attention_fwd(q, k, v, scale)
    g = randn(out.shape, dtype, seed=4)
    _opcheck(ops.softmax_attention_bwd.default, (g, q, k, v, out, lse, scale))


# ---- torch.compile(fullgraph=True) ------------------------------------------------------------------------------

def _grads_vs_reference(out, ins, ref_out, ref_ins, g, tol):
    torch.testing.assert_close(out.double(), ref_out, **tol)
    ours = torch.autograd.grad(out, ins, g)
    theirs = torch.autograd.grad(ref_out, ref_ins, g.double())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.slow
def test_compile_linear(fresh_dynamo):
    """fullgraph compile of the SDPA-layout path, forward + backward, against the fp64 reference."""
    B, N, H, D = 2, 37, 2, 8

    def fn(x, kn):
        q, k, v = (t.transpose(1, 2) for t in x.view(B, N, 3, H, D).unbind(2))
        return sola_ops.linear_attention(q, k, v, feature_map="relu", k_norm=kn) * 2.0

    x = leaf(randn((B, N, 3 * H * D), torch.float32, seed=1))
    kn = leaf(randn((B, H, N, D), torch.float32, seed=2))
    out = torch.compile(fn, fullgraph=True)(x, kn)
    x64, kn64 = leaf(x.detach().double()), leaf(kn.detach().double())
    q, k, v = (t.transpose(1, 2) for t in x64.view(B, N, 3, H, D).unbind(2))
    ref = reference.linear_attention(q, k, v, feature_map="relu", k_norm=kn64) * 2.0
    _grads_vs_reference(out, (x, kn), ref, (x64, kn64), randn(out.shape, torch.float32, seed=3),
                        dict(rtol=1e-4, atol=1e-5))


@pytest.mark.slow
def test_compile_softmax(fresh_dynamo):
    """fullgraph compile with return_lse and a dynamic size; bad input is still caught while tracing."""
    def fn(q, k, v):
        return sola_ops.softmax_attention(q, k, v, scale=0.3, return_lse=True)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for Nq, Nk in ((9, 13), (17, 5)):
        q, k, v = make_qkv(1, 2, Nq, Nk, 8, 6, torch.float32, seed=Nq, requires_grad=True)
        out, lse = compiled(q, k, v)
        i64 = [leaf(t.detach().double()) for t in (q, k, v)]
        ref, ref_lse = reference.softmax_attention(*i64, scale=0.3, return_lse=True)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
        _grads_vs_reference(out, (q, k, v), ref, i64, randn(out.shape, torch.float32, seed=3),
                            dict(rtol=1e-4, atol=1e-5))
    q, k, v = make_qkv(1, 2, 9, 13, 8, 6, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match=r"k must have the head dim of q"):
        compiled(q, k[..., :7].contiguous(), v)


@pytest.mark.slow
def test_compile_symbolic_numbers(fresh_dynamo):
    """fullgraph with dynamic shapes traces the argument checks on symbolic numbers: the default scale
    1/sqrt(D) of a dynamic head dim, and eps / scale given as floats that change between calls."""
    def smx(q, k, v, scale=None):
        return sola_ops.softmax_attention(q, k, v, scale=scale)

    def lin(q, k, v, eps):
        return sola_ops.linear_attention(q, k, v, eps=eps)

    smx_c, lin_c = (torch.compile(f, fullgraph=True, dynamic=True) for f in (smx, lin))
    for D, x in ((8, 1e-6), (12, 1e-3), (16, 0.25)):
        q, k, v = make_qkv(1, 2, 5, 7, D, D, torch.float32, seed=D)
        torch.testing.assert_close(smx_c(q, k, v), smx(q, k, v))
        torch.testing.assert_close(smx_c(q, k, v, x), smx(q, k, v, x))
        torch.testing.assert_close(lin_c(q, k, v, x), lin(q, k, v, x))
    with pytest.raises((ValueError, RuntimeError), match=r"eps must be finite"):
        lin_c(q, k, v, float("nan"))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_compile_autocast(op, fresh_dynamo):
    """fullgraph compile under autocast casts like eager (as SDPA's does); leaving autocast recompiles."""
    lin, x, leaves, kw = _autocast_inputs(op)

    def fn(x, *leaves):
        return run_op(op, lin(x), *leaves[:2], **dict(zip(kw, leaves[2:])))

    compiled = torch.compile(fn, fullgraph=True)
    with torch.autocast("cpu", torch.bfloat16):
        out, eager = compiled(x, *leaves), fn(x, *leaves)
    assert out.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    ours = torch.autograd.grad(out.float().sum(), leaves)
    theirs = torch.autograd.grad(eager.float().sum(), leaves)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert compiled(x, *leaves).dtype == torch.float32


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocks_walk_several_work_items(dtype, monkeypatch):
    """SOLA_MAX_GRID=3 caps every grid, so each block walks several work items of its grid-stride
    loop, as blocks do on grids past 65535 (e.g. B * H = 1024 at N = 4096), which no other test
    reaches: the forward's K / V rings and the backward's pipelines restart per item; at head dim 32 the
    linear backward's QueryGrad folds dS, dz for several heads in turn (fp32 dk was 2e-3 off there)."""
    monkeypatch.setenv("SOLA_MAX_GRID", "3")
    q, k, v = make_qkv(2, 3, 130, 333, 64, 64, dtype, "cuda", seed=11)
    check_softmax(q, k, v)
    check_linear(q, k, v)
    check_linear(*make_qkv(2, 3, 130, 333, 32, 32, dtype, "cuda", seed=15))
    x = randn((2, 9, 7, 40), dtype, "cuda", seed=12)
    w, b = randn((40, 1, 3, 3), dtype, "cuda", seed=13), randn((40,), dtype, "cuda", seed=14)
    torch.testing.assert_close(sola_ops.depthwise_conv3x3(x, w, b, residual=True).double(),
                               reference.depthwise_conv3x3(x.double(), w.double(), b.double(), residual=True),
                               rtol=2e-2, atol=2e-2)


def test_flop_counter_counts_the_ops():
    """FlopCounterMode counts the ops with sola_ops alone imported (a fresh interpreter: the formulas are
    registered by sola_ops itself) as it counts the same math in PyTorch: softmax attention's forward as
    two matmuls and its backward as SDPA's, a depthwise conv2d, linear attention's einsum form (forward:
    its three matmuls; backward twice that)."""
    script = """
import sys, torch, sola_ops
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count
assert "sola_vision" not in sys.modules

def count(fn, *inputs, backward=False):
    inputs = [t.detach().requires_grad_(backward) for t in inputs]
    with FlopCounterMode(display=False) as counter:
        out = fn(*inputs)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()

q, k, v = (torch.randn(2, 3, n, 16) for n in (7, 9, 9))
sm = count(lambda q, k, v: (q @ k.mT).softmax(-1) @ v, q, k, v)
assert count(sola_ops.softmax_attention, q, k, v) == sm > 0
assert count(sola_ops.softmax_attention, q, k, v, backward=True) == sm + sdpa_backward_flop_count(
    q.shape, q.shape, k.shape, v.shape)
lin = count(lambda q, k, v: (q @ (k.mT @ v)) / (q @ k.sum(2, keepdim=True).mT), q, k, v)
assert count(sola_ops.linear_attention, q, k, v) == lin > 0
assert count(sola_ops.linear_attention, q, k, v, backward=True) == 3 * lin
x, weight = torch.randn(2, 5, 6, 8), torch.randn(8, 1, 3, 3)
conv = count(lambda x, w: torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), w, padding=1, groups=8), x, weight)
assert count(sola_ops.depthwise_conv3x3, x, weight) == conv > 0
assert count(sola_ops.depthwise_conv3x3, x, weight, backward=True) == 3 * conv
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_flags_and_numbers_refuse_strings():
    """A flag takes True / False (bool() would read "no" as True), a number refuses a string float() parses."""
    q = k = v = torch.randn(1, 2, 5, 8)
    x, weight = torch.randn(1, 4, 4, 8), torch.randn(8, 1, 3, 3)
    cos = sin = torch.randn(5, 4)
    calls = [
        ("normalize", lambda: sola_ops.linear_attention(q, k, v, normalize="False")),
        ("return_lse", lambda: sola_ops.softmax_attention(q, k, v, return_lse="no")),
        ("return_features", lambda: sola_ops.rope(q, cos, sin, return_features=None)),
        ("residual", lambda: sola_ops.depthwise_conv3x3(x, weight, residual="no")),
        ("residual", lambda: sola_ops.depthwise_conv3x3_layer_norm(x, weight, residual=2)),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            call()
    for call in (lambda: sola_ops.linear_attention(q, k, v, eps="0.1"),
                 lambda: sola_ops.softmax_attention(q, k, v, scale="2"),
                 lambda: sola_ops.layer_norm(x, eps=b"1e-5")):
        with pytest.raises(TypeError, match="must be a real number, got (str|bytes)"):
            call()
    # the ints 0 and 1 and numpy's bools are flags too
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(sola_ops.depthwise_conv3x3(x, weight, residual=1),
                               sola_ops.depthwise_conv3x3(x, weight, residual=np.bool_(True)))
    assert sola_ops.softmax_attention(q, k, v, return_lse=0).shape == q.shape


# ---- calls that record no graph -------------------------------------------------------------------------------

def _entered_torch_library_autograd(fn):
    """Whether fn() ran torch.library's Python autograd wrapper (torch/_library/autograd.py)."""
    seen = []
    sys.setprofile(lambda frame, event, arg: seen.append(frame.f_code.co_filename) if event == "call" else None)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, any(f.endswith(os.path.join("_library", "autograd.py")) for f in seen)


def test_calls_without_a_graph_run_below_autograd():
    """With nothing to record (no_grad, inference_mode, or no input requiring grad) the public functions call
    the op below autograd, skipping torch.library's Python wrapper; with an input requiring grad the op's
    eager twin (sola_ops._ops.call) records it, skipping that wrapper too."""
    q, k, v = make_qkv(1, 2, 5, 5, 4, 4, torch.float32, seed=3)
    q.requires_grad_()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out, entered = _entered_torch_library_autograd(lambda: sola_ops.softmax_attention(q, k, v))
        assert not entered and out.grad_fn is None and not out.requires_grad
    out, entered = _entered_torch_library_autograd(lambda: sola_ops.linear_attention(q.detach(), k, v))
    assert not entered and not out.requires_grad
    out, entered = _entered_torch_library_autograd(lambda: sola_ops.softmax_attention(q, k, v))
    assert not entered and out.requires_grad and type(out.grad_fn).__name__ == "sola_ops_softmax_attention_fwdBackward"
    torch.testing.assert_close(torch.autograd.grad(out.sum(), q)[0],
                               torch.autograd.grad(reference.softmax_attention(q, k, v).sum(), q)[0])
