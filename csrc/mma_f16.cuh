// 16-bit tensor cores: mma.sync m16n8k16 (fp16 or bf16 operands, fp32 accumulators) and the
// ldmatrix fragment loads from padded row-major shared-memory tiles, shared by the flash softmax
// kernels and the linear-attention tensor-core kernels.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4,
// two 16-bit values per 32-bit register, the lower column / row in the low half:
//   A 16x16: a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, +9]   a3 = A[g+8][2t+8, +9]
//   B 16x8:  b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C 16x8:  c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]   (fp32; as m16n8k8's)
//
// Only __host__ __device__ code: with SOLA_HOST_EMULATION the emulator supplies the warp collectives.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace sola {
namespace mma16 {

struct FragA {
  uint32_t x[4];
};
struct FragB {
  uint32_t x[2];
};

SOLA_HD uint32_t pack2(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

template <typename T>
SOLA_HD uint16_t bits_of(T x) {
  return x.x;
}

// d += a * b on the tensor cores, fp32 accumulate.
template <typename T>
SOLA_HD void mma_16816(float (&d)[4], const FragA& a, const FragB& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::Half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // the launchers only pick these kernels on sm_80 and newer
#elif defined(SOLA_HOST_EMULATION)
  ::emu::mma_16816<T>(d, a.x, b.x);
#endif
}

// ---- fragment loads from a row-major shared-memory tile with leading dim ld -------------------
// ldmatrix.x4 reads four 8x8 16-bit matrices; lanes 8i .. 8i+7 give the row addresses of matrix i
// (16-byte aligned: ld and the column offsets are multiples of 8). Register i of lane L gets
// row L/4, columns 2(L%4) and +1 of matrix i; with .trans, column L/4 of rows 2(L%4) and +1.

template <bool kTrans>
SOLA_HD void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(SOLA_HOST_EMULATION)
  ::emu::ldmatrix_x4(r, row, kTrans);
#endif
}

// A = tile[m0 .. m0+15][k0 .. k0+15].
template <typename T>
SOLA_HD FragA load_a(const T* tile, int ld, int m0, int k0, int lane) {
  const int i = lane / 8;  // matrices: rows +0 / +8 (i % 2), columns +0 / +8 (i / 2)
  FragA a;
  ldmatrix_x4<false>(a.x, tile + (m0 + lane % 8 + 8 * (i % 2)) * ld + k0 + 8 * (i / 2));
  return a;
}

// Two B fragments (n8 tiles n0 and n0 + 8, one k16 step).
struct FragB2 {
  FragB lo, hi;
};

// B[k][n] = tile[n0 + n][k0 + k]: the transpose of 16 tile rows (as K in Q K^T).
template <typename T>
SOLA_HD FragB2 load_b_trans(const T* tile, int ld, int n0, int k0, int lane) {
  const int i = lane / 8;  // matrices: columns +0 / +8 (i % 2), rows +0 / +8 (i / 2)
  uint32_t r[4];
  ldmatrix_x4<false>(r, tile + (n0 + lane % 8 + 8 * (i / 2)) * ld + k0 + 8 * (i % 2));
  return FragB2{{{r[0], r[1]}}, {{r[2], r[3]}}};
}

// B[k][n] = tile[k0 + k][n0 + n]: 16 tile rows as they stand (as V in P V).
template <typename T>
SOLA_HD FragB2 load_b(const T* tile, int ld, int k0, int n0, int lane) {
  const int i = lane / 8;  // matrices: rows +0 / +8 (i % 2), columns +0 / +8 (i / 2)
  uint32_t r[4];
  ldmatrix_x4<true>(r, tile + (k0 + lane % 8 + 8 * (i % 2)) * ld + n0 + 8 * (i / 2));
  return FragB2{{{r[0], r[1]}}, {{r[2], r[3]}}};
}

// A[m][k] = tile[k0 + k][m0 + m]: the transpose of 16 tile rows (as phi(k)^T in phi(k)^T v, the
// tile holding tokens as rows).
template <typename T>
SOLA_HD FragA load_a_trans(const T* tile, int ld, int m0, int k0, int lane) {
  const int i = lane / 8;  // matrices: A rows (tile columns) +0 / +8 (i % 2), A columns (tile rows) +0 / +8 (i / 2)
  FragA a;
  ldmatrix_x4<true>(a.x, tile + (k0 + lane % 8 + 8 * (i / 2)) * ld + m0 + 8 * (i % 2));
  return a;
}

}  // namespace mma16
}  // namespace sola
