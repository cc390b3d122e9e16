// Host math for the CPU kernels, written so that loops calling it auto-vectorise: libm's expf is an
// opaque scalar call, which made exp the bottleneck of both ops (one per score, one per feature).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

// Compiles a hot function once per ISA (AVX-512, AVX2 + FMA, baseline x86-64) and lets the loader
// pick one (glibc ifunc), so one build uses the CPU's widest vectors. GCC 12+ on x86-64 glibc Linux
// (SOLA_CPU_X86_DISPATCH); elsewhere the one baseline build.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define SOLA_CPU_X86_DISPATCH 1
#define SOLA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SOLA_CPU_X86_DISPATCH 0
#define SOLA_CPU_CLONES
#endif
// For the helpers of SOLA_CPU_CLONES functions: inlined, so they compile with each clone's ISA.
#define SOLA_CPU_INLINE [[gnu::always_inline]] inline

namespace sola {

// acc elements in 64 bytes, one AVX-512 vector: the CPU kernels' column step and lane count.
template <typename acc>
constexpr int64_t kCpuVecLen = 64 / sizeof(acc);

// exp(x) for float, within 2 ulp of std::exp over the normal range (Cephes' expf: x = n ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for e^r, 2^n built in the exponent bits). Branch-free: the edge
// cases are selects. exp(x) underflows to 0 below -87.3 (where std::exp returns denormals) and is
// +inf above 88.72; NaN stays NaN. kNonPositive: x <= 0 or NaN only (cpu_exp_nonpositive), which
// drops the overflow side's selects.
template <bool kNonPositive>
inline float cpu_exp_impl(float x) {
  constexpr float kHi = 88.72283905206835f, kLo = -87.3365447504019f;
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float xc = x < kLo ? kLo : (!kNonPositive && x > kHi ? kHi : (x == x ? x : 0.0f));
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n);
  if constexpr (kNonPositive) {
    const float y = er * std::bit_cast<float>((e + 127) << 23);
    return x != x ? x : (x < kLo ? 0.0f : y);
  } else {
    // 2^n for n in [-126, 128]: 2^128 is not a float, so n = 128 scales by 2^127 and then by 2.
    const int32_t e_low = e > 127 ? 127 : e;
    const float y = er * std::bit_cast<float>((e_low + 127) << 23) * (e > 127 ? 2.0f : 1.0f);
    return x != x ? x : (x < kLo ? 0.0f : (x > kHi ? std::numeric_limits<float>::infinity() : y));
  }
}

// exp(x) for double, within 1 ulp of std::exp over the normal range (the same reduction, e^r by its
// Taylor series to r^13: the truncation is below 1e-17 relative for |r| <= ln2/2). exp(x) underflows
// to 0 below -708.39 (where std::exp returns denormals) and is +inf above 709.78; NaN stays NaN.
template <bool kNonPositive>
inline double cpu_exp_impl(double x) {
  constexpr double kHi = 709.782712893383973096, kLo = -708.396418532264106224;
  constexpr double kLog2e = 1.4426950408889634074, kLn2Hi = 6.93145751953125e-1, kLn2Lo = 1.42860682030941723212e-6;
  constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to the nearest integer
  constexpr double kInvFactorial[14] = {1.0,
                                        1.0,
                                        0.5,
                                        0.16666666666666666,
                                        0.041666666666666664,
                                        0.008333333333333333,
                                        0.001388888888888889,
                                        0.0001984126984126984,
                                        2.48015873015873e-05,
                                        2.7557319223985893e-06,
                                        2.755731922398589e-07,
                                        2.505210838544172e-08,
                                        2.08767569878681e-09,
                                        1.6059043836821613e-10};
  const double xc = x < kLo ? kLo : (!kNonPositive && x > kHi ? kHi : (x == x ? x : 0.0));
  const double rounded = xc * kLog2e + kRound;  // n + 1.5 * 2^52: n sits in the low mantissa bits
  const double n = rounded - kRound;
  const double r = (xc - n * kLn2Hi) - n * kLn2Lo;
  double er = kInvFactorial[13];
  for (int i = 12; i >= 0; --i) er = er * r + kInvFactorial[i];
  // n as an integer by subtracting bit patterns: AVX2 has no double -> int64 conversion, which kept
  // the loops calling this scalar there.
  const int64_t e = std::bit_cast<int64_t>(rounded) - std::bit_cast<int64_t>(kRound);
  if constexpr (kNonPositive) {
    const double y = er * std::bit_cast<double>((e + 1023) << 52);
    return x != x ? x : (x < kLo ? 0.0 : y);
  } else {
    // 2^n for n in [-1022, 1024]: 2^1024 is not a double, so n = 1024 scales by 2^1023 and then by 2.
    const int64_t e_low = e > 1023 ? 1023 : e;
    const double y = er * std::bit_cast<double>((e_low + 1023) << 52) * (e > 1023 ? 2.0 : 1.0);
    return x != x ? x : (x < kLo ? 0.0 : (x > kHi ? std::numeric_limits<double>::infinity() : y));
  }
}

template <typename T>
inline T cpu_exp(T x) {
  return cpu_exp_impl<false>(x);
}

// exp(x) for x <= 0 or NaN (a softmax's exp(s - max)); other x give garbage.
template <typename T>
inline T cpu_exp_nonpositive(T x) {
  return cpu_exp_impl<true>(x);
}

}  // namespace sola
