// The CPU kernels' tile product: an R x NV-vector block of C held in registers while the k loop streams
// A's columns and B's rows. Plain C++ over GCC vector types, built once per ISA with that ISA's vector
// width and register budget (AVX-512: 64-byte vectors, 24 accumulators; AVX2: 32 bytes, 12; baseline:
// 16 bytes, 12), the widest the CPU has picked when the library loads.
#include "cpu_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace sola {
namespace cpu {
namespace {

template <int kBytes, typename acc>
using Vec [[gnu::vector_size(kBytes)]] = acc;

// C[R][NV vectors] (+)= A[R][0, k) B[0, k)[NV vectors]; A's entry (r, e) at a[r * lda + e], or
// a[e * lda + r] when kAT. The loops over r and w unroll completely, so t stays in registers.
template <int kBytes, bool kAT, int R, int NV, typename acc>
SOLA_CPU_INLINE void gemm_block(int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c, int64_t ldc,
                                bool accumulate) {
  using V = Vec<kBytes, acc>;
  constexpr int L = kBytes / sizeof(acc);
  V t[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int w = 0; w < NV; ++w) {
      if (accumulate) std::memcpy(&t[r][w], c + r * ldc + w * L, sizeof(V));
      else t[r][w] = V{};
    }
  for (int64_t e = 0; e < k; ++e) {
    V b_row[NV];
#pragma GCC unroll 8
    for (int w = 0; w < NV; ++w) std::memcpy(&b_row[w], b + e * ldb + w * L, sizeof(V));
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const acc a_re = kAT ? a[e * lda + r] : a[r * lda + e];
#pragma GCC unroll 8
      for (int w = 0; w < NV; ++w) t[r][w] += a_re * b_row[w];
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int w = 0; w < NV; ++w) std::memcpy(c + r * ldc + w * L, &t[r][w], sizeof(V));
}

// Rows [i, m) of NV vectors' columns: blocks of R rows, then of R / 2, ..., 1.
template <int kBytes, bool kAT, int R, int NV, typename acc>
SOLA_CPU_INLINE void gemm_rows(int64_t i, int64_t m, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb,
                               acc* c, int64_t ldc, bool accumulate) {
  const int64_t a_row_step = kAT ? 1 : lda;  // where A's row i starts
  for (; i + R <= m; i += R)
    gemm_block<kBytes, kAT, R, NV>(k, a + i * a_row_step, lda, b, ldb, c + i * ldc, ldc, accumulate);
  if constexpr (R > 1) gemm_rows<kBytes, kAT, R / 2, NV>(i, m, k, a, lda, b, ldb, c, ldc, accumulate);
}

// One ISA's gemm: kBytes-wide vectors, kAccRegs of them for accumulators (the rest hold B's row and
// A's broadcast), at most kMaxRows rows a block. C's columns in the widest steps of 4, 2 or 1
// kCpuVecLen that keep at least two rows a block, each over all rows.
template <int kBytes, int kAccRegs, int kMaxRows, bool kAT, typename acc>
SOLA_CPU_INLINE void gemm_blocked(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb,
                                  acc* c, int64_t ldc, bool accumulate) {
  constexpr int S = 64 / kBytes;  // vectors per kCpuVecLen columns
  constexpr int64_t W = kCpuVecLen<acc>;
  constexpr auto rows_of = [](int nv) { return std::min(kAccRegs / nv, kMaxRows); };
  for (int64_t j = 0; j < n;) {
    if (n - j >= 4 * W && rows_of(4 * S) >= 2) {
      gemm_rows<kBytes, kAT, rows_of(4 * S), 4 * S>(0, m, k, a, lda, b + j, ldb, c + j, ldc, accumulate);
      j += 4 * W;
    } else if (n - j >= 2 * W && rows_of(2 * S) >= 2) {
      gemm_rows<kBytes, kAT, rows_of(2 * S), 2 * S>(0, m, k, a, lda, b + j, ldb, c + j, ldc, accumulate);
      j += 2 * W;
    } else {
      gemm_rows<kBytes, kAT, rows_of(S), S>(0, m, k, a, lda, b + j, ldb, c + j, ldc, accumulate);
      j += W;
    }
  }
}

template <bool kAT, typename acc>
using GemmFn = void (*)(int64_t, int64_t, int64_t, const acc*, int64_t, const acc*, int64_t, acc*, int64_t, bool);

template <bool kAT, typename acc>
void gemm_baseline(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c,
                   int64_t ldc, bool accumulate) {
  gemm_blocked<16, 12, 16, kAT>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

#if SOLA_CPU_X86_DISPATCH
template <bool kAT, typename acc>
[[gnu::target("arch=x86-64-v4")]] void gemm_avx512(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda,
                                                   const acc* b, int64_t ldb, acc* c, int64_t ldc, bool accumulate) {
  gemm_blocked<64, 24, 8, kAT>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

template <bool kAT, typename acc>
[[gnu::target("arch=x86-64-v3")]] void gemm_avx2(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda,
                                                 const acc* b, int64_t ldb, acc* c, int64_t ldc, bool accumulate) {
  gemm_blocked<32, 12, 16, kAT>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}
#endif

enum class GemmIsa { kAvx512, kAvx2, kBaseline };

// The CPU's widest build, or a narrower one named by SOLA_CPU_GEMM (avx2, baseline), so the tests run
// each build on any machine; a build the CPU cannot run is never picked.
GemmIsa pick_isa() {
  const char* env = std::getenv("SOLA_CPU_GEMM");
  const std::string asked = env ? env : "";
#if SOLA_CPU_X86_DISPATCH
  if (asked != "avx2" && asked != "baseline" && __builtin_cpu_supports("x86-64-v4")) return GemmIsa::kAvx512;
  if (asked != "baseline" && __builtin_cpu_supports("x86-64-v3")) return GemmIsa::kAvx2;
#endif
  return GemmIsa::kBaseline;
}

GemmIsa isa() {
  static const GemmIsa chosen = pick_isa();
  return chosen;
}

template <bool kAT, typename acc>
GemmFn<kAT, acc> gemm_for_isa() {
#if SOLA_CPU_X86_DISPATCH
  if (isa() == GemmIsa::kAvx512) return gemm_avx512<kAT, acc>;
  if (isa() == GemmIsa::kAvx2) return gemm_avx2<kAT, acc>;
#endif
  return gemm_baseline<kAT, acc>;
}

}  // namespace

template <typename acc>
void gemm(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c, int64_t ldc,
          bool accumulate) {
  static const GemmFn<false, acc> fn = gemm_for_isa<false, acc>();
  fn(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

template <typename acc>
void gemm_at(int64_t m, int64_t n, int64_t k, const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c,
             int64_t ldc, bool accumulate) {
  static const GemmFn<true, acc> fn = gemm_for_isa<true, acc>();
  fn(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

const char* gemm_isa() {
  return isa() == GemmIsa::kAvx512 ? "avx512" : isa() == GemmIsa::kAvx2 ? "avx2" : "baseline";
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
