// The linear_attention ops: check arguments, allocate outputs, hand a params struct to the
// backend's kernels. Registered for CPU and (when built) CUDA.
#include <torch/library.h>

#include "linear_attention/linear_attention.h"

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

void run_fwd(const LinearAttentionParams& p, const at::Tensor& q) {
  if (empty_problem(p)) return;
#ifdef SOLA_WITH_CUDA
  if (q.is_cuda()) return linear_attention_fwd_cuda(p);
#endif
  SOLA_CHECK(q.is_cpu(), "q is on ", q.device(), " but sola_ops was built without CUDA kernels");
  linear_attention_fwd_cpu(p);
}

void run_bwd(const LinearAttentionParams& p, const at::Tensor& q) {
  if (empty_problem(p)) return;
#ifdef SOLA_WITH_CUDA
  if (q.is_cuda()) return linear_attention_bwd_cuda(p);
#endif
  SOLA_CHECK(q.is_cpu(), "q is on ", q.device(), " but sola_ops was built without CUDA kernels");
  linear_attention_bwd_cpu(p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd(
    at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> q_norm,
    c10::optional<at::Tensor> k_norm, std::string feature_map, bool normalize, double eps) {
  LinearAttentionParams p = make_params(q, k, v, q_norm, k_norm, feature_map, normalize, eps);
  at::Tensor out = new_output({p.B, p.H, p.Nq, p.Dv}, q.options());
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
    bool normalize, double eps) {
  LinearAttentionParams p = make_params(q, k, v, q_norm, k_norm, feature_map, normalize, eps);
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
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  at::Tensor dq_norm = p.has_qn ? new_output(q.sizes(), q.options()) : at::empty({0}, q.options());
  at::Tensor dk_norm = p.has_kn ? new_output(k.sizes(), k.options()) : at::empty({0}, k.options());
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
