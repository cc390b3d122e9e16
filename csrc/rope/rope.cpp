// The rope ops: check arguments, allocate outputs, hand a params struct to the backend's kernels.
// Registered for CPU and (when built) CUDA.
#include <torch/library.h>

#include "heads_layout.h"
#include "rope/rope.h"

namespace sola {
namespace {

// t (grad_rot, grad_feat) matches x: shape, dtype, device, dense.
void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_attention_tensor(t, name, x, "x");
  SOLA_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
}

}  // namespace

at::Tensor rope_angle_table(const at::Tensor& t, const char* name, const at::Tensor& x, const char* like_name) {
  const int64_t N = x.size(2), half = x.size(3) / 2;
  SOLA_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == half, name, " must be (N, D / 2) = (", N, ", ", half,
             ") for ", like_name, " of shape ", x.sizes(), ", got shape ", t.sizes());
  SOLA_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
  SOLA_CHECK(t.device() == x.device(), name, " must be on the device of ", like_name, " (", x.device(), "), got ", t.device());
  SOLA_CHECK(t.layout() == at::kStrided, name, " must be a dense (strided) tensor");
  return t.to(acc_dtype(x)).contiguous();
}

namespace {

// Checks x, cos, sin and fills the shared part of the params; the re-laid-out tensors come back
// through the out-arguments so they stay alive for the kernel.
RopeParams make_params(at::Tensor& x, at::Tensor& cos, at::Tensor& sin, const std::string& feature_map) {
  SOLA_CHECK(x.device().is_cpu() || x.device().is_cuda(), "x must be on a CPU or CUDA device, got ", x.device());
  check_attention_tensor(x, "x", x);
  SOLA_CHECK(x.size(3) % 2 == 0, "x must have an even head dim (channel pairs rotate), got ", x.size(3));
  RopeParams p;
  p.feature_map = parse_feature_map(feature_map);
  cos = rope_angle_table(cos, "cos", x);
  sin = rope_angle_table(sin, "sin", x);
  x = last_dim_contiguous(x);
  p.B = x.size(0), p.H = x.size(1), p.N = x.size(2), p.D = x.size(3);
  p.x = make_view(x);
  p.cos = cos.data_ptr(), p.sin = sin.data_ptr();
  p.dtype = x.scalar_type();
  p.device_index = x.is_cuda() ? x.device().index() : -1;
  return p;
}

bool empty_problem(const RopeParams& p) { return p.B == 0 || p.H == 0 || p.N == 0 || p.D == 0; }

void run(const RopeParams& p, const at::Tensor& x, bool backward) {
  if (empty_problem(p)) return;
  backward ? SOLA_RUN_KERNEL(x, "x", rope_bwd, p) : SOLA_RUN_KERNEL(x, "x", rope_fwd, p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_fwd(at::Tensor x, at::Tensor cos, at::Tensor sin, std::string feature_map,
                                            bool with_features) {
  RopeParams p = make_params(x, cos, sin, feature_map);
  at::Tensor rot = new_output_like(x.sizes(), x.options(), x);
  at::Tensor feat = with_features ? new_output_like(x.sizes(), x.options(), x) : at::empty({0}, x.options());
  p.rot = make_view(rot);
  if (with_features) p.feat = make_view(feat);
  run(p, x, false);
  return {rot, feat};
}

at::Tensor rope_bwd(at::Tensor grad_rot, c10::optional<at::Tensor> grad_feat, at::Tensor x, at::Tensor cos,
                    at::Tensor sin, std::string feature_map) {
  RopeParams p = make_params(x, cos, sin, feature_map);
  check_like_x(grad_rot, "grad_rot", x);
  grad_rot = last_dim_contiguous(grad_rot);
  p.grad_rot = make_view(grad_rot);
  if (grad_feat.has_value()) {
    check_like_x(*grad_feat, "grad_feat", x);
    grad_feat = last_dim_contiguous(*grad_feat);
    p.grad_feat = make_view(*grad_feat);
  }
  at::Tensor dx = new_output_like(x.sizes(), x.options(), x);
  p.dx = make_view(dx);
  run(p, x, true);
  return dx;
}

TORCH_LIBRARY_IMPL(sola_ops, CPU, m) {
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
}

#ifdef SOLA_WITH_CUDA
TORCH_LIBRARY_IMPL(sola_ops, CUDA, m) {
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
}
#endif

}  // namespace sola
