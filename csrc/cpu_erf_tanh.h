// GELU's erf form and tanh of fp32 values for the CPU kernels, written as cpu_math.h's cpu_exp is:
// branch-free (both sides of each range split computed, then a select), so loops calling them
// auto-vectorise, where libm's erff / tanhf are opaque scalar calls (bias_gelu's CPU kernels took 4-5x
// torch's time with them). The polynomials are least-squares fits on Chebyshev nodes (mpmath) rounded to
// fp32. tanh, measured over all 2^32 fp32 values against libm's double tanh: within 1.4 ulp; NaN and the
// signs of zeros as libm's. fp64 keeps libm's erf and tanh (scalar calls).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "cpu_math.h"

namespace sola {

// tanh(x): x + x^3 P(x^2) for |x| < 0.625; 1 - 2 / (exp(2 |x|) + 1) beyond (exp overflowing to inf gives 1).
SOLA_CPU_INLINE float cpu_tanh(float x) {
  const float a = std::fabs(x), z = a * a;
  float p = -0.006139018572866917f;
  p = p * z + 0.021033328026533127f;
  p = p * z + -0.053861018270254135f;
  p = p * z + 0.13332870602607727f;
  p = p * z + -0.3333333134651184f;
  const float small = a + a * (z * p);
  const float large = 1.0f - 2.0f / (cpu_exp(2.0f * a) + 1.0f);
  const float r = a < 0.625f ? small : large;  // NaN: large, NaN
  return x != x ? x : std::copysign(r, x);
}

// GELU (erf form) of fp32 v on the host: v Phi(v), and its derivative Phi(v) + v exp(-v^2 / 2) / sqrt(2 pi),
// from the normal cdf's lower tail Phi(-|v|) = erfc(|v| / sqrt 2) / 2 rather than 1 + erf, whose
// cancellation left fp32 GELU 0 below v = -5.7 and ~100 ulp off near v = -3. One exp, shared with the
// derivative, and two short polynomials: ~60 vector instructions where v (1 + erf) / 2 took ~100 (bias_gelu
// on 6272 x 512 fp32, one AVX-512 core: forward 3.2 -> 2.4 ms, forward + backward 12.3 -> 5.8 ms, where the
// derivative had taken an erf and an exp; torch's F.gelu(x + b): 2.0 / 7.8 ms). A dense sweep of [-14, 14]
// against double (AVX-512 build; the baseline x86-64 one in brackets): within 2 ulp for v >= 0, 3.5 (4.4) ulp
// on [-1, 0), 12 (15) on [-3, -1), 6 (7) below; the derivative within 3.5 ulp of its terms (cdf, v pdf);
// 0 below v = -13.2 (denormal); NaN kept; gelu(+-inf) = inf, NaN and gelu'(+-inf) = NaN, as torch's formulas
// give them.
struct CpuGeluTerms {
  float cdf;    // Phi(v)
  float gauss;  // exp(-v^2 / 2)
};

SOLA_CPU_INLINE CpuGeluTerms cpu_gelu_terms(float v) {
  const float abs_v = std::fabs(v);
  const float a = abs_v < 20.0f ? abs_v : 20.0f;  // both tails are 0 from here; NaN: 20 (v * ... stays NaN)
  // a^2 = hi + lo exactly, so exp(-a^2 / 2) keeps its relative accuracy in the tail: exp(-hi / 2) (1 - lo / 2).
  // lo by Dekker's split of a into two 12-bit halves, whose products are exact: a * a - hi written out
  // was folded to hi - hi by the compiler (no fused multiply-add), which cost up to 60 ulp below v = -6.
  const float hi = a * a;
  const float a_hi = std::bit_cast<float>(std::bit_cast<uint32_t>(a) & 0xfffff000u), a_lo = a - a_hi;
  const float lo = ((a_hi * a_hi - hi) + 2.0f * a_hi * a_lo) + a_lo * a_lo;
  const float exp_hi = cpu_exp_nonpositive_not_nan(-0.5f * hi);  // a <= 20: never NaN
  const float gauss = exp_hi - exp_hi * (0.5f * lo);
  // erfc(u) / 2 = exp(-u^2) R(t), u = a / sqrt 2, t = 1 / (1 + u / 2): R a degree-9 fit over u in [0, 9.3]
  // (relative error 3e-8; mpmath, as the fits above).
  const float t = 1.0f / (1.0f + 0.35355339059327376f * a);
  float r = -2.685607661e-02f;
  r = r * t + 1.284432130e-01f;
  r = r * t + -2.128151966e-01f;
  r = r * t + 1.004984466e-01f;
  r = r * t + 1.651664246e-02f;
  r = r * t + 8.658339862e-02f;
  r = r * t + 1.262059040e-01f;
  r = r * t + 1.402883844e-01f;
  r = r * t + 1.411396371e-01f;
  r = r * t + -4.367795575e-06f;
  // u < 1: 1/2 - erf(u) / 2 with erf(u) = u P(u^2) (2.8 ulp over all fp32 u in [0, 1)), closer there.
  const float z = 0.5f * hi;
  float p = 7.898209878476337e-05f;
  p = p * z + -0.0008024353883229196f;
  p = p * z + 0.00519005348905921f;
  p = p * z + -0.026854809373617172f;
  p = p * z + 0.11283612251281738f;
  p = p * z + -0.3761262893676758f;
  p = p * z + 1.128379225730896f;
  const float near_zero = 0.5f - (0.35355339059327376f * a) * p;
  const float lower_tail = hi < 2.0f ? near_zero : gauss * r;  // Phi(-|v|)
  return {v < 0.0f ? lower_tail : 1.0f - lower_tail, gauss};
}

SOLA_CPU_INLINE float cpu_gelu_erf(float v) { return v * cpu_gelu_terms(v).cdf; }

SOLA_CPU_INLINE float cpu_gelu_erf_grad(float grad, float v) {
  const CpuGeluTerms s = cpu_gelu_terms(v);
  return grad * (s.cdf + v * (0.3989422804014327f * s.gauss));  // 1 / sqrt(2 pi)
}

SOLA_CPU_INLINE double cpu_tanh(double x) { return std::tanh(x); }

}  // namespace sola
