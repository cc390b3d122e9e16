// The bias_gelu ops: check arguments, read x and grad_out in place when they are rows views (else copy
// them), hand the bias to the kernels acc-typed, allocate contiguous outputs, hand a params struct to the
// backend's kernels. Registered for CPU and (when built) CUDA.
#include <torch/library.h>

#include "bias_gelu/bias_gelu.h"
#include "elementwise_checks.h"
#include "row_views.h"

namespace sola {
namespace {

void check_x(const at::Tensor& x) {
  check_float_input(x);
  SOLA_CHECK(x.dim() >= 1, "x must have at least one dim, got a 0-dim tensor");
}

// approximate="tanh" (true) or "none" (false), else an error naming it.
bool parse_approximate(const std::string& approximate) {
  SOLA_CHECK(approximate == "none" || approximate == "tanh", "approximate must be 'none' or 'tanh', got '",
             approximate, "'");
  return approximate == "tanh";
}

// The bias as the kernels read it: (C) acc-typed, contiguous and 32-byte aligned (the CUDA vector
// kernels load 8 fp32 values at once): an fp32 parameter as it is, a copy only for another dtype, layout
// or alignment; undefined when absent.
at::Tensor kernel_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  at::Tensor b = acc_channel_param(bias, "bias", x);
  if (b.defined() && reinterpret_cast<uintptr_t>(b.data_ptr()) % 32 != 0) b = b.clone();
  return b;
}

BiasGeluParams make_params(at::Tensor& x, const at::Tensor& bias, bool use_tanh) {
  BiasGeluParams p;
  p.tanh = use_tanh;
  p.C = x.size(-1);
  p.rows = x.numel() / p.C;
  x = as_rows(x, p.x_stride);
  p.x = x.data_ptr();
  if (bias.defined()) p.bias = bias.data_ptr();
  p.dtype = x.scalar_type();
  p.device_index = x.is_cuda() ? x.device().index() : -1;
  return p;
}

}  // namespace

at::Tensor bias_gelu_fwd(at::Tensor x, c10::optional<at::Tensor> bias, std::string approximate) {
  check_x(x);
  const bool use_tanh = parse_approximate(approximate);
  const at::Tensor b = kernel_bias(bias, x);
  at::Tensor out = new_output(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  BiasGeluParams p = make_params(x, b, use_tanh);
  p.out = out.data_ptr();
  SOLA_RUN_KERNEL(x, "x", bias_gelu_fwd, p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(at::Tensor grad_out, at::Tensor x, c10::optional<at::Tensor> bias,
                                                 std::string approximate, bool with_bias) {
  check_x(x);
  check_like_x(grad_out, "grad_out", x);
  const bool use_tanh = parse_approximate(approximate);
  const at::Tensor b = kernel_bias(bias, x);
  SOLA_CHECK(!with_bias || b.defined(), "with_bias needs bias (dbias sums the gradient of x + bias)");
  at::Tensor dx = new_output(x.sizes(), x.options());
  at::Tensor dbias = new_output({with_bias ? x.size(-1) : 0}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) {
    dbias.zero_();
    return {dx, dbias};
  }
  BiasGeluParams p = make_params(x, b, use_tanh);
  grad_out = as_rows(grad_out, p.grad_stride);
  p.grad = grad_out.data_ptr();
  p.out = dx.data_ptr();
  if (with_bias) p.dbias = dbias.data_ptr();
  SOLA_RUN_KERNEL(x, "x", bias_gelu_bwd, p);
  return {dx, dbias};
}

TORCH_LIBRARY_IMPL(sola_ops, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
}

#ifdef SOLA_WITH_CUDA
TORCH_LIBRARY_IMPL(sola_ops, CUDA, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
}
#endif

}  // namespace sola
