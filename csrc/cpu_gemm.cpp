// The CPU kernels' tile product: an R x W block of C held in registers while the k loop streams A's
// columns and B's rows. Plain C++ over compile-time widths, compiled once per ISA (SOLA_CPU_CLONES).
#include "cpu_gemm.h"

namespace sola {
namespace cpu {
namespace {

// C[R][W] (+)= A[R][0, k) B[0, k)[W] (AVX-512 float: R x W / 16 accumulator registers); A's entry
// (r, e) at a[r * lda + e], or a[e * lda + r] when kAT.
template <bool kAT, int R, int W, typename acc>
SOLA_CPU_INLINE void gemm_block(int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c, int64_t ldc,
                                bool accumulate) {
  acc t[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) t[r][w] = accumulate ? c[r * ldc + w] : acc(0);
  for (int64_t e = 0; e < k; ++e) {
    const acc* b_row = b + e * ldb;
    for (int r = 0; r < R; ++r) {
      const acc a_re = kAT ? a[e * lda + r] : a[r * lda + e];
      for (int w = 0; w < W; ++w) t[r][w] += a_re * b_row[w];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) c[r * ldc + w] = t[r][w];
}

// Columns [0, W) of C, rows in blocks of R = 16 accumulator vectors' worth (4 rows at 4 vectors,
// 8 at 2, 16 at 1: enough independent FMAs in flight), then of 4, then one at a time.
template <bool kAT, int W, typename acc>
SOLA_CPU_INLINE void gemm_cols(int64_t m, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c,
                               int64_t ldc, bool accumulate) {
  constexpr int R = 16 * static_cast<int>(kCpuVecLen<acc>) / W;
  const int64_t a_row_step = kAT ? 1 : lda;  // where A's row i starts
  int64_t i = 0;
  for (; i + R <= m; i += R) gemm_block<kAT, R, W>(k, a + i * a_row_step, lda, b, ldb, c + i * ldc, ldc, accumulate);
  if constexpr (R > 4)
    for (; i + 4 <= m; i += 4) gemm_block<kAT, 4, W>(k, a + i * a_row_step, lda, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < m; ++i) gemm_block<kAT, 1, W>(k, a + i * a_row_step, lda, b, ldb, c + i * ldc, ldc, accumulate);
}

// C's columns in the widest steps that fit (4, 2, then 1 vector), each over all rows.
template <bool kAT, typename acc>
SOLA_CPU_CLONES void gemm_any(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb,
                              acc* c, int64_t ldc, bool accumulate) {
  constexpr int V = static_cast<int>(kCpuVecLen<acc>);
  for (int64_t j = 0; j < n;) {
    if (n - j >= 4 * V) {
      gemm_cols<kAT, 4 * V>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate);
      j += 4 * V;
    } else if (n - j >= 2 * V) {
      gemm_cols<kAT, 2 * V>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate);
      j += 2 * V;
    } else {
      gemm_cols<kAT, V>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate);
      j += V;
    }
  }
}

}  // namespace

template <typename acc>
void gemm(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c, int64_t ldc,
          bool accumulate) {
  gemm_any<false>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

template <typename acc>
void gemm_at(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c,
             int64_t ldc, bool accumulate) {
  gemm_any<true>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

#define SOLA_INSTANTIATE_GEMM(acc)                                                                           \
  template void gemm<acc>(int64_t, int64_t, int64_t, const acc*, int64_t, const acc*, int64_t, acc*, int64_t, \
                          bool);                                                                             \
  template void gemm_at<acc>(int64_t, int64_t, int64_t, const acc*, int64_t, const acc*, int64_t, acc*, int64_t, bool);
SOLA_INSTANTIATE_GEMM(float)
SOLA_INSTANTIATE_GEMM(double)
#undef SOLA_INSTANTIATE_GEMM

}  // namespace cpu
}  // namespace sola
