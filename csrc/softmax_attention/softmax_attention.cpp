// The softmax_attention ops: check arguments, allocate outputs, hand a params struct to the
// backend's kernels. Registered for CPU and (when built) CUDA.
#include <torch/library.h>

#include <optional>

#include "heads_layout.h"
#include "softmax_attention/softmax_attention.h"

namespace sola {
namespace {

SoftmaxAttentionParams make_params(at::Tensor& q, at::Tensor& k, at::Tensor& v, double scale) {
  check_qkv(q, k, v);
  check_cuda_head_dims(q, v);
  SOLA_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  check_fits_float32(scale, "scale", q);
  q = last_dim_contiguous(q);
  k = last_dim_contiguous(k);
  v = last_dim_contiguous(v);
  SoftmaxAttentionParams p;
  p.B = q.size(0), p.H = q.size(1), p.Nq = q.size(2), p.Nk = k.size(2), p.Dk = q.size(3), p.Dv = v.size(3);
  p.q = make_view(q), p.k = make_view(k), p.v = make_view(v);
  p.scale = scale;
  p.dtype = q.scalar_type();
  p.device_index = q.is_cuda() ? q.device().index() : -1;
  return p;
}

bool empty_problem(const SoftmaxAttentionParams& p) { return p.B == 0 || p.H == 0; }

std::tuple<at::Tensor, at::Tensor> softmax_attention_fwd(at::Tensor q, at::Tensor k, at::Tensor v, double scale) {
  SoftmaxAttentionParams p = make_params(q, k, v, scale);
  at::Tensor out = new_output_like({p.B, p.H, p.Nq, p.Dv}, q.options(), q);
  at::Tensor lse = new_output({p.B, p.H, p.Nq}, q.options().dtype(acc_dtype(q)));
  p.out = make_view(out);
  p.lse = lse.data_ptr();
  if (empty_problem(p)) return {out, lse};
  SOLA_RUN_KERNEL(q, "q", softmax_attention_fwd, p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_attention_bwd(at::Tensor grad_out, at::Tensor q, at::Tensor k,
                                                                     at::Tensor v, at::Tensor out, at::Tensor lse,
                                                                     double scale,
                                                                     const std::optional<at::Tensor>& grad_lse_opt) {
  SoftmaxAttentionParams p = make_params(q, k, v, scale);
  const std::vector<int64_t> out_shape{p.B, p.H, p.Nq, p.Dv};
  check_attention_tensor(grad_out, "grad_out", q);
  SOLA_CHECK(grad_out.sizes() == out_shape, "grad_out must have the output's shape ", out_shape, ", got ",
             grad_out.sizes());
  check_attention_tensor(out, "out", q);
  SOLA_CHECK(out.sizes() == out_shape, "out must have the output's shape ", out_shape, ", got ", out.sizes());
  SOLA_CHECK(lse.sizes() == at::IntArrayRef({p.B, p.H, p.Nq}) && lse.scalar_type() == acc_dtype(q) &&
                 lse.device() == q.device(),
             "lse must be the forward's (B, H, Nq) ", acc_dtype(q), " log-sum-exp, got ", lse.sizes(), " ",
             lse.scalar_type());
  at::Tensor grad_lse;
  if (grad_lse_opt.has_value() && grad_lse_opt->defined()) {
    grad_lse = *grad_lse_opt;
    SOLA_CHECK(grad_lse.sizes() == lse.sizes() && grad_lse.scalar_type() == lse.scalar_type() &&
                   grad_lse.device() == q.device() && grad_lse.layout() == at::kStrided,
               "grad_lse must be shaped and typed like lse ", lse.sizes(), " ", lse.scalar_type(), ", got ",
               grad_lse.sizes(), " ", grad_lse.scalar_type());
    grad_lse = grad_lse.contiguous();
  }
  grad_out = last_dim_contiguous(grad_out);
  out = last_dim_contiguous(out);
  lse = lse.contiguous();
  at::Tensor delta = at::empty_like(lse);
  at::Tensor dq = new_output_like(q.sizes(), q.options(), q);
  at::Tensor dk = new_output_like(k.sizes(), k.options(), k);
  at::Tensor dv = new_output_like(v.sizes(), v.options(), v);
  p.grad_out = make_view(grad_out), p.out = make_view(out);
  p.lse = lse.data_ptr(), p.delta = delta.data_ptr();
  p.grad_lse = grad_lse.defined() ? grad_lse.data_ptr() : nullptr;
  p.dq = make_view(dq), p.dk = make_view(dk), p.dv = make_view(dv);
  if (empty_problem(p)) return {dq, dk, dv};
  SOLA_RUN_KERNEL(q, "q", softmax_attention_bwd, p);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(sola_ops, CPU, m) {
  m.impl("softmax_attention_fwd", &softmax_attention_fwd);
  m.impl("softmax_attention_bwd", &softmax_attention_bwd);
}

#ifdef SOLA_WITH_CUDA
TORCH_LIBRARY_IMPL(sola_ops, CUDA, m) {
  m.impl("softmax_attention_fwd", &softmax_attention_fwd);
  m.impl("softmax_attention_bwd", &softmax_attention_bwd);
}
#endif

}  // namespace sola
