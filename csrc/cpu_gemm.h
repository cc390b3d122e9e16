// Small dense products for the CPU kernels: C (+)= A B on tiles that sit in L1/L2.
#pragma once

#include <cstdint>

#include "cpu_math.h"

namespace sola {
namespace cpu {

// gemm works in column steps of one 512-bit vector (kCpuVecLen elements), so its callers pad B's and
// C's columns (and row pitches) to a multiple; C's padding columns get whatever B's hold.
template <typename acc>
constexpr int64_t padded_cols(int64_t n) {
  return (n + kCpuVecLen<acc> - 1) / kCpuVecLen<acc> * kCpuVecLen<acc>;
}

// C[m][n] (+)= A[m][k] B[k][n], row-major with row pitches lda, ldb, ldc; n a multiple of
// kCpuVecLen<acc>. Each entry sums over k in order 0, 1, ..., so results are deterministic.
// acc: float or double.
template <typename acc>
void gemm(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c,
          int64_t ldc, bool accumulate);

// The same with A stored transposed: C[m][n] (+)= A^T B for A[k][m] with row pitch lda.
template <typename acc>
void gemm_at(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c,
             int64_t ldc, bool accumulate);

// The build gemm runs: "avx512", "avx2" or "baseline". The CPU's widest, unless SOLA_CPU_GEMM names a
// narrower one (avx2, baseline: the tests run each build on any machine).
const char* gemm_isa();

}  // namespace cpu
}  // namespace sola
