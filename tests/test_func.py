"""torch.func over the public ops: grad, vjp, jacrev and per-sample gradients (vmap of grad) against the
fp64 references differentiated by torch.autograd; second order and forward mode raise errors that name the
op; per-sample gradients through a whole SoLA-Vision model agree between attn_impl "sola" and "torch"."""
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import sola_ops
from sola_ops import reference
from conftest import DEVICES, randn

D = torch.float64


def _cases(device):
    """name -> (our op, its reference, differentiable inputs); fp64, awkward small sizes."""
    q, k, v = randn((2, 2, 5, 8), D, device, 1), randn((2, 2, 7, 8), D, device, 2), randn((2, 2, 7, 6), D, device, 3)
    cos, sin = randn((5, 4), D, device, 4), randn((5, 4), D, device, 5)
    x, w, b = randn((2, 5, 6, 4), D, device, 6), randn((4, 1, 3, 3), D, device, 7), randn((4,), D, device, 8)
    nw = randn((4,), D, device, 9)
    return {
        "linear_attention": (sola_ops.linear_attention, reference.linear_attention, (q, k, v)),
        "linear_attention_norm": (
            lambda q, k, v, qn: sola_ops.linear_attention(q, k, v, feature_map="relu", q_norm=qn, k_norm=k * 0.5),
            lambda q, k, v, qn: reference.linear_attention(q, k, v, feature_map="relu", q_norm=qn, k_norm=k * 0.5),
            (q, k, v, q.flip(-1))),
        "linear_attention_rope": (
            lambda q, v: sola_ops.linear_attention(q, q * 0.5, v, rope=(cos, sin)),
            lambda q, v: reference.linear_attention(q, q * 0.5, v, rope=(cos, sin)), (q, q.flip(-1))),
        "softmax_attention": (sola_ops.softmax_attention, reference.softmax_attention, (q, k, v)),
        "softmax_attention_lse": (
            lambda q, k, v: sum(t.sum() for t in sola_ops.softmax_attention(q, k, v, return_lse=True)),
            lambda q, k, v: sum(t.sum() for t in reference.softmax_attention(q, k, v, return_lse=True)), (q, k, v)),
        "rope": (lambda x: sola_ops.rope(x, cos, sin, feature_map="elu"),
                 lambda x: reference.rope(x, cos, sin, feature_map="elu"), (q,)),
        "depthwise_conv3x3": (
            lambda x, w, b: sola_ops.depthwise_conv3x3(x, w, b, activation="silu"),
            lambda x, w, b: reference.depthwise_conv3x3(x, w, b, activation="silu"), (x, w, b)),
        "depthwise_conv3x3_s2": (
            lambda x, w: sola_ops.depthwise_conv3x3(x, w, stride=2, input_activation="relu", addend=x[:, ::2, ::2]),
            lambda x, w: reference.depthwise_conv3x3(x, w, stride=2, input_activation="relu", addend=x[:, ::2, ::2]),
            (x, w)),
        "layer_norm": (sola_ops.layer_norm, reference.layer_norm, (x, nw, b)),
        "depthwise_conv3x3_layer_norm": (
            lambda x, w, b, nw: sum(t.sum() for t in sola_ops.depthwise_conv3x3_layer_norm(x, w, b, nw, residual=True)),
            lambda x, w, b, nw: sum(t.sum()
                                    for t in reference.depthwise_conv3x3_layer_norm(x, w, b, nw, residual=True)),
            (x, w, b, nw)),
        "silu_mul": (sola_ops.silu_mul, reference.silu_mul, (x, x.flip(0))),
        "bias_gelu": (sola_ops.bias_gelu, reference.bias_gelu, (x, b)),
    }


CASES = list(_cases("cpu"))


def _loss(f):
    # Squared, so each gradient depends on the op's output, not only its structure.
    return lambda *a: (f(*a) ** 2).sum()


def _autograd_grads(f, xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    return torch.autograd.grad(_loss(f)(*xs), xs)


def _close(ours, want, what):
    for i, (a, b) in enumerate(zip(ours, want)):
        assert a.shape == b.shape, f"{what}: input {i} gradient shape {tuple(a.shape)} != {tuple(b.shape)}"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}, input {i}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_func_grad_and_vjp_match_the_reference(name, device):
    op, ref, xs = _cases(device)[name]
    argnums = tuple(range(len(xs)))
    want = _autograd_grads(ref, xs)
    _close(torch.func.grad(_loss(op), argnums=argnums)(*xs), want, f"{name} torch.func.grad")
    out, pullback = torch.func.vjp(op, *xs)
    _close(pullback(2 * out), want, f"{name} torch.func.vjp")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [False, True], ids=["all_batched", "first_batched"])
@pytest.mark.parametrize("name", CASES)
def test_per_sample_grads_match_a_loop_over_the_samples(name, shared, device):
    """vmap(grad): each sample's gradients of every input, the samples stacked along a new dim 0. Every input
    batched, or only the first (the others, e.g. weights, the same for every sample, as in DP-SGD)."""
    op, ref, xs = _cases(device)[name]
    batched = [torch.stack((x, 0.5 * x + 0.1, -x)) for x in xs]
    in_dims = (0,) * len(xs)
    if shared:
        batched[1:], in_dims = xs[1:], (0,) + (None,) * (len(xs) - 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = torch.func.vmap(torch.func.grad(_loss(op), argnums=tuple(range(len(xs)))), in_dims=in_dims)(*batched)
    for s in range(3):
        sample = [x if d is None else x[s] for x, d in zip(batched, in_dims)]
        _close([g[s] for g in ours], _autograd_grads(ref, sample), f"{name} sample {s}")
    # No op ran once per sample (torch's fallback warns for each).
    assert not _looped(caught)


def _looped(caught):
    """The sola_ops ops torch's vmap fallback ran (no batching rule), from its warnings."""
    return {m for w in caught for m in re.findall(r"batching rule for sola_ops::(\w+)", str(w.message))}


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_batching_rules_take_any_in_dims(device):
    """Plain vmap (no grad): vmap's dim anywhere, unbatched inputs beside batched ones, a batched RoPE table
    (the per-sample path), empty batches; against a loop over the samples."""
    q, k = randn((2, 3, 2, 5, 8), D, device, 1), randn((3, 2, 2, 7, 8), D, device, 2)
    v = randn((2, 2, 7, 6), D, device, 3)
    x5, cos, sin = randn((3, 2, 2, 5, 8), D, device, 4), randn((3, 5, 4), D, device, 5), randn((5, 4), D, device, 6)
    x, w = randn((2, 5, 6, 4), D, device, 7), randn((4, 1, 3, 3), D, device, 8)
    cases = [  # (op over one sample, inputs, in_dims); 3 samples
        (lambda q, k, v: sola_ops.linear_attention(q, k, v), (q, k, v), (1, 0, None)),
        (lambda q, k, v: sola_ops.softmax_attention(q, k, v, return_lse=True), (q, k, v), (1, 0, None)),
        (lambda x, c: sola_ops.rope(x, c, sin, return_features=True), (x5, cos), (0, 0)),
        (lambda x, c: sola_ops.linear_attention(x, x, x, rope=(c, sin)), (x5, cos), (0, 0)),
        (lambda x, g: sola_ops.silu_mul(x, g), (torch.stack((x, -x, 2 * x)), x.flip(0)), (0, None)),
        (lambda x: sola_ops.layer_norm(x, w[:, 0, 0, 0], None), (torch.stack((x, -x, 2 * x), dim=2),), (2,)),
        (lambda x: sola_ops.bias_gelu(x, w[:, 0, 1, 1]), (torch.stack((x, -x, 2 * x), dim=3),), (3,)),
        (lambda x, a: sola_ops.depthwise_conv3x3(x, w, stride=2, addend=a),
         (torch.stack((x, -x, 2 * x), dim=1), x[:, ::2, ::2]), (1, None)),
        (lambda q, k, v: sola_ops.softmax_attention(q, k, v), (q[:0], k[:, :0], v[:0]), (1, 0, None)),
    ]
    for i, (op, inputs, in_dims) in enumerate(cases):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = torch.func.vmap(op, in_dims=in_dims)(*inputs)
        assert not _looped(caught), f"case {i}: {_looped(caught)} ran once per sample"
        size = next(t.shape[d] for t, d in zip(inputs, in_dims) if d is not None)
        want = [op(*(t if d is None else t.select(d, s) for t, d in zip(inputs, in_dims))) for s in range(size)]
        ours = ours if isinstance(ours, tuple) else (ours,)
        want = [w if isinstance(w, tuple) else (w,) for w in want]
        for j, o in enumerate(ours):
            assert o.shape[0] == size, f"case {i} output {j}: shape {tuple(o.shape)}"
            for s in range(size):
                torch.testing.assert_close(o[s], want[s][j], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"case {i}, {s}: {m}")


def test_jacrev_matches_the_reference():
    _, _, (q, k, v) = _cases("cpu")["linear_attention"]
    q, k, v = q[:1, :1, :3, :4], k[:1, :1, :4, :4], v[:1, :1, :4, :3]
    for op, ref in ((sola_ops.linear_attention, reference.linear_attention),
                    (sola_ops.softmax_attention, reference.softmax_attention)):
        ours = torch.func.jacrev(op, argnums=(0, 1, 2))(q, k, v)
        want = torch.autograd.functional.jacobian(ref, (q, k, v))
        _close(ours, want, f"jacrev of {op.__name__}")


def test_second_order_and_forward_mode_name_the_op():
    _, _, (q, k, v) = _cases("cpu")["softmax_attention"]
    with pytest.raises(RuntimeError, match="double backward of sola_ops.softmax_attention"):
        torch.func.jacrev(torch.func.grad(lambda q: sola_ops.softmax_attention(q, k, v).sum()))(q)
    with pytest.raises(NotImplementedError, match="forward-mode AD .* sola_ops.linear_attention"):
        torch.func.jvp(lambda q: sola_ops.linear_attention(q, k, v), (q,), (q,))
    x, weight = torch.randn(1, 4, 4, 3, dtype=torch.float64), torch.randn(3, 3, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"forward-mode AD .* sola_ops.depthwise_conv3x3_layer_norm is"):
        torch.func.jvp(lambda x: sola_ops.depthwise_conv3x3_layer_norm(x, weight)[1], (x,), (x,))


def test_forward_ad_dual_tensors_raise_naming_the_op():
    """torch.autograd.forward_ad: a dual tensor into a public function raises naming it (the ops' registered
    autograd has no forward mode and dropped the tangent, returning a plain tensor); without a tangent it runs."""
    from torch.autograd import forward_ad
    x, w = torch.randn(1, 4, 4, 8, dtype=torch.float64), torch.randn(8, 1, 3, 3, dtype=torch.float64)
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    cases = {"layer_norm": (x, lambda d: sola_ops.layer_norm(d)), "bias_gelu": (x, lambda d: sola_ops.bias_gelu(d)),
             "depthwise_conv3x3": (x, lambda d: sola_ops.depthwise_conv3x3(d, w)),
             "depthwise_conv3x3_layer_norm": (x, lambda d: sola_ops.depthwise_conv3x3_layer_norm(d, w)),
             "softmax_attention": (q, lambda d: sola_ops.softmax_attention(q, q, d)),
             "linear_attention": (q, lambda d: sola_ops.linear_attention(d, q, q))}
    with forward_ad.dual_level():
        for name, (primal, f) in cases.items():
            with pytest.raises(NotImplementedError, match=rf"forward_ad\) through sola_ops.{name} is not supported"):
                f(forward_ad.make_dual(primal, torch.ones_like(primal)))
        assert forward_ad.unpack_dual(sola_ops.layer_norm(x)).tangent is None


@pytest.mark.parametrize("mixer,name", [("L", "linear_attention"), ("S", "rope")])
@pytest.mark.parametrize("dual", ["x", "qk.weight"])
def test_forward_ad_through_a_token_mixer_names_the_op(mixer, name, dual):
    """A SoLA-Vision token mixer given a forward_ad dual tensor (its input or a weight) raises naming the
    first op it reaches, not torch's "implement the jvp" of the fused node. attn_impl="torch" carries the
    tangent through the linear mixer (torch's SDPA has no forward AD on the CPU)."""
    from torch.autograd import forward_ad
    from sola_vision.layers import MIXERS
    torch.manual_seed(0)
    layer = MIXERS[mixer](8, 2).double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    params = dict(layer.named_parameters())
    with forward_ad.dual_level():
        if dual == "x":
            x = forward_ad.make_dual(x, torch.ones_like(x))
        else:
            params[dual] = forward_ad.make_dual(params[dual], torch.ones_like(params[dual]))
        with pytest.raises(NotImplementedError, match=rf"forward_ad\) through sola_ops.{name} is not supported"):
            torch.func.functional_call(layer, params, (x,))
        if mixer == "L":
            layer.attn_impl = "torch"
            assert forward_ad.unpack_dual(torch.func.functional_call(layer, params, (x,))).tangent is not None


def test_eager_autograd_takes_the_twin_and_compile_the_op(monkeypatch):
    """A call autograd records runs the op's eager twin (the registered setup_context and backward, without
    torch.library's wrapper and its per-call fill_defaults), with the registered autograd's gradients bit for
    bit; calls autograd does not record, and torch.compile, run the op itself."""
    from sola_ops import _ops
    twin, applied = _ops._EAGER_TWINS["softmax_attention_fwd"], []

    class Recorder:
        @staticmethod
        def apply(*args):
            applied.append(args)
            return twin.apply(*args)
    monkeypatch.setitem(_ops._EAGER_TWINS, "softmax_attention_fwd", Recorder)
    _, _, (q, k, v) = _cases("cpu")["softmax_attention"]
    q = q.clone().requires_grad_()
    g = randn(q.shape[:3] + v.shape[3:], q.dtype, "cpu", 5)
    out = sola_ops.softmax_attention(q, k, v)
    (dq,) = torch.autograd.grad(out, q, g)
    assert len(applied) == 1
    registered, _ = torch.ops.sola_ops.softmax_attention_fwd(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    (dq_registered,) = torch.autograd.grad(registered, q, g)
    assert torch.equal(out, registered) and torch.equal(dq, dq_registered)
    with torch.no_grad():
        sola_ops.softmax_attention(q, k, v)
    sola_ops.softmax_attention(q.detach(), k, v)
    compiled = torch.compile(lambda q: sola_ops.softmax_attention(q, k, v), fullgraph=True, backend="aot_eager")
    (dq_compiled,) = torch.autograd.grad(compiled(q), q, g)
    assert len(applied) == 1
    torch.testing.assert_close(dq_compiled, dq)


def test_per_sample_grads_of_a_hybrid_model_match_attn_impl_torch():
    """DP-SGD style per-sample gradients (functional_call, vmap of grad) through sola_vision_tiny with its
    linear and softmax layers: attn_impl "sola" (the ops, outside the fused mixer node) against "torch"."""
    timm = pytest.importorskip("timm")
    import sola_vision  # noqa: F401  (registers the models)
    models = {}
    for impl in ("sola", "torch"):
        torch.manual_seed(0)
        models[impl] = timm.create_model("sola_vision_tiny", num_classes=5, attn_impl=impl).double().eval()
    models["torch"].load_state_dict(models["sola"].state_dict())
    x, y = randn((2, 3, 64, 96), D, seed=11), torch.tensor([1, 3])
    grads = {}
    for impl, model in models.items():
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, xi, yi, model=model, buffers=buffers):
            logits = torch.func.functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(logits, yi.unsqueeze(0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grads[impl] = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert grads["sola"].keys() == grads["torch"].keys()
    for n, g in grads["sola"].items():
        assert g.shape[0] == 2, n
        torch.testing.assert_close(g, grads["torch"][n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    # The two samples' gradients differ (each is its own, not the batch's).
    assert not torch.allclose(grads["sola"]["head.fc.weight"][0], grads["sola"]["head.fc.weight"][1])


def test_vmap_over_zero_samples_gives_empty_outputs():
    """vmap over a dim of size 0: outputs with 0 samples in front (torch's own fallback refuses size 0)."""
    q, w, b = randn((0, 2, 2, 5, 8), D), randn((8, 1, 3, 3), D), randn((8,), D)
    x = randn((0, 2, 4, 4, 8), D)
    assert torch.func.vmap(sola_ops.linear_attention)(q, q, q).shape == (0, 2, 2, 5, 8)
    out, lse = torch.func.vmap(lambda q: sola_ops.softmax_attention(q, q, q, return_lse=True))(q)
    assert out.shape == (0, 2, 2, 5, 8) and lse.shape == (0, 2, 2, 5)
    assert torch.func.vmap(lambda x: sola_ops.depthwise_conv3x3(x, w, b))(x).shape == (0, 2, 4, 4, 8)
    for op in (lambda x, w: sola_ops.depthwise_conv3x3(x, w, b), lambda x, w: sola_ops.layer_norm(x, w[:, 0, 0, 0]),
               lambda x, w: sola_ops.bias_gelu(x, w[:, 0, 1, 1])):
        dx, dw = torch.func.vmap(torch.func.grad(lambda x, w: op(x, w).sum(), argnums=(0, 1)), in_dims=(0, None))(x, w)
        assert dx.shape == x.shape and dw.shape == (0, *w.shape)


def test_functionalize_runs_the_ops_themselves():
    """torch.func.functionalize has no rule for an autograd.Function: the ops run as they are under it."""
    q, x = randn((2, 2, 5, 8), torch.float32), randn((2, 4, 4, 8), torch.float32)
    w = randn((8, 1, 3, 3), torch.float32)
    for op, args in ((sola_ops.softmax_attention, (q, q, q)), (sola_ops.linear_attention, (q, q, q)),
                     (sola_ops.silu_mul, (x, x)), (sola_ops.layer_norm, (x,)),
                     (lambda *a: sola_ops.depthwise_conv3x3_layer_norm(*a)[1], (x, w))):  # was DwconvLayerNorm: NYI
        assert torch.equal(torch.func.functionalize(op)(*args), op(*args))
    qs = torch.stack((q, 2 * q))
    want = torch.stack([sola_ops.softmax_attention(t, t, t) for t in qs])
    for f in (torch.func.vmap(torch.func.functionalize(sola_ops.softmax_attention)),
              torch.func.functionalize(torch.func.vmap(sola_ops.softmax_attention))):
        assert torch.equal(f(qs, qs, qs), want)


def test_per_sample_grads_in_training_mode_as_the_readme_shows():
    """The README's recipe: BatchNorms without running statistics, training mode, vmap of grad; against
    torch.autograd on one sample at a time."""
    timm = pytest.importorskip("timm")
    import sola_vision  # noqa: F401  (registers the models)
    torch.manual_seed(0)
    model = timm.create_model("sola_vision_nano", num_classes=4, attn_impl="sola").double().train()
    torch.func.replace_all_batch_norm_modules_(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params, x, y):
        logits = torch.func.functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))
    x, y = randn((3, 3, 64, 64), D, seed=12), torch.tensor([0, 3, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    for s in range(3):
        model.zero_grad()
        F.cross_entropy(model(x[s:s + 1]), y[s:s + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(ours[n][s], p.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}, {s}: {m}")
