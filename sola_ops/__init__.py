"""sola_ops: CUDA and C++ kernels for non-causal linear attention and flash-style softmax attention.

    out = sola_ops.linear_attention(q, k, v)            # q, k, v: (B, H, N, D)
    out = sola_ops.softmax_attention(q, k, v)
    out, lse = sola_ops.softmax_attention(q, k, v, return_lse=True)
"""
import contextlib
import math

from . import reference
from ._ops import FEATURE_MAPS, _C, ops

__all__ = ["linear_attention", "softmax_attention", "reference", "build_info", "debug_nan_fill"]
__version__ = "0.1.0"


def linear_attention(q, k, v, *, feature_map="elu", normalize=True, eps=1e-6, q_norm=None, k_norm=None):
    """Non-causal linear attention in the mean form, with phi the feature map applied in-kernel:

        S = mean_j phi(k_j) v_j^T,  z = mean_j phi(kn_j)   (kn = k_norm if given else k)
        out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps)      (qn = q_norm if given else q)
        normalize=False: out_i = phi(q_i)^T S

    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv) -> (B, H, Nq, Dv). feature_map is
    "elu" (elu(x) + 1), "relu" or "identity". State and sums are fp32 (fp64 for fp64 inputs).
    """
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be 'elu', 'relu' or 'identity', got {feature_map!r}")
    if not normalize and (q_norm is not None or k_norm is not None):
        raise ValueError("q_norm and k_norm are only used with normalize=True")
    out, _, _ = ops.linear_attention_fwd(q, k, v, q_norm, k_norm, feature_map, bool(normalize), float(eps))
    return out


def softmax_attention(q, k, v, *, scale=None, return_lse=False):
    """Non-causal softmax attention, out = softmax(scale * q k^T) v, tiled with an online softmax.

    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv) -> (B, H, Nq, Dv). scale defaults to
    1/sqrt(Dk); 0.0 is a valid scale. With return_lse=True also returns the row log-sum-exp of
    the scaled scores, (B, H, Nq), fp32 (fp64 for fp64 inputs).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() == 4 and q.shape[-1] > 0 else 1.0
    out, lse = ops.softmax_attention_fwd(q, k, v, float(scale))
    return (out, lse) if return_lse else out


def build_info():
    """Which backends were compiled in: {"cpu": True, "cuda": bool, "cuda_archs": [...], ...}."""
    return dict(_C.build_info())


@contextlib.contextmanager
def debug_nan_fill(enabled=True):
    """Pre-fill every kernel output with NaN so an element a kernel forgets to write shows up."""
    before = _C.debug_nan_fill()
    _C.set_debug_nan_fill(enabled)
    try:
        yield
    finally:
        _C.set_debug_nan_fill(before)
