"""Random cases of linear attention (with and without RoPE), softmax attention, the depthwise conv and the
row-wise ops (layer_norm, bias_gelu, silu_mul) against the fp64 reference (the FlashAttention rule,
conftest.py): sizes, head dims up to 256, dtypes, options and memory layouts drawn from a seeded generator,
so shapes nobody picked join the fixed cases of the test_ops_*.py files. Every draw depends on the case
number alone: `pytest tests/test_fuzz.py -k "softmax and case7-"` reruns case 7. On a GPU the same cases
run the CUDA kernels (scripts/gpu_check.sh) with 4x longer sequences; the emulator drivers' `fuzz` modes
draw the same way for the kernels' sources on the CPU (scripts/cuda_emulator/README.md)."""
import math
import os
import random

import pytest
import torch

from conftest import DEVICES, ROWS_VIEW_KINDS, check_linear, check_softmax, randn, rows_view, strided_like
from test_ops_bias_gelu import check_bias_gelu
from test_ops_dwconv import check_dwconv, params
from test_ops_layer_norm import check_layer_norm
from test_ops_linear_rope import check_rope_linear, tables
from test_ops_silu_mul import check_silu_mul

CASES = int(os.environ.get("SOLA_FUZZ_CASES", "24"))  # more for a longer search: SOLA_FUZZ_CASES=500 pytest ...
LAYOUTS = ["contiguous", "contiguous", "transposed", "slice", "lastdim"]
DTYPES = [torch.float16, torch.bfloat16, torch.bfloat16, torch.float32, torch.float64]  # bf16: the models' dtype


def draw_length(rng, hi):
    """A sequence length in [1, hi], log-uniform: edge-of-tile lengths as often as long ones."""
    return min(hi, int(math.exp(rng.uniform(0, math.log(hi + 1)))))


def draw_head_dim(rng):
    """Up to 256: mostly the kernels' fast buckets (32, 64, 128), then anything."""
    u = rng.random()
    if u < 0.45:
        return 32 << rng.randint(0, 2)
    if u < 0.85:
        return rng.randint(1, 128)
    return rng.randint(129, 256)


def draw_common(rng, device):
    """dtype, B, H, Nq, Nk, Dk, Dv: at most ~4k query and key rows in all, fewer on the CPU."""
    dtype = rng.choice(DTYPES)
    B, H = rng.randint(1, 3), rng.randint(1, 4)
    n_max = max(8, (4096 if device == "cuda" else 1024) // (B * H))
    return dtype, B, H, draw_length(rng, n_max), draw_length(rng, n_max), draw_head_dim(rng), draw_head_dim(rng)


def laid_out(rng, x, seed):
    return strided_like(x, rng.choice(LAYOUTS), seed=seed)


def draw_qkv(rng, seed, device, dtype, B, H, Nq, Nk, Dk, Dv, positive=False, scale=1.0):
    """q, k, v of normal (or |normal| + 0.1: positive) values in drawn layouts."""
    q = laid_out(rng, randn((B, H, Nq, Dk), dtype, device, seed, positive, scale), 10)
    k = laid_out(rng, randn((B, H, Nk, Dk), dtype, device, seed + 1, positive, scale), 11)
    v = laid_out(rng, randn((B, H, Nk, Dv), dtype, device, seed + 2), 12)
    return q, k, v


def relu_fp16_eps(feature_map, dtype, eps):
    """eps, or 0.1 for relu in fp16: at a row of q <= 0 the fp16 baseline's gradient, num / den^2 with den = eps,
    is 0 / 0 once eps^2 underflows (the kernels compute in fp32), and the tolerance rule needs that baseline."""
    return 0.1 if feature_map == "relu" and dtype == torch.float16 else eps


# case i draws from random.Random(base + i) alone; ids "case7-" so that -k "case7-" does not also pick case 17
random_cases = pytest.mark.parametrize("case", range(CASES), ids=lambda i: f"case{i}-")


@pytest.mark.parametrize("device", DEVICES)
@random_cases
def test_linear_attention_random(device, case):
    rng = random.Random(1000 + case)
    dtype, B, H, Nq, Nk, Dk, Dv = draw_common(rng, device)
    feature_map = rng.choice(["elu", "relu", "identity"])
    normalize = rng.random() < 0.8
    # identity with the normaliser divides by phi(q) . z, which crosses 0 for signed inputs: positive ones
    positive = feature_map == "identity" and normalize
    q, k, v = draw_qkv(rng, case, device, dtype, B, H, Nq, Nk, Dk, Dv, positive)
    norms = {}
    if normalize and rng.random() < 0.3:
        norms["q_norm"] = laid_out(rng, randn((B, H, Nq, Dk), dtype, device, case + 3, positive), 13)
    if normalize and rng.random() < 0.3:
        norms["k_norm"] = laid_out(rng, randn((B, H, Nk, Dk), dtype, device, case + 4, positive), 14)
    # eps = 0 only with elu + 1 (den > 0): a relu row of q <= 0 would make 0 / 0, NaN in the reference too
    eps = rng.choice([1e-6, 1e-6, 0.0, 0.1] if feature_map == "elu" else [1e-6, 0.1])
    eps = relu_fp16_eps(feature_map, dtype, eps)
    check_linear(q, k, v, feature_map=feature_map, normalize=normalize, eps=eps, **norms)


@pytest.mark.parametrize("device", DEVICES)
@random_cases
def test_linear_attention_rope_random(device, case):
    """RoPE inside the op (SoLA-Vision's call): on CUDA the fused tensor-core kernels (fp16 / bf16, Dk, Dv <= 128)."""
    rng = random.Random(4000 + case)
    dtype, B, H, N, _, Dk, Dv = draw_common(rng, device)
    Dk += Dk % 2  # channel pairs rotate
    feature_map = rng.choice(["elu", "relu", "identity"])
    normalize = feature_map != "identity" and rng.random() < 0.85
    q, k, v = draw_qkv(rng, case, device, dtype, B, H, N, N, Dk, Dv)
    check_rope_linear(q, k, v, *tables(N, Dk, device, seed=case), feature_map, normalize=normalize,
                      eps=relu_fp16_eps(feature_map, dtype, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
@random_cases
def test_softmax_attention_random(device, case):
    rng = random.Random(2000 + case)
    dtype, B, H, Nq, Nk, Dk, Dv = draw_common(rng, device)
    # One key: P = 1, so dq and dk are exactly 0 by cancellation (dS = dP - delta). PyTorch's fp32 softmax
    # backward cancels exactly (it subtracts dP from itself); the kernels' delta = rowsum(dO * O), as
    # FlashAttention's, leaves fp32 rounding noise (~1e-5 at Dv 128), over the rule's floor of 1e-5 for a
    # zero reference. Not a case the rule can judge: two keys at fp32.
    Nk = 2 if dtype == torch.float32 and Nk == 1 else Nk
    u = rng.random()
    scale = None if u < 0.4 else 0.0 if u < 0.5 else rng.uniform(-1.5, 1.5) / math.sqrt(Dk)
    q, k, v = draw_qkv(rng, case, device, dtype, B, H, Nq, Nk, Dk, Dv, scale=2.0)
    check_softmax(q, k, v, scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@random_cases
def test_dwconv_random(device, case):
    rng = random.Random(3000 + case)
    dtype = rng.choice(DTYPES)
    B, H, W = rng.randint(1, 3), draw_length(rng, 40), draw_length(rng, 40)
    C = 8 * rng.randint(1, 40) if rng.random() < 0.6 else rng.randint(1, 300)
    stride = rng.choice([1, 2])
    residual = stride == 1 and rng.random() < 0.3
    activation = None if residual else rng.choice([None, "silu", "relu"])
    input_activation = None if residual or rng.random() < 0.7 else "relu"
    x = laid_out(rng, randn((B, H, W, C), dtype, device, case), 10)
    # 16-bit x with fp32 parameters too (autocast's case); an fp32 weight's gradient is fp32, so not with fp64 x
    w_dtype = rng.choice([dtype, torch.float32]) if dtype in (torch.float16, torch.bfloat16) else dtype
    weight, bias = params(C, device, w_dtype, bias=rng.random() < 0.7,
                          shape4=rng.random() < 0.5, seed=case + 1)
    check_dwconv(x, weight, bias, residual=residual, activation=activation, stride=stride,
                 input_activation=input_activation)


def rows_laid_out(rng, shape, dtype, device, seed):
    """A random (B, N, C) tensor, contiguous or in a drawn layout of conftest.rows_view."""
    kind = rng.choice(["contiguous"] * 3 + ROWS_VIEW_KINDS)
    if kind == "contiguous":
        return randn(shape, dtype, device, seed)
    return rows_view(kind, shape, dtype, device, seed)


@pytest.mark.parametrize("device", DEVICES)
@random_cases
def test_row_ops_random(device, case):
    """layer_norm (weight / bias given or not, in x's dtype or fp32), bias_gelu (exact or tanh), silu_mul."""
    rng = random.Random(5000 + case)
    dtype = rng.choice(DTYPES)
    B, N = rng.randint(1, 3), draw_length(rng, 300 if device == "cuda" else 60)
    C = 8 * rng.randint(1, 128) if rng.random() < 0.6 else rng.randint(1, 1100)
    x = rows_laid_out(rng, (B, N, C), dtype, device, case)
    p_dtype = dtype if dtype == torch.float64 else rng.choice([dtype, torch.float32])
    weight = randn((C,), p_dtype, device, case + 1) + 1 if rng.random() < 0.8 else None
    bias = randn((C,), p_dtype, device, case + 2) if rng.random() < 0.8 else None
    check_layer_norm(x, weight, bias, eps=rng.choice([1e-5, 1e-6, 0.1]))
    check_bias_gelu(x, bias, rng.choice(["none", "tanh"]))
    check_silu_mul(x, rows_laid_out(rng, (B, N, C), dtype, device, case + 3))
