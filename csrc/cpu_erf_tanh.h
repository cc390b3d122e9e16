// erf and tanh of fp32 values for the CPU kernels, written as cpu_math.h's cpu_exp is: branch-free (both
// sides of each range split computed, then a select), so loops calling them auto-vectorise, where libm's
// erff / tanhf are opaque scalar calls (bias_gelu's CPU kernels took 4-5x torch's time with them). The
// polynomials are least-squares fits on Chebyshev nodes (mpmath, 40 digits) rounded to fp32. Measured
// over all 2^32 fp32 values against libm's double erf / tanh: erf within 2.8 ulp for |x| < 1 and within
// 9.1e-8 (1.5 * 2^-24) absolute for |x| >= 1 (where erf is within 0.16 of +-1), tanh within 1.4 ulp;
// NaN and the signs of zeros as libm's. fp64 keeps libm's erf and tanh (scalar calls).
#pragma once

#include <cmath>

#include "cpu_math.h"

namespace sola {

// erf(x): x * P(x^2) for |x| < 1; 1 - exp(-x^2) * Q(1 / |x|) for 1 <= |x| < 4 (erfc(x) exp(x^2) is smooth
// in 1 / x); +-1 beyond (erfc(4) = 1.5e-8 rounds away). NaN stays NaN; the sign of a zero is kept.
SOLA_CPU_INLINE float cpu_erf(float x) {
  const float a = std::fabs(x), z = a * a;
  float p = 7.898209878476337e-05f;
  p = p * z + -0.0008024353883229196f;
  p = p * z + 0.00519005348905921f;
  p = p * z + -0.026854809373617172f;
  p = p * z + 0.11283612251281738f;
  p = p * z + -0.3761262893676758f;
  p = p * z + 1.128379225730896f;
  const float small = a * p;
  const float t = 1.0f / (a < 1.0f ? 1.0f : a);  // the lanes of the other ranges divide by 1
  float q = -0.01694679632782936f;
  q = q * t + 0.11689748615026474f;
  q = q * t + -0.3475888967514038f;
  q = q * t + 0.5694930553436279f;
  q = q * t + -0.5024152994155884f;
  q = q * t + 0.04987014830112457f;
  q = q * t + 0.5579383373260498f;
  q = q * t + 0.0003356043016538024f;
  const float large = 1.0f - cpu_exp(-z) * q;
  const float r = a < 1.0f ? small : (a < 4.0f ? large : 1.0f);
  return x != x ? x : std::copysign(r, x);
}

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

SOLA_CPU_INLINE double cpu_erf(double x) { return std::erf(x); }
SOLA_CPU_INLINE double cpu_tanh(double x) { return std::tanh(x); }

}  // namespace sola
