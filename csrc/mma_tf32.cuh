// tf32 tensor cores: mma.sync m16n8k8 with fp32 operands rounded to tf32 (8-bit exponent, 10-bit
// mantissa) and fp32 accumulators. fp32 range, so values that would overflow fp16 operands
// (g / den with a tiny denominator, large states) stay finite; a value split into two tf32 parts
// (hi + lo) keeps about 21 of fp32's 24 mantissa bits for two mmas.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k8", .tf32), g = lane / 4, t = lane % 4:
//   A 16x8: a0 = A[g][t]   a1 = A[g+8][t]   a2 = A[g][t+4]   a3 = A[g+8][t+4]
//   B 8x8:  b0 = B[t][g]   b1 = B[t+4][g]
//   C 16x8: c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
// The tensor cores read the top 19 bits of each operand and ignore the low 13.
//
// Only __host__ __device__ code: with SOLA_HOST_EMULATION the emulator supplies the warp-collective mma.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace sola {
namespace tf32 {

SOLA_HD uint32_t bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

SOLA_HD float from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// x rounded to the nearest tf32, ties away from zero (cvt.rna.tf32.f32); inf and NaN stay.
SOLA_HD uint32_t round(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  const uint32_t u = bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? 0x7fffffffu : u;
  return (u + 0x1000u) & 0xffffe000u;
#endif
}

// x = hi + lo with hi its top tf32 bits and lo the rest (whose own low bits the mma drops):
// products with both keep ~2^-21 relative precision. An inf or NaN x goes whole into hi. lo is
// not rounded to tf32: that would gain one bit for a cvt per split in rows_product_tc's inner
// loop, whose row kernels are near their instruction budget at head dim 32.
struct Split {
  uint32_t hi, lo;
};

SOLA_HD Split split(float x) {
  const uint32_t hi = bits(x) & 0xffffe000u;
  const bool finite = (hi & 0x7f800000u) != 0x7f800000u;
  return {hi, finite ? bits(x - from_bits(hi)) : 0u};
}

// d += a * b on the tensor cores (m16n8k8, tf32 operands, fp32 accumulate).
SOLA_HD void mma_1688(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();  // the launchers pick tensor-core kernels on sm_80 and newer only
#elif defined(SOLA_HOST_EMULATION)
  ::emu::mma_1688_tf32(d, a, b);
#endif
}

// ---- 3xTF32: fp32 products on the tensor cores ------------------------------------------------
// a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi in three mmas; the dropped a_lo b_lo and the rounding of lo
// cost up to ~2^-20 relative (hi truncated: |lo| < 2^-10 |x|): fp32-level accuracy.

// x (as bits) = hi + lo for 3xTF32, unlike `split` exact enough for fp32 results and for their
// infinities: hi its top tf32 bits (truncated, so lo keeps x's sign), lo the rest rounded to tf32.
// lo of a finite nonzero x is never 0 (FLT_MIN with x's sign instead, which adds nothing next to any
// hi of the other operand short of 1e38): an inf in the other operand then meets lo as inf * hi
// does, with the same sign, not as inf * 0 = NaN, and infinities come out as fp32 FMAs give them.
// x = 0 keeps lo = 0 (0 * inf is NaN either way; a product with 0 must add exactly nothing). An inf
// goes whole into hi, lo 0; a NaN as the canonical one (the tensor cores would read a NaN whose
// payload sits in the low 13 bits as an inf). A subnormal x below 2^-136 has hi = 0 and meets an inf
// as 0 * inf = NaN (fp32 gives +-inf).
SOLA_HD Split split3(uint32_t u) {
  if ((u & 0x7f800000u) == 0x7f800000u) return {(u & 0x007fffffu) ? 0x7fffffffu : u, 0u};
  const uint32_t hi = u & 0xffffe000u, lo = round(from_bits(u) - from_bits(hi));
  return {hi, (lo & 0x7fffffffu) || !(u & 0x7fffffffu) ? lo : (u & 0x80000000u) | 0x00800000u};
}

// A fragment's registers split by split3.
template <int kN>
struct Frag {
  uint32_t hi[kN], lo[kN];
};

template <int kN>
SOLA_HD Frag<kN> split3(const uint32_t (&x)[kN]) {
  Frag<kN> f;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const Split s = split3(x[i]);
    f.hi[i] = s.hi, f.lo[i] = s.lo;
  }
  return f;
}

// d += a b in 3xTF32, the small terms first.
SOLA_HD void mma_3x(float (&d)[4], const Frag<4>& a, const Frag<2>& b) {
  mma_1688(d, a.lo, b.hi);
  mma_1688(d, a.hi, b.lo);
  mma_1688(d, a.hi, b.hi);
}

// Row and column (within a warp's 16 x 8 tile) of accumulator element e.
SOLA_HD int acc_row(int e, int lane) { return lane / 4 + 8 * (e >> 1); }
SOLA_HD int acc_col(int e, int lane) { return 2 * (lane % 4) + (e & 1); }

}  // namespace tf32
}  // namespace sola
