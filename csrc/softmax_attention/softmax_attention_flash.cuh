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
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"

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
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;


// Units of the scores fed to exp: base 2 on tensor cores (one ex2 per score, as FlashAttention),
// natural for fp32/fp64, where rounding scale * log2(e) and lse * log2(e) would each cost up to
// an ulp of a large score (1e-4 relative in P at |score| ~ 2000 in fp32).
template <typename T>
struct ExpUnits {
  using acc = acc_t<T>;
  static constexpr bool kBase2 = kIsHalfType<T>;
  static constexpr acc kPerNat = kBase2 ? acc(kLog2e) : acc(1);  // units per natural unit
  // Base 2: one MUFU.EX2 (ex2.approx.ftz, 2 ulp). exp2f would wrap it in a subnormal-result fixup
  // (a compare and two multiplies per score, ~15% of the forward's instructions at head dim 32);
  // results below 2^-126 flush to 0 instead, against a row sum >= 1.
  static SOLA_HD acc exp(acc x) {
    if constexpr (kBase2) {
#if defined(__CUDA_ARCH__)
      float r;
      asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
      return r;
#else
      const float r = std::exp2(x);
      return r < std::numeric_limits<float>::min() ? 0.f : r;
#endif
    } else {
      return std::exp(x);
    }
  }
  static SOLA_HD acc to_nat(acc x) { return kBase2 ? x * acc(kLn2) : x; }
  // score * scale rounded on its own, never fused into a following subtraction: the backward
  // then recomputes exactly the forward's scaled score (same products in the same order), and
  // its rounding cancels against the saved lse as it does in torch's softmax.
  static SOLA_HD acc scaled(acc s, acc scale) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<acc, double>) return __dmul_rn(s, scale);
    else return __fmul_rn(s, scale);
#else
    volatile acc x = s * scale;
    return x;
#endif
  }
};

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

// Columns 16kk .. 16kk+15 of a 16 x (8 * NT) fp32 accumulator, rounded to T, as an A fragment.
template <typename T, int NT>
SOLA_HD FragA acc_to_a(const float (&c)[NT][4], int kk) {
  auto two = [](float lo, float hi) { return pack2(bits_of(static_cast<T>(lo)), bits_of(static_cast<T>(hi))); };
  const float* l = c[2 * kk];
  const float* r = c[2 * kk + 1];
  return FragA{{two(l[0], l[1]), two(l[2], l[3]), two(r[0], r[1]), two(r[2], r[3])}};
}

template <int NT, typename acc>
SOLA_HD void zero(acc (&c)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[n][e] = acc(0);
}

// Column (within the tile) of accumulator element e of n8 tile n, and its row (0..15 in the warp).
SOLA_HD int acc_col(int n, int e, int lane) { return 8 * n + 2 * (lane % 4) + (e & 1); }
SOLA_HD int acc_row(int e, int lane) { return lane / 4 + 8 * (e >> 1); }

// f(n, e, in_range) for every element of a warp's 16 x 8 kNT accumulator tile, in_range saying
// whether its column is below `valid`. Full tiles (all but the last) take a branch without the
// per-element compare-select.
template <int kNT, typename F>
SOLA_HD void for_each_acc(int64_t valid, int lane, F f) {
  if (valid >= 8 * kNT) {
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(n, e, true);
  } else {
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(n, e, acc_col(n, e, lane) < valid);
  }
}

// ---- which work item a block's tile index names -----------------------------------------------

// Tile `tile` of a grid-stride loop over (b, h, block of kBlock rows, column chunk of kCols) with
// `chunks` chunks, the chunk varying fastest.
struct TileIndex {
  int64_t b, h, bh, row0;
  int col0;
};

template <int kBlock, int kCols>
SOLA_HD TileIndex tile_index(int64_t tile, int64_t rows, int64_t H, int64_t chunks) {
  const int64_t blocks = ceil_div(rows, kBlock);
  const int64_t bh = tile / chunks / blocks;
  return TileIndex{bh / H, bh % H, bh, tile / chunks % blocks * kBlock, static_cast<int>(tile % chunks) * kCols};
}

// Column chunks of kCols that cover `cols` output columns: only as many as hold a column, so a
// head dim below its bucket (Dv = 64 in the 256 bucket, D = 130) recomputes S no more than needed.
template <int kCols>
SOLA_HD int64_t column_chunks(int64_t cols) {
  return ceil_div(cols, kCols);
}

// ---- async global -> shared copies ------------------------------------------------------------

SOLA_HD void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_16(smem, gmem);  // lands at this thread's wait, as on the GPU
#else
  std::memcpy(smem, gmem, 16);
#endif
}

SOLA_HD void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_commit();
#endif
}

// Waits for this thread's copies; a __syncthreads() after it makes everyone's visible.
SOLA_HD void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_wait_all();
#endif
}

// Waits for all but this thread's kPending most recently committed copy groups.
template <int kPending>
SOLA_HD void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_wait_group(kPending);
#endif
}

// 16 bytes of T (kVec16<T> elements): one cp.async piece, one vector load.
template <typename T>
using Vec16 = Vec<T, kVec16<T>>;

template <typename T>
SOLA_HD Vec16<T> load16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

// True when x's rows allow 16-byte pieces at column multiples of kVec16<T>.
template <typename T>
SOLA_HD bool rows_aligned16(const View4& x) {
  return rows_aligned<T>(x, kVec16<T>);
}

// tile[r][c] = x(b, h, row0 + r)[col0 + c] for r < rows and col0 + c < cols, else 0, for a
// kRows x kCols tile (kCols a multiple of 8) with leading dim kCols + kPad. Whole 16-byte pieces
// of aligned rows (rows_aligned16) go by cp.async; edges and misaligned views element by element.
// A thread copies the same column piece of every kRowsPerPass-th row, so its addresses are one
// base plus a row step (per piece it was a 64-bit b * sb + h * sh + row * sn: ~45 instructions,
// now ~26). Not unrolled: unrolled, the compiler kept every pass's address live across the
// caller's loop (+20 to +60 registers in the forward).
template <int kRows, int kCols, typename T>
SOLA_HD void load_tile(T* tile, const View4& x, int64_t b, int64_t h, int64_t row0, int64_t rows, int col0, int cols,
                       bool aligned, int tid) {
  constexpr int kV = kVec16<T>, kPieces = kCols / kV;
  constexpr int kLd = kCols + kPad;
  static_assert(kThreads % kPieces == 0 && kRows % (kThreads / kPieces) == 0, "a tile must be whole passes");
  constexpr int kRowsPerPass = kThreads / kPieces, kPasses = kRows / kRowsPerPass;
  const int r0 = tid / kPieces, c = (tid % kPieces) * kV;
  const T* const src0 = x.row<const T>(b, h, row0) + col0 + c;
  const bool whole = aligned && col0 + c + kV <= cols;
  int64_t offset = r0 * x.sn;  // src0 + offset is row r only while r < rows
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass, offset += kRowsPerPass * x.sn) {
    const int r = r0 + pass * kRowsPerPass;
    T* const dst = tile + r * kLd + c;
    if (r < rows && whole) {
      cp_async_16(dst, src0 + offset);
    } else {
#pragma unroll
      for (int e = 0; e < kV; ++e) dst[e] = r < rows && col0 + c + e < cols ? src0[offset + e] : T(0.f);
    }
  }
}

// ---- the two products of every flash kernel, per warp -------------------------------------------

// c[16 x 8 kNT] += A B^T over kD columns: A = rows a0 .. a0+15 of tile a, B^T = the first 8 kNT
// rows of tile bt (both leading dim kD + kPad). Q K^T, K Q^T, dO V^T, V dO^T.
template <typename T, int kD, int kNT, typename acc>
SOLA_HD void gemm_abt(acc (&c)[kNT][4], const T* a, int a0, const T* bt, int lane) {
  constexpr int kLd = kD + kPad;
  if constexpr (kIsHalfType<T>) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const FragA af = load_a(a, kLd, a0, 16 * kk, lane);
#pragma unroll
      for (int n = 0; n < kNT; n += 2) {
        const FragB2 bf = load_b_trans(bt, kLd, 8 * n, 16 * kk, lane);
        mma_16816<T>(c[n], af, bf.lo);
        mma_16816<T>(c[n + 1], af, bf.hi);
      }
    }
  } else {
    // This lane's rows g, g+8 of A and, per n8 tile, rows 2t, 2t+1 of B^T; 16-byte loads along k.
    const T* a_lo = a + (a0 + lane / 4) * kLd;
    const T* b_lane = bt + 2 * (lane % 4) * kLd;
    for (int k = 0; k < kD; k += kVec16<T>) {
      const Vec16<T> x0 = load16(a_lo + k), x1 = load16(a_lo + 8 * kLd + k);
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        const Vec16<T> y0 = load16(b_lane + 8 * n * kLd + k), y1 = load16(b_lane + (8 * n + 1) * kLd + k);
#pragma unroll
        for (int v = 0; v < kVec16<T>; ++v) {
          c[n][0] += x0.v[v] * y0.v[v];
          c[n][1] += x0.v[v] * y1.v[v];
          c[n][2] += x1.v[v] * y0.v[v];
          c[n][3] += x1.v[v] * y1.v[v];
        }
      }
    }
  }
}

// Row stride of a warp's SIMT scratch holding a 16 x kCols accumulator tile.
template <typename acc, int kCols>
constexpr int kScratchLd = kCols + kVec16<acc>;

// c[16 x 8 kOT] += X B: X = the warp's 16 x 8 kXT accumulator tile x (P, P^T, dS or dS^T),
// B = rows 0 .. 8 kXT - 1, columns col0 .. col0 + 8 kOT - 1 of tile b (leading dim kD + kPad).
// P V, P^T dO, dS^T Q, dS K. Tensor cores take x from registers (rounded to T); SIMT goes
// through `scratch`, this warp's 16 x kScratchLd shared-memory rows.
template <typename T, int kD, int kXT, int kOT, typename acc>
SOLA_DEVICE void gemm_xb(acc (&c)[kOT][4], const acc (&x)[kXT][4], const T* b, int col0, acc* scratch, int lane) {
  constexpr int kLd = kD + kPad;
  if constexpr (kIsHalfType<T>) {
#pragma unroll
    for (int kk = 0; kk < kXT / 2; ++kk) {
      const FragA xf = acc_to_a<T>(x, kk);
#pragma unroll
      for (int n = 0; n < kOT; n += 2) {
        const FragB2 bf = load_b(b, kLd, 16 * kk, col0 + 8 * n, lane);
        mma_16816<T>(c[n], xf, bf.lo);
        mma_16816<T>(c[n + 1], xf, bf.hi);
      }
    }
  } else {
    constexpr int kLdX = kScratchLd<acc, 8 * kXT>;
#pragma unroll
    for (int n = 0; n < kXT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) scratch[acc_row(e, lane) * kLdX + acc_col(n, e, lane)] = x[n][e];
    __syncwarp();
    const acc* x_lo = scratch + (lane / 4) * kLdX;
    const T* b_lane = b + col0 + 2 * (lane % 4);
    for (int j = 0; j < 8 * kXT; j += kVec16<acc>) {
      const Vec16<acc> x0 = load16(x_lo + j), x1 = load16(x_lo + 8 * kLdX + j);
#pragma unroll
      for (int v = 0; v < kVec16<acc>; ++v) {
        const T* row = b_lane + (j + v) * kLd;
#pragma unroll
        for (int n = 0; n < kOT; ++n) {
          const T y0 = row[8 * n], y1 = row[8 * n + 1];
          c[n][0] += x0.v[v] * y0;
          c[n][1] += x0.v[v] * y1;
          c[n][2] += x1.v[v] * y0;
          c[n][3] += x1.v[v] * y1;
        }
      }
    }
    __syncwarp();  // the scratch is rewritten by the next product
  }
}

// Bytes of a row-padded shared-memory tile of `rows` x kCols.
template <typename T, int kCols>
constexpr int tile_bytes(int rows) {
  return rows * (kCols + kPad) * static_cast<int>(sizeof(T));
}

}  // namespace flash
}  // namespace sola
