// Host math for the CPU kernels, written so that loops calling it auto-vectorise: libm's expf is an
// opaque scalar call, which made exp the bottleneck of both ops (one per score, one per feature).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

// Compiles a hot function once per ISA (AVX-512, AVX2 + FMA, baseline x86-64) and lets the loader
// pick one (glibc ifunc), so one build uses the CPU's widest vectors. GCC 12+ on x86-64 glibc Linux
// (SOLA_CPU_X86_DISPATCH); elsewhere, or with SOLA_CPU_NO_CLONES (the emulator's ThreadSanitizer build:
// an instrumented ifunc resolver runs before the TSan runtime is up and crashes), the one baseline build.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12 && !defined(SOLA_CPU_NO_CLONES)
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

// What cpu_exp needs of each type: its bits as an integer, the mantissa width and exponent bias, the
// range where exp is a normal number (below kLo it returns 0 where std::exp returns denormals, above
// kHi +inf), ln 2 split in two for an exact-enough reduction, and e^r for |r| <= ln2 / 2.
template <typename T>
struct ExpTraits;

template <>
struct ExpTraits<float> {  // Cephes' expf: within 2 ulp of std::exp
  using Bits = int32_t;
  static constexpr int kMantissa = 23, kBias = 127;
  static constexpr float kHi = 88.72283905206835f, kLo = -87.3365447504019f;
  static constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static float exp_reduced(float r) {  // a degree-6 polynomial
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * r * r + r + 1.0f;
  }
};

template <>
struct ExpTraits<double> {  // within 1 ulp of std::exp
  using Bits = int64_t;
  static constexpr int kMantissa = 52, kBias = 1023;
  static constexpr double kHi = 709.782712893383973096, kLo = -708.396418532264106224;
  static constexpr double kLog2e = 1.4426950408889634074, kLn2Hi = 6.93145751953125e-1,
                          kLn2Lo = 1.42860682030941723212e-6;
  static double exp_reduced(double r) {  // Taylor to r^13: truncation below 1e-17 relative
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
    double er = kInvFactorial[13];
    for (int i = 12; i >= 0; --i) er = er * r + kInvFactorial[i];
    return er;
  }
};

// exp(x) = 2^n e^r with x = n ln2 + r. Branch-free (the edge cases are selects); NaN stays NaN.
// kNonPositive: x <= 0 or NaN only (cpu_exp_nonpositive), which drops the overflow side's selects;
// !kMayBeNaN drops the NaN's: a NaN x still comes out NaN, through the polynomial (er), but no select
// picks it (cpu_exp_nonpositive_not_nan, common.h's kernel_exp<false>).
template <bool kNonPositive, typename T, bool kMayBeNaN = true>
inline T cpu_exp_impl(T x) {
  using E = ExpTraits<T>;
  using Bits = typename E::Bits;
  constexpr T kRound = T(3) * T(Bits(1) << (E::kMantissa - 1));  // 1.5 * 2^mantissa: + it rounds to an integer
  const T xc = x < E::kLo ? E::kLo : (!kNonPositive && x > E::kHi ? E::kHi : (!kMayBeNaN || x == x ? x : T(0)));
  const T rounded = xc * E::kLog2e + kRound;  // n + kRound: n sits in the low mantissa bits
  const T n = rounded - kRound;
  const T er = E::exp_reduced((xc - n * E::kLn2Hi) - n * E::kLn2Lo);
  // n as an integer by subtracting bit patterns: AVX2 has no double -> int64 conversion, which kept
  // the loops calling this scalar there.
  const Bits e = std::bit_cast<Bits>(rounded) - std::bit_cast<Bits>(kRound);
  if constexpr (kNonPositive) {
    const T y = er * std::bit_cast<T>((e + E::kBias) << E::kMantissa);
    if constexpr (!kMayBeNaN) return x < E::kLo ? T(0) : y;
    return x != x ? x : (x < E::kLo ? T(0) : y);
  } else {
    // 2^n for n up to kBias + 1, which is not a T: that n scales by 2^kBias and then by 2.
    const Bits e_low = e > E::kBias ? Bits(E::kBias) : e;
    const T y = er * std::bit_cast<T>((e_low + E::kBias) << E::kMantissa) * (e > E::kBias ? T(2) : T(1));
    const T in_range = x < E::kLo ? T(0) : (x > E::kHi ? std::numeric_limits<T>::infinity() : y);
    if constexpr (!kMayBeNaN) return in_range;
    return x != x ? x : in_range;
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

// exp(x) for x <= 0, never NaN: cpu_exp_nonpositive without its two NaN selects (GELU's exp(-v^2 / 2), ~15%
// of bias_gelu's CPU forward).
template <typename T>
inline T cpu_exp_nonpositive_not_nan(T x) {
  return cpu_exp_impl<true, T, false>(x);
}

// One row converted between the input dtype and acc: the CPU kernels' loads and stores.
template <typename scalar_t, typename acc>
SOLA_CPU_INLINE void load_row(const scalar_t* src, int64_t d, acc* dst) {
  for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<acc>(src[e]);
}

template <typename scalar_t, typename acc>
SOLA_CPU_INLINE void store_row(const acc* src, int64_t d, scalar_t* dst) {
  for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<scalar_t>(src[e]);
}

// A row of d values as acc: the row itself where scalar_t is acc (fp32, fp64: read in place), else
// converted into buf (d).
template <typename scalar_t, typename acc>
SOLA_CPU_INLINE const acc* acc_row(const scalar_t* src, int64_t d, acc* buf) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    return src;
  } else {
    load_row(src, d, buf);
    return buf;
  }
}

}  // namespace sola
