"""Pure-PyTorch references with the public API's signatures: the ground truth for tests and the
"PyTorch composite" baseline in benchmarks. They accumulate in fp32 (fp64 for fp64 inputs) like
the kernels and return the input dtype."""
import math

import torch

FEATURE_MAPS = {
    "elu": lambda x: torch.nn.functional.elu(x) + 1,
    "relu": torch.relu,
    "identity": lambda x: x,
}


def _phi(feature_map):
    """The feature map called feature_map."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be 'elu', 'relu' or 'identity', got {feature_map!r}")
    return FEATURE_MAPS[feature_map]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention(q, k, v, *, feature_map="elu", normalize=True, eps=1e-6, q_norm=None, k_norm=None,
                     rope=None):
    """out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps), S = mean_j phi(k_j) v_j^T, z = mean_j phi(kn_j).
    rope=(cos, sin): phi(q), phi(k) rotated in the numerator, unrotated in the normaliser."""
    phi = _phi(feature_map)
    if not normalize and (q_norm is not None or k_norm is not None):
        raise ValueError("q_norm and k_norm are only used with normalize=True")
    if rope is not None and (q_norm is not None or k_norm is not None):
        raise ValueError("q_norm and k_norm cannot be combined with rope")
    acc = _acc_dtype(q.dtype)
    fq, fk, vv = phi(q.to(acc)), phi(k.to(acc)), v.to(acc)
    rq, rk = (fq, fk) if rope is None else (_rotate(fq, *rope), _rotate(fk, *rope))
    state = torch.einsum("bhnd,bhne->bhde", rk, vv) / k.shape[2]
    out = torch.einsum("bhnd,bhde->bhne", rq, state)
    if normalize:
        fqn = fq if q_norm is None else phi(q_norm.to(acc))
        fkn = fk if k_norm is None else phi(k_norm.to(acc))
        z = fkn.mean(dim=2)
        out = out / (torch.einsum("bhnd,bhd->bhn", fqn, z) + eps).unsqueeze(-1)
    return out.to(q.dtype)


def softmax_attention(q, k, v, *, scale=None, return_lse=False):
    """out = softmax(scale * q k^T) v; with return_lse also the row log-sum-exp (fp32, fp64 for fp64)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    acc = _acc_dtype(q.dtype)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(acc), k.to(acc)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", torch.softmax(scores, dim=-1), v.to(acc)).to(q.dtype)
    return (out, lse) if return_lse else out


def rope(x, cos, sin, *, feature_map="identity", return_features=False):
    """rot = phi(x) with channel pairs (2p, 2p+1) rotated by the angles behind cos, sin (N, D / 2)."""
    acc = _acc_dtype(x.dtype)
    f = _phi(feature_map)(x.to(acc))
    rot = _rotate(f, cos, sin).to(x.dtype)
    return (rot, f.to(x.dtype)) if return_features else rot


def _rotate(f, cos, sin):
    """f (..., N, D) with channel pairs (2p, 2p+1) rotated by the angles behind cos, sin (N, D / 2), in f's dtype."""
    c, s = cos.to(f.dtype), sin.to(f.dtype)
    f0, f1 = f[..., 0::2], f[..., 1::2]
    return torch.stack((f0 * c - f1 * s, f0 * s + f1 * c), dim=-1).flatten(-2)


def depthwise_conv3x3(x, weight, bias=None, *, residual=False, activation=None, stride=1, input_activation=None,
                      addend=None):
    """nn.Conv2d(C, C, 3, stride, padding=1, groups=C) on channels-last tokens x (B, H, W, C), in fp32
    (fp64); activation="silu" / "relu": that of it; input_activation="relu": of relu(x); plus addend."""
    acc = _acc_dtype(x.dtype)
    C = x.shape[3]
    xa = x.to(acc)
    if input_activation == "relu":
        if residual:
            raise ValueError("residual and input_activation='relu' cannot be combined")
        xa = torch.relu(xa)
    elif input_activation not in (None, "none"):
        raise ValueError(f"input_activation must be 'none' or 'relu', got {input_activation!r}")
    out = torch.nn.functional.conv2d(xa.permute(0, 3, 1, 2), weight.reshape(C, 1, 3, 3).to(acc),
                                     None if bias is None else bias.to(acc), stride=stride, padding=1,
                                     groups=C).permute(0, 2, 3, 1)
    if activation == "silu":
        out = torch.nn.functional.silu(out)
    elif activation == "relu":
        out = torch.relu(out)
    out = out + xa if residual else out
    return (out if addend is None else out + addend.to(acc)).to(x.dtype)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """F.layer_norm over the last dim in fp32 (fp64 for fp64 x), returned in x's dtype. Written out in mean and
    variance: F.layer_norm's own third derivative is wrong (its double backward holds the statistics constant,
    pytorch/pytorch#175754), and the ops' higher-order gradients are this function's."""
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    centred = xa - xa.mean(dim=-1, keepdim=True)
    # Centred twice (the same function: a projection): a constant row's first residue, the mean's rounding,
    # would otherwise come out as +-1 / sqrt(1 + eps / residue^2), not 0 (or NaN at eps = 0, as F.layer_norm).
    centred = centred - centred.mean(dim=-1, keepdim=True)
    out = centred * torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(x.dtype)


def depthwise_conv3x3_layer_norm(x, conv_weight, conv_bias=None, norm_weight=None, norm_bias=None, *,
                                 residual=False, eps=1e-5):
    """(out, normed): depthwise_conv3x3 of x, then layer_norm of out, as the two references compute them."""
    out = depthwise_conv3x3(x, conv_weight, conv_bias, residual=residual)
    return out, layer_norm(out, norm_weight, norm_bias, eps)


def silu_mul(x, gate):
    """x * F.silu(gate) in fp32 (fp64 for fp64 inputs), returned in x's dtype."""
    acc = _acc_dtype(x.dtype)
    return (x.to(acc) * torch.nn.functional.silu(gate.to(acc))).to(x.dtype)


def bias_gelu(x, bias=None, approximate="none"):
    """F.gelu(x + bias, approximate) in fp32 (fp64 for fp64 x), returned in x's dtype (bias None: F.gelu(x))."""
    acc = _acc_dtype(x.dtype)
    v = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    return torch.nn.functional.gelu(v, approximate=approximate).to(x.dtype)
