"""The "sola" token mixer as one autograd node: out = attention(q, k, v) + LePE(v), with (q, k) = qk(v).

The mixer input v has three consumers: the qk linear layer, the attention (as its values) and LePE.
As separate autograd nodes their three gradients of v would be summed by autograd in two passes of
their own (each reads two tensors and writes one), and q's and k's gradients stacked into the
linear's layout by unbind's backward (a third pass). Here the backward writes v's gradient once:
the attention's dv is the addend of LePE's input gradient (depthwise_conv3x3_bwd's dx_addend), and
the linear's input gradients are GEMMs accumulated onto that sum (addmm_), one for q's gradient and
one for k's, each read where the attention's backward wrote it.
"""
import math
from functools import partial

import torch
import torch.nn.functional as F
from sola_ops._flops import register
from sola_ops import reference
from sola_ops._ops import ops, run_bwd, with_reference_derivative, without_graph
from torch.utils.flop_counter import flop_registry


# The backward accumulates its GEMMs in place (addmm_), which torch's registry leaves uncounted; addmm's
# formula (already shape-wrapped) counts it.
register(torch.ops.aten.addmm_, flop_registry[torch.ops.aten.addmm], get_raw=True)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, W, C) or (B, N, C) tokens as (B, heads, N, C / heads): a view, heads-interleaved in memory."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), heads, t.shape[-1] // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, D) back to like's (B, H, W, C) shape (a view for the layout the ops write)."""
    return t.transpose(1, 2).reshape(like.shape)


class AttentionNode(torch.autograd.Function):
    """(x, qk_weight, qk_bias, lepe_weight, lepe_bias) -> attention(q, k, x) + LePE(x), x (B, H, W, C) in
    the compute dtype, qk_weight / qk_bias in it too (the caller casts them as autocast would).

    mixer "L": linear attention with the elu + 1 feature map and RoPE (cos, sin) inside the kernels
    (sola_ops.linear_attention(q, k, v, feature_map="elu", eps=eps, rope=(cos, sin))). "S": softmax
    attention of RoPE-rotated q, k (sola_ops.rope over q and k in one kernel, scale 1/sqrt(head_dim))."""

    @staticmethod
    def forward(ctx, x, qk_weight, qk_bias, lepe_weight, lepe_bias, mixer, heads, cos, sin, eps):
        qk = split_heads(F.linear(x, qk_weight, qk_bias), 2 * heads)  # (B, 2 heads, N, D): q's heads, then k's
        q, k = qk.chunk(2, dim=1)
        v = split_heads(x, heads)
        ctx.mixer, ctx.heads, ctx.eps, ctx.scale = mixer, heads, eps, 1.0 / math.sqrt(q.shape[-1])
        if mixer == "L":
            out, state, z = without_graph(ops.linear_attention_fwd, q, k, v, None, None, "elu", True, eps, cos, sin)
            saved = (q, k, state, z)
        else:
            rot, _ = without_graph(ops.rope_fwd, qk, cos, sin, "identity", False)
            q_rot, k_rot = rot.chunk(2, dim=1)
            out, lse = without_graph(ops.softmax_attention_fwd, q_rot, k_rot, v, ctx.scale)
            saved = (q, k, q_rot, k_rot, out, lse)
        result = without_graph(ops.depthwise_conv3x3_fwd, x, lepe_weight, lepe_bias, False, "none", 1, "none",
                               merge_heads(out, x))
        ctx.save_for_backward(x, qk_weight, qk_bias, lepe_weight, lepe_bias, cos, sin, *saved)
        return result

    @staticmethod
    def backward(ctx, grad):
        x, qk_weight, qk_bias, lepe_weight, lepe_bias, cos, sin, *saved = ctx.saved_tensors
        # One first-order-only node over the whole backward, whose inputs are all that the gradients depend
        # on: under torch.func a second-order gradient through any of them (the weights too) raises, none comes
        # out partial; elsewhere the reference's derivative replaces it.
        grads = run_bwd("", partial(node_grads, ctx, cos, sin, saved), grad, x, qk_weight, qk_bias, lepe_weight,
                        lepe_bias, name="the SoLA-Vision token mixer's autograd node (sola_vision.attention_node)",
                        advice="build the model with attn_impl='torch'")
        # A double backward (create_graph=True) differentiates the node's computation in reference ops.
        grads = with_reference_derivative(list(grads), partial(node_reference, ctx, cos, sin),
                                          (x, qk_weight, qk_bias, lepe_weight, lepe_bias), (grad,),
                                          ctx.needs_input_grad)
        return (*grads, None, None, None, None, None)


def node_reference(ctx, cos, sin, x, qk_weight, qk_bias, lepe_weight, lepe_bias):
    """The node's forward in sola_ops.reference ops (differentiable to any order)."""
    qk = split_heads(F.linear(x, qk_weight, qk_bias), 2 * ctx.heads)
    q, k = qk.chunk(2, dim=1)
    v = split_heads(x, ctx.heads)
    if ctx.mixer == "L":
        out = reference.linear_attention(q, k, v, feature_map="elu", eps=ctx.eps, rope=(cos, sin))
    else:
        q_rot, k_rot = reference.rope(qk, cos, sin).chunk(2, dim=1)
        out = reference.softmax_attention(q_rot, k_rot, v, scale=ctx.scale)
    return reference.depthwise_conv3x3(x, lepe_weight, lepe_bias, addend=merge_heads(out, x))


def node_grads(ctx, cos, sin, saved, grad, x, qk_weight, qk_bias, lepe_weight, lepe_bias):
    """The gradients of x, qk_weight, qk_bias, lepe_weight and lepe_bias (None where not wanted)."""
    need = ctx.needs_input_grad
    dq = dk = dv = None
    if any(need[:3]):  # the attention output's gradient is the sum's
        dq, dk, dv = attention_grads(ctx, split_heads(grad, ctx.heads), split_heads(x, ctx.heads), cos, sin, saved)
    dx = dlepe_weight = dlepe_bias = None
    with_lepe_bias = lepe_bias is not None and need[4]
    if need[0] or need[3] or with_lepe_bias:  # LePE's input gradient written with dv added
        dx, dlepe_weight, dlepe_bias = ops.depthwise_conv3x3_bwd(grad, x, lepe_weight, False, with_lepe_bias, None,
                                                                 "none", 1, None, "none",
                                                                 None if dv is None or not need[0] else
                                                                 merge_heads(dv, x))
    dqk_weight = dqk_bias = None
    if dq is not None:
        C = x.shape[-1]
        x2d, dq2d, dk2d = x.reshape(-1, C), dq.transpose(1, 2).reshape(-1, C), dk.transpose(1, 2).reshape(-1, C)
        if need[0]:  # x's gradient from the qk linear, accumulated where the sum above was written
            dx.view(-1, C).addmm_(dq2d, qk_weight[:C]).addmm_(dk2d, qk_weight[C:])
        if need[1]:
            dqk_weight = torch.cat((dq2d.t() @ x2d, dk2d.t() @ x2d))
        if need[2] and qk_bias is not None:
            dqk_bias = torch.cat((dq2d.sum(0), dk2d.sum(0)))
    return (dx if need[0] else None, dqk_weight, dqk_bias, dlepe_weight if need[3] else None,
            dlepe_bias.to(lepe_bias.dtype) if with_lepe_bias else None)


def attention_grads(ctx, grad_out, v, cos, sin, saved):
    """(dq, dk, dv) of the attention, each (B, heads, N, head_dim) in the layout of its input."""
    if ctx.mixer == "L":
        q, k, state, z = saved
        dq, dk, dv, _, _ = ops.linear_attention_bwd(grad_out, q, k, v, None, None, state, z, "elu", True, ctx.eps, cos,
                                                    sin)
        return dq, dk, dv
    q, k, q_rot, k_rot, out, lse = saved
    dq_rot, dk_rot, dv = ops.softmax_attention_bwd(grad_out, q_rot, k_rot, v, out, lse, ctx.scale, None)
    return (ops.rope_bwd(dq_rot, None, q, cos, sin, "identity"), ops.rope_bwd(dk_rot, None, k, cos, sin, "identity"),
            dv)
