// x * silu(gate), fused: SoLA-Vision's blocks gate the token mixer's output, out_proj(y * SiLU(gate)).
// Eagerly that is a silu and a mul (and, backward, a mul backward and a silu backward): 13 tensor passes.
// Fused, the forward reads x and gate and writes out (3 passes), the backward reads grad, x and gate and
// writes dx and dgate (5); silu(gate) is never stored. Computed in fp32 (fp64 for fp64 inputs), rounded
// once to the output dtype, with torch's formulas (aten's silu and silu_backward kernels):
//   silu(g) = g / (1 + exp(-g)),  sigma(g) = 1 / (1 + exp(-g))
//   out = x * silu(g),  dx = grad * silu(g),  dgate = (grad * x) * sigma * (1 + g * (1 - sigma))
// Special values follow from the formulas as they do in torch (F.silu on CPU, torch 2.14): silu(+inf) =
// +inf, silu(-inf) = -inf / inf = NaN, silu(NaN) = NaN; silu'(+inf) = 1 + inf * 0 = NaN, silu'(-inf) =
// 0 * -inf = NaN; exp(-g) overflowing (g < -88.7 in fp32) gives silu(g) = -0 exactly, as torch's does.
// What the op layer hands to the CPU and CUDA kernels, and the per-element math both share.
#pragma once

#include "common.h"

namespace sola {

struct SiluMulParams {
  int64_t rows = 0, C = 0;
  // Inputs, (rows, C): the last dim contiguous, row r at ptr + r * stride elements (a "rows" view such as
  // a channel slice y[..., :C] of a (..., 2C) tensor, read in place; any stride >= 0).
  const void* x = nullptr;
  const void* gate = nullptr;
  const void* grad = nullptr;  // backward only
  int64_t x_stride = 0, gate_stride = 0, grad_stride = 0;
  // Outputs, (rows, C) contiguous: out (forward) or dx (backward), and dgate (backward).
  void* out = nullptr;
  void* dgate = nullptr;
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// The op layer's entry points (schemas in sola.cpp).
at::Tensor silu_mul_fwd(at::Tensor x, at::Tensor gate);
std::tuple<at::Tensor, at::Tensor> silu_mul_bwd(at::Tensor grad_out, at::Tensor x, at::Tensor gate);

void silu_mul_fwd_cpu(const SiluMulParams& p);
void silu_mul_bwd_cpu(const SiluMulParams& p);
#ifdef SOLA_WITH_CUDA
void silu_mul_fwd_cuda(const SiluMulParams& p);
void silu_mul_bwd_cuda(const SiluMulParams& p);
#endif

// x * silu(g), in acc.
template <typename acc>
SOLA_HD acc silu_mul_value(acc x, acc g) {
  return x * (g / (acc(1) + kernel_exp(-g)));
}

// dx = grad * silu(g) and dgate = grad * x * silu'(g), in acc; one exp.
template <typename acc>
SOLA_HD void silu_mul_grads(acc grad, acc x, acc g, acc& dx, acc& dgate) {
  const acc denom = acc(1) + kernel_exp(-g);
  const acc sigma = acc(1) / denom;
  dx = grad * (g / denom);
  dgate = (grad * x) * sigma * (acc(1) + g * (acc(1) - sigma));
}

}  // namespace sola
