// The linear_attention ops: check arguments, allocate outputs, hand a params struct to the
// backend's kernels. Registered for CPU and (when built) CUDA.
#include <torch/library.h>

#include "heads_layout.h"
#include "linear_attention/linear_attention.h"
#include "rope/rope.h"

namespace sola {
namespace {

// Checks every input and fills the shared part of the params; returns the inputs re-laid out
// (last dim contiguous) through the out-arguments so they stay alive for the kernel.
LinearAttentionParams make_params(at::Tensor& q, at::Tensor& k, at::Tensor& v,
                                  c10::optional<at::Tensor>& q_norm, c10::optional<at::Tensor>& k_norm,
                                  const std::string& feature_map, bool normalize, double eps) {
  check_qkv(q, k, v);
  check_cuda_head_dims(q, v);
  SOLA_CHECK(normalize || (!q_norm.has_value() && !k_norm.has_value()),
             "q_norm and k_norm are only used with normalize=True");
  SOLA_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  check_fits_float32(eps, "eps", q);  // past fp32's range: inf, out all 0
  LinearAttentionParams p;
  p.feature_map = parse_feature_map(feature_map);
  q = last_dim_contiguous(q);
  k = last_dim_contiguous(k);
  v = last_dim_contiguous(v);
  p.B = q.size(0), p.H = q.size(1), p.Nq = q.size(2), p.Nk = k.size(2), p.Dk = q.size(3), p.Dv = v.size(3);
  p.q = make_view(q), p.k = make_view(k), p.v = make_view(v);
  p.qn = p.q, p.kn = p.k;
  if (q_norm.has_value()) {
    check_attention_tensor(*q_norm, "q_norm", q);
    SOLA_CHECK(q_norm->sizes() == q.sizes(), "q_norm must have the shape of q ", q.sizes(), ", got ", q_norm->sizes());
    q_norm = last_dim_contiguous(*q_norm);
    p.qn = make_view(*q_norm), p.has_qn = true;
  }
  if (k_norm.has_value()) {
    check_attention_tensor(*k_norm, "k_norm", q);
    SOLA_CHECK(k_norm->sizes() == k.sizes(), "k_norm must have the shape of k ", k.sizes(), ", got ", k_norm->sizes());
    k_norm = last_dim_contiguous(*k_norm);
    p.kn = make_view(*k_norm), p.has_kn = true;
  }
  p.normalize = normalize;
  p.eps = eps;
  p.dtype = q.scalar_type();
  p.device_index = q.is_cuda() ? q.device().index() : -1;
  return p;
}

bool empty_problem(const LinearAttentionParams& p) { return p.B == 0 || p.H == 0; }

// The angle tables of linear_attention(rope=(cos, sin)), checked and accumulator-typed; none
// without RoPE.
struct RopeTables {
  at::Tensor cos, sin;
  bool given = false;
};

RopeTables rope_tables(const c10::optional<at::Tensor>& rope_cos, const c10::optional<at::Tensor>& rope_sin,
                       const at::Tensor& q, const LinearAttentionParams& p) {
  SOLA_CHECK(rope_cos.has_value() == rope_sin.has_value(), "rope_cos and rope_sin must be given together");
  if (!rope_cos.has_value()) return {};
  SOLA_CHECK(!p.has_qn && !p.has_kn,
             "q_norm and k_norm cannot be combined with rope: the normaliser takes phi(q), phi(k) unrotated");
  SOLA_CHECK(p.Nq == p.Nk, "rope needs as many queries as keys (one angle table for both), got Nq = ", p.Nq,
             " and Nk = ", p.Nk);
  SOLA_CHECK(p.Dk % 2 == 0, "rope needs an even head dim of q and k (channel pairs rotate), got ", p.Dk);
  return {rope_angle_table(*rope_cos, "rope_cos", q, "q"), rope_angle_table(*rope_sin, "rope_sin", q, "q"), true};
}

// Whether the backend's kernels take the RoPE tables themselves (the CPU kernels always); otherwise
// the op runs the rope kernels first and hands linear attention the rotated and unrotated features
// (same result, up to rounding the intermediates to the input dtype). One difference no backward reads:
// with normalize=False the composition's z (the raw op's third output) is the mean of rope(phi(k)), the
// fused kernels' the mean of phi(k).
bool rope_fused(const LinearAttentionParams& p, const at::Tensor& q) {
#ifdef SOLA_WITH_CUDA
  if (q.is_cuda()) return linear_attention_rope_fused_cuda(p);
#endif
  return true;
}

// rope(phi(x)) and, for the normaliser, phi(x).
std::pair<at::Tensor, c10::optional<at::Tensor>> rope_features(const at::Tensor& x, const RopeTables& rope,
                                                               const std::string& feature_map, bool normalize) {
  auto [rot, feat] = rope_fwd(x, rope.cos, rope.sin, feature_map, normalize);
  return {rot, normalize ? c10::optional<at::Tensor>(feat) : c10::nullopt};
}

void run_fwd(const LinearAttentionParams& p, const at::Tensor& q) {
  if (empty_problem(p)) return;
  SOLA_RUN_KERNEL(q, "q", linear_attention_fwd, p);
}

void run_bwd(const LinearAttentionParams& p, const at::Tensor& q) {
  if (empty_problem(p)) return;
  SOLA_RUN_KERNEL(q, "q", linear_attention_bwd, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd(
    at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> q_norm,
    c10::optional<at::Tensor> k_norm, std::string feature_map, bool normalize, double eps,
    c10::optional<at::Tensor> rope_cos, c10::optional<at::Tensor> rope_sin) {
  LinearAttentionParams p = make_params(q, k, v, q_norm, k_norm, feature_map, normalize, eps);
  const RopeTables rope = rope_tables(rope_cos, rope_sin, q, p);
  if (rope.given && !rope_fused(p, q)) {
    auto [q_rot, q_feat] = rope_features(q, rope, feature_map, normalize);
    auto [k_rot, k_feat] = rope_features(k, rope, feature_map, normalize);
    return linear_attention_fwd(q_rot, k_rot, v, q_feat, k_feat, "identity", normalize, eps, c10::nullopt, c10::nullopt);
  }
  if (rope.given) p.rope_cos = rope.cos.data_ptr(), p.rope_sin = rope.sin.data_ptr();
  at::Tensor out = new_output_like({p.B, p.H, p.Nq, p.Dv}, q.options(), q);
  at::Tensor state = new_output({p.B, p.H, p.Dk, p.Dv}, q.options().dtype(acc_dtype(q)));
  at::Tensor z = new_output({p.B, p.H, p.Dk}, q.options().dtype(acc_dtype(q)));
  p.out = make_view(out);
  p.state = state.data_ptr();
  p.z = z.data_ptr();
  run_fwd(p, q);
  return {out, state, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd(
    at::Tensor grad_out, at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> q_norm,
    c10::optional<at::Tensor> k_norm, at::Tensor state, at::Tensor z, std::string feature_map,
    bool normalize, double eps, c10::optional<at::Tensor> rope_cos, c10::optional<at::Tensor> rope_sin) {
  LinearAttentionParams p = make_params(q, k, v, q_norm, k_norm, feature_map, normalize, eps);
  const RopeTables rope = rope_tables(rope_cos, rope_sin, q, p);
  if (rope.given && !rope_fused(p, q)) {  // the forward's composition, differentiated
    auto [q_rot, q_feat] = rope_features(q, rope, feature_map, normalize);
    auto [k_rot, k_feat] = rope_features(k, rope, feature_map, normalize);
    auto [dq_rot, dk_rot, dv, dq_feat, dk_feat] = linear_attention_bwd(
        grad_out, q_rot, k_rot, v, q_feat, k_feat, state, z, "identity", normalize, eps, c10::nullopt, c10::nullopt);
    auto grad_feat = [&](const at::Tensor& d) { return normalize ? c10::optional<at::Tensor>(d) : c10::nullopt; };
    const at::Tensor dq = rope_bwd(dq_rot, grad_feat(dq_feat), q, rope.cos, rope.sin, feature_map);
    const at::Tensor dk = rope_bwd(dk_rot, grad_feat(dk_feat), k, rope.cos, rope.sin, feature_map);
    return {dq, dk, dv, at::empty({0}, q.options()), at::empty({0}, k.options())};
  }
  if (rope.given) p.rope_cos = rope.cos.data_ptr(), p.rope_sin = rope.sin.data_ptr();
  check_attention_tensor(grad_out, "grad_out", q);
  SOLA_CHECK(grad_out.sizes() == at::IntArrayRef({p.B, p.H, p.Nq, p.Dv}),
             "grad_out must have the output's shape (", p.B, ", ", p.H, ", ", p.Nq, ", ", p.Dv, "), got ", grad_out.sizes());
  SOLA_CHECK(state.sizes() == at::IntArrayRef({p.B, p.H, p.Dk, p.Dv}) && state.scalar_type() == acc_dtype(q) &&
                 state.device() == q.device(),
             "state must be the forward's (B, H, Dk, Dv) ", acc_dtype(q), " state, got ", state.sizes(), " ",
             state.scalar_type());
  SOLA_CHECK(z.sizes() == at::IntArrayRef({p.B, p.H, p.Dk}) && z.scalar_type() == acc_dtype(q) &&
                 z.device() == q.device(),
             "z must be the forward's (B, H, Dk) ", acc_dtype(q), " normaliser, got ", z.sizes(), " ", z.scalar_type());
  grad_out = last_dim_contiguous(grad_out);
  state = state.contiguous();
  z = z.contiguous();
  p.grad_out = make_view(grad_out);
  p.state = state.data_ptr();
  p.z = z.data_ptr();
  at::Tensor dq = new_output_like(q.sizes(), q.options(), q);
  at::Tensor dk = new_output_like(k.sizes(), k.options(), k);
  at::Tensor dv = new_output_like(v.sizes(), v.options(), v);
  at::Tensor dq_norm = p.has_qn ? new_output_like(q.sizes(), q.options(), *q_norm) : at::empty({0}, q.options());
  at::Tensor dk_norm = p.has_kn ? new_output_like(k.sizes(), k.options(), *k_norm) : at::empty({0}, k.options());
  p.dq = make_view(dq), p.dk = make_view(dk), p.dv = make_view(dv);
  if (p.has_qn) p.dqn = make_view(dq_norm);
  if (p.has_kn) p.dkn = make_view(dk_norm);
  run_bwd(p, q);
  return {dq, dk, dv, dq_norm, dk_norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(sola_ops, CPU, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd);
  m.impl("linear_attention_bwd", &linear_attention_bwd);
}

#ifdef SOLA_WITH_CUDA
TORCH_LIBRARY_IMPL(sola_ops, CUDA, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd);
  m.impl("linear_attention_bwd", &linear_attention_bwd);
}
#endif

}  // namespace sola
