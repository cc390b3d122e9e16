// LayerNorm over the last dim of x (rows x C), as F.layer_norm(x, (C,), weight, bias, eps), with the
// output in x's dtype: statistics, weight and bias in fp32 (fp64 for fp64 x). Under autocast torch
// runs layer_norm in fp32 (a cast of x in, an fp32 output, a cast per consumer); SoLA-Vision's blocks
// call this instead on their bf16 tokens, one read and one write each way.
//   mean_r = sum_c x[r, c] / C,  rstd_r = 1 / sqrt(sum_c (x[r, c] - mean_r)^2 / C + eps)
//   out[r, c] = (x[r, c] - mean_r) * rstd_r * weight[c] + bias[c]
// Backward, with xhat = (x - mean) * rstd and g = grad * weight:
//   dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)),  dweight = sum_r grad * xhat,
//   dbias = sum_r grad  (both summed in a fixed order: bitwise reproducible).
// An addend (x's other consumer's gradient) is added to dx in acc before the one rounding: a pre-norm
// block's residual stream, whose gradient autograd would otherwise sum in a pass of its own.
// What the op layer hands to the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "common.h"

namespace sola {

// rstd from a row's sum of squared deviations: NaN where that sum overflowed the accumulator (fp32: a
// row whose deviations from its mean reach ~1.8e19), so the row's output and gradients show it as NaN
// (as the fp32 reference's do) rather than the plausible zeros that 1 / sqrt(inf) = 0 would make of them.
template <typename acc>
SOLA_HD acc row_rstd(acc sum_sq, int64_t C, double eps) {
  const acc rstd = acc(1) / std::sqrt(sum_sq / acc(C) + acc(eps));
  return rstd == acc(0) ? static_cast<acc>(NAN) : rstd;
}

struct LayerNormParams {
  int64_t rows = 0, C = 0;
  // x, out (forward) or dx (backward), grad: (rows, C) contiguous, in `dtype`; out overlaps none of the
  // inputs (a new tensor: the CPU kernels' loops are vectorised on that assumption).
  const void* x = nullptr;
  const void* grad = nullptr;
  void* out = nullptr;
  // Backward: (rows, C) in `dtype`, added to dx as it is written, or null.
  const void* addend = nullptr;
  // weight, bias: (C) acc-typed (fp32, fp64 for fp64 x), contiguous, or null (1 and 0).
  const void* weight = nullptr;
  const void* bias = nullptr;
  // mean, rstd: (rows) acc-typed; the forward writes them, the backward reads them.
  void* mean = nullptr;
  void* rstd = nullptr;
  // Backward: dweight, dbias (C) acc-typed, or null when not wanted.
  void* dweight = nullptr;
  void* dbias = nullptr;
  double eps = 1e-5;
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// The op layer's entry points (schemas in sola.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(at::Tensor x, c10::optional<at::Tensor> weight,
                                                              c10::optional<at::Tensor> bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(at::Tensor grad_out, at::Tensor x,
                                                              c10::optional<at::Tensor> weight, at::Tensor mean,
                                                              at::Tensor rstd, bool with_weight, bool with_bias,
                                                              c10::optional<at::Tensor> addend);

void layer_norm_fwd_cpu(const LayerNormParams& p);
void layer_norm_bwd_cpu(const LayerNormParams& p);
#ifdef SOLA_WITH_CUDA
void layer_norm_fwd_cuda(const LayerNormParams& p);
void layer_norm_bwd_cuda(const LayerNormParams& p);
#endif

}  // namespace sola
