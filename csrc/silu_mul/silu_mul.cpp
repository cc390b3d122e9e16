// The silu_mul ops: check arguments, read each input in place when it is a rows view (else copy it),
// allocate contiguous outputs, hand a params struct to the backend's kernels. Registered for CPU and
// (when built) CUDA.
#include <torch/library.h>

#include "elementwise_checks.h"
#include "row_views.h"
#include "silu_mul/silu_mul.h"

namespace sola {
namespace {

void check_x(const at::Tensor& x) {
  check_float_input(x);
  SOLA_CHECK(x.dim() >= 1, "x must have at least one dim, got a 0-dim tensor");
}

SiluMulParams make_params(at::Tensor& x, at::Tensor& gate) {
  SiluMulParams p;
  p.C = x.size(-1);
  p.rows = x.numel() / p.C;
  x = as_rows(x, p.x_stride);
  gate = as_rows(gate, p.gate_stride);
  p.x = x.data_ptr(), p.gate = gate.data_ptr();
  p.dtype = x.scalar_type();
  p.device_index = x.is_cuda() ? x.device().index() : -1;
  return p;
}

}  // namespace

at::Tensor silu_mul_fwd(at::Tensor x, at::Tensor gate) {
  check_x(x);
  check_like_x(gate, "gate", x);
  at::Tensor out = new_output(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  SiluMulParams p = make_params(x, gate);
  p.out = out.data_ptr();
  SOLA_RUN_KERNEL(x, "x", silu_mul_fwd, p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_bwd(at::Tensor grad_out, at::Tensor x, at::Tensor gate) {
  check_x(x);
  check_like_x(gate, "gate", x);
  check_like_x(grad_out, "grad_out", x);
  at::Tensor dx = new_output(x.sizes(), x.options()), dgate = new_output(x.sizes(), x.options());
  if (x.numel() == 0) return {dx, dgate};
  SiluMulParams p = make_params(x, gate);
  grad_out = as_rows(grad_out, p.grad_stride);
  p.grad = grad_out.data_ptr();
  p.out = dx.data_ptr(), p.dgate = dgate.data_ptr();
  SOLA_RUN_KERNEL(x, "x", silu_mul_bwd, p);
  return {dx, dgate};
}

TORCH_LIBRARY_IMPL(sola_ops, CPU, m) {
  m.impl("silu_mul_fwd", &silu_mul_fwd);
  m.impl("silu_mul_bwd", &silu_mul_bwd);
}

#ifdef SOLA_WITH_CUDA
TORCH_LIBRARY_IMPL(sola_ops, CUDA, m) {
  m.impl("silu_mul_fwd", &silu_mul_fwd);
  m.impl("silu_mul_bwd", &silu_mul_bwd);
}
#endif

}  // namespace sola
