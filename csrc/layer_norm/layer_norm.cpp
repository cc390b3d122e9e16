// The layer_norm ops: check arguments, make x rows x C contiguous, hand weight and bias to the kernels
// acc-typed, allocate outputs, hand a params struct to the backend's kernels. Registered for CPU and
// (when built) CUDA.
#include <torch/library.h>

#include <limits>

#include "elementwise_checks.h"
#include "layer_norm/layer_norm.h"

namespace sola {
namespace {

void check_x(const at::Tensor& x) {
  check_float_input(x);
  SOLA_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "x must have a last dim of at least 1 (the normalised features), got "
             "shape ", x.sizes());
}

// weight or bias as the kernels read it (acc_channel_param); undefined when absent.
at::Tensor kernel_param(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  return acc_channel_param(t, name, x, "features");
}

// mean or rstd: x's shape without its last dim, acc-typed.
void check_stat(const at::Tensor& t, const char* name, const at::Tensor& x) {
  const at::IntArrayRef want = x.sizes().slice(0, x.dim() - 1);
  SOLA_CHECK(t.sizes() == want, name, " must have x's shape without its last dim ", want, ", got ", t.sizes());
  SOLA_CHECK(t.scalar_type() == acc_dtype(x), name, " must be ", acc_dtype(x), " for ", x.scalar_type(), " x, got ",
             t.scalar_type());
  SOLA_CHECK(t.device() == x.device(), name, " must be on the device of x (", x.device(), "), got ", t.device());
}

LayerNormParams make_params(const at::Tensor& x, const at::Tensor& weight) {
  LayerNormParams p;
  p.C = x.size(-1);
  p.rows = x.numel() / p.C;
  p.x = x.data_ptr();
  if (weight.defined()) p.weight = weight.data_ptr();
  p.dtype = x.scalar_type();
  p.device_index = x.is_cuda() ? x.device().index() : -1;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(at::Tensor x, c10::optional<at::Tensor> weight,
                                                              c10::optional<at::Tensor> bias, double eps) {
  check_x(x);
  SOLA_CHECK(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);
  SOLA_CHECK(x.scalar_type() == at::kDouble || eps <= std::numeric_limits<float>::max(),
             "eps must fit in float32 (the statistics' dtype for ", x.scalar_type(), " x), got ", eps);
  const at::Tensor w = kernel_param(weight, "weight", x), b = kernel_param(bias, "bias", x);
  x = x.contiguous();
  at::Tensor out = new_output(x.sizes(), x.options());
  const auto stat_options = x.options().dtype(acc_dtype(x));
  at::Tensor mean = new_output(x.sizes().slice(0, x.dim() - 1), stat_options);
  at::Tensor rstd = new_output(x.sizes().slice(0, x.dim() - 1), stat_options);
  if (x.numel() == 0) return {out, mean, rstd};
  LayerNormParams p = make_params(x, w);
  if (b.defined()) p.bias = b.data_ptr();
  p.out = out.data_ptr(), p.mean = mean.data_ptr(), p.rstd = rstd.data_ptr();
  p.eps = eps;
  SOLA_RUN_KERNEL(x, "x", layer_norm_fwd, p);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(at::Tensor grad_out, at::Tensor x,
                                                              c10::optional<at::Tensor> weight, at::Tensor mean,
                                                              at::Tensor rstd, bool with_weight, bool with_bias,
                                                              c10::optional<at::Tensor> addend) {
  check_x(x);
  check_like_x(grad_out, "grad_out", x);
  check_stat(mean, "mean", x);
  check_stat(rstd, "rstd", x);
  const at::Tensor w = kernel_param(weight, "weight", x);
  SOLA_CHECK(!with_weight || w.defined(), "with_weight needs weight (dweight sums grad_out * xhat)");
  x = x.contiguous(), grad_out = grad_out.contiguous(), mean = mean.contiguous(), rstd = rstd.contiguous();
  at::Tensor add;
  if (addend.has_value()) {
    check_like_x(*addend, "addend", x);
    add = addend->contiguous();
  }
  const int64_t C = x.size(-1);
  const auto acc_options = x.options().dtype(acc_dtype(x));
  at::Tensor dx = new_output(x.sizes(), x.options());
  at::Tensor dweight = new_output({with_weight ? C : 0}, acc_options);
  at::Tensor dbias = new_output({with_bias ? C : 0}, acc_options);
  if (x.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  LayerNormParams p = make_params(x, w);
  p.grad = grad_out.data_ptr();
  p.out = dx.data_ptr();
  if (add.defined()) p.addend = add.data_ptr();
  p.mean = mean.data_ptr(), p.rstd = rstd.data_ptr();
  if (with_weight) p.dweight = dweight.data_ptr();
  if (with_bias) p.dbias = dbias.data_ptr();
  SOLA_RUN_KERNEL(x, "x", layer_norm_bwd, p);
  return {dx, dweight, dbias};
}

TORCH_LIBRARY_IMPL(sola_ops, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

#ifdef SOLA_WITH_CUDA
TORCH_LIBRARY_IMPL(sola_ops, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}
#endif

}  // namespace sola
