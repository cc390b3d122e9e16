// Building blocks of the flash softmax kernels (fp16/bf16 on tensor cores): mma.sync m16n8k16
// with fp32 accumulators, fragment loads from padded shared-memory tiles, the accumulator -> A
// operand repack that feeds P and dS to the next product straight from registers, and async
// global -> shared tile copies.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4,
// two 16-bit values per 32-bit register, the lower column / row in the low half:
//   A 16x16: a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, +9]   a3 = A[g+8][2t+8, +9]
//   B 16x8:  b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C 16x8:  c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]   (fp32)
// A C tile pair (columns 16kk .. 16kk+15) therefore *is* an A fragment once rounded: that is how
// P = softmax(S) enters P V without a trip through shared memory.
//
// Only __host__ __device__ code and no CUDA runtime headers: with SOLA_HOST_EMULATION the kernels
// compile as host C++ and an emulator supplies the warp-collective mma.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"

#if defined(SOLA_HOST_EMULATION)
#define SOLA_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()
#else
#define SOLA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace sola {
namespace flash {

// Every flash kernel runs 4 warps; each warp owns 16 rows (the mma's M) of the block's tile.
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = 16;
constexpr int kBlockRows = kWarps * kWarpRows;
// Shared-memory rows are padded by 8 elements (16 bytes): the 8 rows a fragment load touches
// then start in different banks, and rows stay 16-byte aligned for cp.async.
constexpr int kPad = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
constexpr bool kIsHalfType = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

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

// Two consecutive elements of a shared-memory row (even column, even leading dim: 4-byte aligned).
template <typename T>
SOLA_HD uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
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

// A = tile[m0 .. m0+15][k0 .. k0+15].
template <typename T>
SOLA_HD FragA load_a(const T* tile, int ld, int m0, int k0, int lane) {
  const T* p = tile + (m0 + lane / 4) * ld + k0 + 2 * (lane % 4);
  return FragA{{load_pair(p), load_pair(p + 8 * ld), load_pair(p + 8), load_pair(p + 8 * ld + 8)}};
}

// B[k][n] = tile[n0 + n][k0 + k]: B is the transpose of 8 tile rows (as K in Q K^T).
template <typename T>
SOLA_HD FragB load_b_trans(const T* tile, int ld, int n0, int k0, int lane) {
  const T* p = tile + (n0 + lane / 4) * ld + k0 + 2 * (lane % 4);
  return FragB{{load_pair(p), load_pair(p + 8)}};
}

// B[k][n] = tile[k0 + k][n0 + n]: B is 16 tile rows as they stand (as V in P V).
template <typename T>
SOLA_HD FragB load_b(const T* tile, int ld, int k0, int n0, int lane) {
  const T* p = tile + (k0 + 2 * (lane % 4)) * ld + n0 + lane / 4;
  return FragB{{pack2(bits_of(p[0]), bits_of(p[ld])), pack2(bits_of(p[8 * ld]), bits_of(p[9 * ld]))}};
}

// Columns 16kk .. 16kk+15 of a 16 x (8 * NT) fp32 accumulator, rounded to T, as an A fragment.
template <typename T, int NT>
SOLA_HD FragA acc_to_a(const float (&c)[NT][4], int kk) {
  auto two = [](float lo, float hi) { return pack2(bits_of(static_cast<T>(lo)), bits_of(static_cast<T>(hi))); };
  const float* l = c[2 * kk];
  const float* r = c[2 * kk + 1];
  return FragA{{two(l[0], l[1]), two(l[2], l[3]), two(r[0], r[1]), two(r[2], r[3])}};
}

template <int NT>
SOLA_HD void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[n][e] = 0.f;
}

// Column (within the tile) of accumulator element e of n8 tile n, and its row (0..15 in the warp).
SOLA_HD int acc_col(int n, int e, int lane) { return 8 * n + 2 * (lane % 4) + (e & 1); }
SOLA_HD int acc_row(int e, int lane) { return lane / 4 + 8 * (e >> 1); }

// ---- async global -> shared copies ------------------------------------------------------------

SOLA_HD void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  std::memcpy(smem, gmem, 16);
#endif
}

SOLA_HD void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits for this thread's copies; a __syncthreads() after it makes everyone's visible.
SOLA_HD void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// tile[r][c] = x(b, h, row0 + r)[col0 + c] for r < rows and col0 + c < cols, else 0, for a
// kRows x kCols tile (kCols a multiple of 8) with leading dim kCols + kPad. Whole 16-byte pieces
// of aligned rows go by cp.async; edges and misaligned views element by element.
template <int kRows, int kCols, typename T>
SOLA_HD void load_tile(T* tile, const View4& x, int64_t b, int64_t h, int64_t row0, int64_t rows, int col0, int cols,
                       bool aligned, int tid) {
  constexpr int kPieces = kCols / 8;
  constexpr int kLd = kCols + kPad;
  for (int i = tid; i < kRows * kPieces; i += kThreads) {
    const int r = i / kPieces, c = (i % kPieces) * 8;
    T* dst = tile + r * kLd + c;
    const T* src = x.row<const T>(b, h, row0 + (r < rows ? r : 0)) + col0 + c;
    if (r < rows && aligned && col0 + c + 8 <= cols) {
      cp_async_16(dst, src);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = r < rows && col0 + c + e < cols ? src[e] : T(0.f);
    }
  }
}

// Bytes of a row-padded shared-memory tile of `rows` x kCols.
template <typename T, int kCols>
constexpr int tile_bytes(int rows) {
  return rows * (kCols + kPad) * static_cast<int>(sizeof(T));
}

}  // namespace flash
}  // namespace sola
