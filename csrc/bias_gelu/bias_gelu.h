// GELU of x + bias, fused: SoLA-Vision's MLP runs fc1 (a GEMM with a bias) -> GELU -> fc2, and calls
// bias_gelu(F.linear(y, fc1.weight), fc1.bias), so the bias add costs no pass of its own. The backward
// writes dx = grad * gelu'(x + bias) and sums the same values over all rows into dbias in that pass:
// the separate bias-gradient reduction, another read of the 4C-wide gradient, is gone.
// Computed in fp32 (fp64 for fp64 x) with torch's formulas (aten's ActivationGeluKernel.cu, gelu and
// gelu_backward for both approximations), rounded once to x's dtype (on the host, fp32 "none" computes the
// same function from the normal cdf's lower tail, cpu_gelu_erf: accurate where 1 + erf cancels):
//   "none": gelu(v) = v * 0.5 * (1 + erf(v / sqrt 2)),
//           gelu'(v) = cdf + v * pdf, cdf = 0.5 * (1 + erf(v / sqrt 2)), pdf = exp(-0.5 * v * v) / sqrt(2 pi)
//   "tanh": gelu(v) = 0.5 * v * (1 + tanh(inner)), inner = beta * (v + kappa * v^3), beta = sqrt(2 / pi)
//           gelu'(v) = 0.5 * (1 + tanh(inner)) + 0.5 * v * (1 - tanh(inner)^2) * beta * (1 + 3 kappa v^2)
// with v = x + bias (v = x without a bias: -0 stays -0). Special values follow from the formulas as in
// torch's CUDA kernels and its CPU scalar loop: gelu(+inf) = inf, gelu(-inf) = -inf * 0 = NaN,
// gelu'(+-inf) = NaN; tanh: fp32 v^2 overflowing (|v| > 1.8e19) makes gelu'(v) = NaN, as torch's.
// dbias[c] = sum over rows of the acc-typed dx[r, c] before its rounding, in a fixed order (bitwise
// reproducible). What the op layer hands to the CPU and CUDA kernels, and the per-element math both share.
#pragma once

#include "common.h"
#include "cpu_erf_tanh.h"

namespace sola {

struct BiasGeluParams {
  int64_t rows = 0, C = 0;
  // Inputs, (rows, C): the last dim contiguous, row r at ptr + r * stride elements (rows views, read in
  // place; any stride >= 0).
  const void* x = nullptr;
  const void* grad = nullptr;  // backward only
  int64_t x_stride = 0, grad_stride = 0;
  // bias: (C) acc-typed (fp32, fp64 for fp64 x), contiguous, 32-byte aligned, or null (no bias).
  const void* bias = nullptr;
  // out (forward) or dx (backward): (rows, C) contiguous, in `dtype`.
  void* out = nullptr;
  // Backward: dbias (C) acc-typed, or null when not wanted (no bias, or a bias that needs no grad).
  void* dbias = nullptr;
  bool tanh = false;  // approximate="tanh", else "none" (erf)
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// The op layer's entry points (schemas in sola.cpp).
at::Tensor bias_gelu_fwd(at::Tensor x, c10::optional<at::Tensor> bias, std::string approximate);
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(at::Tensor grad_out, at::Tensor x, c10::optional<at::Tensor> bias,
                                                 std::string approximate, bool with_bias);

void bias_gelu_fwd_cpu(const BiasGeluParams& p);
void bias_gelu_bwd_cpu(const BiasGeluParams& p);
#ifdef SOLA_WITH_CUDA
void bias_gelu_fwd_cuda(const BiasGeluParams& p);
void bias_gelu_bwd_cuda(const BiasGeluParams& p);
#endif

// torch's constants, as <cmath>'s M_SQRT2, M_2_SQRTPI, M_SQRT1_2 (doubles; each product below is taken
// in double and then converted to acc, as torch's constexpr opmath_t initialisers are).
constexpr double kGeluSqrt2 = 1.41421356237309504880;
constexpr double kGelu2SqrtPi = 1.12837916709551257390;
constexpr double kGeluSqrt1_2 = 0.70710678118654752440;

// The per-element helpers below: inlined into the CPU kernels' per-ISA clones too (SOLA_HD alone is a
// plain inline there, which GCC declined for the tanh forms, and the loops stayed scalar).
#if defined(__CUDACC__)
#define SOLA_GELU_HD SOLA_HD
#else
#define SOLA_GELU_HD SOLA_CPU_INLINE
#endif

// erf and tanh in the kernels: the device's on CUDA. On the host fp32 takes cpu_tanh and, for the erf form,
// cpu_gelu_erf(_grad) (cpu_erf_tanh.h), which vectorise (the emulated CUDA kernels take them too, so both
// sides agree bitwise there); fp64 takes libm's.
template <typename T>
SOLA_GELU_HD T kernel_erf(T x) {
#ifndef __CUDA_ARCH__
  static_assert(std::is_same_v<T, double>, "fp32 host GELU takes cpu_gelu_erf, not erf");
#endif
  return std::erf(x);
}

template <typename T>
SOLA_GELU_HD T kernel_tanh(T x) {
#ifdef __CUDA_ARCH__
  return std::tanh(x);
#else
  return cpu_tanh(x);
#endif
}

// gelu(v), in acc. kTanh: approximate="tanh".
template <bool kTanh, typename acc>
SOLA_GELU_HD acc gelu_value(acc v) {
  if constexpr (kTanh) {
    constexpr acc kBeta = static_cast<acc>(kGeluSqrt2 * kGelu2SqrtPi * 0.5);
    constexpr acc kKappa = static_cast<acc>(0.044715);
    const acc v_cube = v * v * v;
    const acc inner = kBeta * (v + kKappa * v_cube);
    return acc(0.5) * v * (acc(1) + kernel_tanh(inner));
  } else {
#ifndef __CUDA_ARCH__
    if constexpr (std::is_same_v<acc, float>) {
      return cpu_gelu_erf(v);  // the same function, another form
    } else
#endif
    {
      constexpr acc kAlpha = static_cast<acc>(kGeluSqrt1_2);
      return v * acc(0.5) * (acc(1) + kernel_erf(v * kAlpha));
    }
  }
}

// grad * gelu'(v), in acc.
template <bool kTanh, typename acc>
SOLA_GELU_HD acc gelu_grad(acc grad, acc v) {
  if constexpr (kTanh) {
    constexpr acc kBeta = static_cast<acc>(kGeluSqrt2 * kGelu2SqrtPi * 0.5);
    constexpr acc kKappa = static_cast<acc>(0.044715);
    const acc v_sq = v * v;
    const acc v_cube = v_sq * v;
    const acc inner = kBeta * (v + kKappa * v_cube);
    const acc tanh_inner = kernel_tanh(inner);
    const acc left = acc(0.5) * v;
    const acc right = acc(1) + tanh_inner;
    const acc left_derivative = acc(0.5) * right;
    const acc tanh_derivative = acc(1) - tanh_inner * tanh_inner;
    const acc inner_derivative = kBeta * (acc(1) + acc(3) * kKappa * v_sq);
    const acc right_derivative = left * tanh_derivative * inner_derivative;
    return grad * (left_derivative + right_derivative);
  } else {
#ifndef __CUDA_ARCH__
    if constexpr (std::is_same_v<acc, float>) {
      return cpu_gelu_erf_grad(grad, v);
    } else
#endif
    {
      constexpr acc kBeta = static_cast<acc>(kGelu2SqrtPi * kGeluSqrt1_2 * 0.5);
      constexpr acc kAlpha = static_cast<acc>(kGeluSqrt1_2);
      const acc cdf = acc(0.5) * (acc(1) + kernel_erf(v * kAlpha));
      const acc pdf = kernel_exp(acc(-0.5) * v * v) * kBeta;
      return grad * (cdf + v * pdf);
    }
  }
}

}  // namespace sola

// Runs the lambda-like body with `constexpr bool kTanh` bound to use_tanh (BiasGeluParams::tanh).
#define SOLA_GELU_SWITCH(use_tanh, kTanh, ...) \
  [&] {                                        \
    if (use_tanh) {                            \
      constexpr bool kTanh = true;             \
      return __VA_ARGS__();                    \
    }                                          \
    constexpr bool kTanh = false;              \
    return __VA_ARGS__();                      \
  }()
