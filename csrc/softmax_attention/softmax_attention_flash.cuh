// Building blocks of the flash softmax kernels (fp16/bf16 on tensor cores, fp32 on them in 3xTF32):
// mma.sync m16n8k16 (m16n8k8 tf32) with fp32 accumulators, fragment loads from padded shared-memory
// tiles, the accumulator -> A operand repack that feeds P and dS to the next product straight from
// registers, and async global -> shared tile copies.
//
// Fragment layouts: mma_f16.cuh (the fragments, mma and ldmatrix loads live there, shared with the
// linear-attention kernels). An m16n8k16 C tile is rows g, g + 8 and columns 2t, 2t + 1.
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
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"
#include "cp_async.cuh"
#include "mma_f16.cuh"
#include "mma_tf32.cuh"
#include "wgmma.cuh"

namespace sola {
namespace flash {

// Every flash kernel runs 4 warps; each warp owns 16 rows (the mma's M) of the block's tile.
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = 16;
constexpr int kBlockRows = kWarps * kWarpRows;
// Shared-memory rows are padded by 16 bytes (8 elements; 4 for fp32, 8 for fp64's SIMT): a row
// stride of an odd number of 16-byte units, so the 8 rows a fragment load touches start in
// different banks, and rows stay 16-byte aligned for cp.async. (fp32 padded by 8 had rows r and
// r + 4 of each ldmatrix in the same banks: 2 wavefronts per fragment.)
template <typename T>
constexpr int kPad = std::is_same_v<T, float> ? 4 : 8;
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
  // Base 2: ex2_approx (common.h). exp2f's subnormal fix-up was ~15% of the forward's
  // instructions at head dim 32; results below 2^-126 flush to 0 instead, against a row sum >= 1.
  static SOLA_HD acc exp(acc x) {
    if constexpr (kBase2) {
#if defined(__CUDA_ARCH__)
      return ex2_approx(x);
#else
      const float r = std::exp2(x);
      return r < std::numeric_limits<float>::min() ? 0.f : r;
#endif
    } else {
      return std::exp(x);
    }
  }
  static SOLA_HD acc to_nat(acc x) { return kBase2 ? x * acc(kLn2) : x; }
  // score * scale, rounded on its own. The natural-unit (fp32 / fp64) kernels round it before
  // subtracting the max or lse, as torch's softmax of the scaled scores does, so large scores
  // (|score| ~ 2000) keep P as accurate as torch's in fp32.
  static SOLA_HD acc scaled(acc s, acc scale) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<acc, double>) return __dmul_rn(s, scale);
    else return __fmul_rn(s, scale);
#else
    volatile acc x = s * scale;
    return x;
#endif
  }
  // exp(score * scale - base). Base 2 fuses product and subtraction into one FMA (one rounding,
  // of the small difference: more accurate than rounding the product first, one instruction less
  // per score); natural units round the product first (scaled).
  static SOLA_HD acc exp_scaled(acc s, acc scale, acc base) {
    if constexpr (kBase2) return exp(fmaf(s, scale, -base));
    else return exp(scaled(s, scale) - base);
  }
};

// The m16n8k16 fragments, mma and ldmatrix loads (mma_f16.cuh), by their short names here.
using mma16::bits_of;
using mma16::FragA;
using mma16::FragB;
using mma16::FragB2;
using mma16::ldmatrix_x4;
using mma16::load_a;
using mma16::load_b;
using mma16::load_b_trans;
using mma16::mma_16816;
using mma16::pack2;

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

// Rows of a kRows tile of a sequence that exist when `left` rows are left from its first on.
template <int kRows>
SOLA_HD int live_rows(int64_t left) {
  return left < kRows ? static_cast<int>(left) : kRows;
}

// f(std::integral_constant<int, groups>) with the row groups of 16 per warp a kernel over `rows`
// resident rows of each of `heads` heads should take on a GPU of `sms` SMs: two (128-row blocks)
// on tensor cores up to head dim kTwoUpTo, where the kernel's accumulators and loaded fragments
// still fit in registers, for more than 64 rows, when the 128-row blocks still give every SM one.
// Up to 64 rows (the 7 x 7 stage of a vision model) a 128-row block would be half padding, twice
// the work per warp for the same number of blocks; on a grid smaller than the GPU, halving the
// blocks would leave SMs idle. The environment variable SOLA_FLASH_GROUPS overrides the rule
// (read per launch): "1" keeps one group everywhere, "2" takes two wherever there are more than
// 64 rows, whatever the grid; to time one against two without a rebuild, and so the tests and
// the sanitizer run the two-group kernels at their small sizes.
template <typename T, int kD, int kTwoUpTo = 64, typename F>
auto with_row_groups(int64_t rows, int64_t heads, int sms, F f) {
  if constexpr (kIsHalfType<T> && kD <= kTwoUpTo) {
    const char* forced = std::getenv("SOLA_FLASH_GROUPS");
    const int groups = forced == nullptr ? 0 : std::strcmp(forced, "1") == 0 ? 1 : std::strcmp(forced, "2") == 0 ? 2 : 0;
    const bool fill = heads * ceil_div(rows, 2 * kBlockRows) >= sms;  // a 128-row block for every SM
    if (groups != 1 && rows > kBlockRows && (groups == 2 || fill)) return f(std::integral_constant<int, 2>{});
  }
  return f(std::integral_constant<int, 1>{});
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

// 16 bytes of T (kVec16<T> elements): one cp.async piece, one vector load.
template <typename T>
using Vec16 = Vec<T, kVec16<T>>;

template <typename T>
SOLA_HD Vec16<T> load16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

// 3xTF32 operands split once: a 16-byte piece of fp32 (negated first when `negate`) becomes its tf32
// hi parts, and its lo parts go lo_shift elements further (tf32::split3). One 16-byte load and two
// stores: a warp's consecutive pieces take no bank conflicts.
SOLA_HD void split_piece(float* piece, int lo_shift, bool negate = false) {
  Vec16<float> hi = load16(piece), lo;
#pragma unroll
  for (int e = 0; e < kVec16<float>; ++e) {
    const tf32::Split sp = tf32::split3(tf32::bits(negate ? -hi.v[e] : hi.v[e]));
    hi.v[e] = tf32::from_bits(sp.hi), lo.v[e] = tf32::from_bits(sp.lo);
  }
  *reinterpret_cast<Vec16<float>*>(piece) = hi;
  *reinterpret_cast<Vec16<float>*>(piece + lo_shift) = lo;
}

// True when x's rows allow 16-byte pieces at column multiples of kVec16<T>.
template <typename T>
SOLA_HD bool rows_aligned16(const View4& x) {
  return rows_aligned<T>(x, kVec16<T>);
}

// Consecutive kRows x kCols tiles (kCols a multiple of 8) of rows row0, row0 + kRows, .. of
// x(b, h), columns col0 .., copied to shared tiles with leading dim kCols + kPad<T>: element [r][c]
// is x(b, h, row)[col0 + c] for the first `rows` rows from row0 and col0 + c < cols, else 0.
// A thread copies the same column piece of every kRowsPerPass-th row, so it keeps one source
// address and steps it (a 64-bit b * sb + h * sh + row * sn per piece cost ~45 instructions,
// and ~35 per key tile in the forward even when computed once per tile). Whole 16-byte pieces
// of aligned rows (rows_aligned16) go by cp.async; full tiles of them (all but the last of a
// sequence) take a branch with only the copies; edges and misaligned views go element by element
// in a loop that is not unrolled (unrolled, the compiler kept every pass's address live across
// the caller's loop: +20 to +60 registers in the forward).
//
// kCore: the tile is in wgmma's core-matrix layout instead (wgmma::core_offset: 8 x 8 blocks of
// 128 contiguous bytes, no padding). A warp then copies 8 consecutive rows x 4 pieces, so its 16-byte
// stores cover all 8 bank groups of a core matrix (row-major pieces would hit 4 of them twice).
// Row-major with 4 pieces a row (head dim 32 at 16 bits, padded to 5 bank groups for conflict-free
// ldmatrix) a warp copies 8 rows too, a quarter warp rows q and q + 4 of them (quarter_warp_row).
template <int kRows, int kCols, typename T, bool kCore = false>
struct TileStream {
  static constexpr int kV = kVec16<T>, kPieces = kCols / kV, kLd = kCore ? kCols : kCols + kPad<T>;
  static_assert(kThreads % kPieces == 0 && kRows % (kThreads / kPieces) == 0, "a tile must be whole passes");
  static_assert(!kCore || (16 % kPieces == 0 && kV == 8), "core-matrix tiles: 16-bit, 32 to 128 columns");
  // Rows one pass covers; a multiple of 8 in the core layout, where rows r and r + kRowsPerPass are
  // kRowsPerPass * kCols elements apart as in a row-major tile.
  static constexpr int kRowsPerPass = kThreads / kPieces, kPasses = kRows / kRowsPerPass;

  const T* src;       // this thread's piece of its first row in the next tile
  int64_t sn;         // row stride
  int64_t rows_left;  // rows of x from the next tile's first on
  int r0, c;          // first row and column of this thread's piece
  int cols_left;      // columns of x from c on (negative past the end)
  bool whole;         // the piece is 16 aligned bytes inside the row

  SOLA_HD TileStream(const View4& x, int64_t b, int64_t h, int64_t row0, int64_t rows, int col0, int cols,
                     bool aligned, int tid)
      : sn(x.sn),
        rows_left(rows),
        r0(kCore ? tid % 8 + 8 * (tid / 8 / kPieces)
                 : kPieces == 4 ? quarter_warp_row(tid) : tid / kPieces),
        c((kCore ? tid / 8 % kPieces : tid % kPieces) * kV) {
    src = x.row<const T>(b, h, row0 + r0) + col0 + c;
    cols_left = cols - col0 - c;
    whole = aligned && cols_left >= kV;
  }

  // Copies the next tile into `tile` and moves on by kRows rows.
  SOLA_HD void load(T* tile) {
    T* dst = tile + (kCore ? wgmma::core_offset<kCols>(r0, c) : r0 * kLd + c);
    if (rows_left >= kRows && whole) {
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass)
        cp_async_16(dst + pass * kRowsPerPass * kLd, src + pass * kRowsPerPass * sn);
    } else {
      const T* from = src;
#pragma unroll 1
      for (int r = r0; r < kRows; r += kRowsPerPass, from += kRowsPerPass * sn, dst += kRowsPerPass * kLd) {
        if (r < rows_left && whole) {
          cp_async_16(dst, from);
        } else {
#pragma unroll
          for (int e = 0; e < kV; ++e) dst[e] = r < rows_left && e < cols_left ? from[e] : T(0.f);
        }
      }
    }
    src += kRows * sn;
    rows_left -= kRows;
  }

  // fp32 (3xTF32) tiles split where they land: this thread's pieces of `tile` (whichever path copied
  // them, once its copies have landed) become their tf32 hi parts, and their lo parts go lo_shift
  // elements further (tf32::split3). Then every warp's products read both parts with no split.
  SOLA_HD void split_landed(T* tile, int lo_shift) const {
    if constexpr (std::is_same_v<T, float> && !kCore) {  // (a no-op elsewhere)
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) split_piece(tile + (r0 + pass * kRowsPerPass) * kLd + c, lo_shift);
    }
  }
};

// One tile: rows row0 .. row0 + kRows - 1 of x(b, h), of which the first `rows` exist (TileStream).
template <int kRows, int kCols, typename T, bool kCore = false>
SOLA_HD void load_tile(T* tile, const View4& x, int64_t b, int64_t h, int64_t row0, int64_t rows, int col0, int cols,
                       bool aligned, int tid) {
  TileStream<kRows, kCols, T, kCore>(x, b, h, row0, rows, col0, cols, aligned, tid).load(tile);
}

// fp32: splits the first kCols columns of a kRows-row tile for 3xTF32 (split_piece), negated
// first when `negate`, cooperatively; the caller syncs around it.
template <int kRows, int kCols, typename T>
SOLA_HD void split_tile(T* tile, int lo_shift, bool negate, int tid) {
  if constexpr (std::is_same_v<T, float>) {  // (a no-op elsewhere)
    constexpr int kLd = kCols + kPad<float>, kPieces = kCols / kVec16<float>;
    static_assert(kCols % kVec16<float> == 0, "whole 16-byte pieces");
    for (int i = tid; i < kRows * kPieces; i += kThreads)
      split_piece(tile + (i / kPieces) * kLd + i % kPieces * kVec16<float>, lo_shift, negate);
  }
}

// Negates a tile in place (exactly: a sign flip), cooperatively; the caller syncs around it.
template <int kElems, typename T>
SOLA_HD void negate_tile(T* tile, int tid) {
  for (int i = tid; i < kElems; i += kThreads) tile[i] = static_cast<T>(-static_cast<acc_t<T>>(tile[i]));
}

// ---- which rows a warp's row groups are -------------------------------------------------------

// Rows between the first rows of consecutive row groups in the products' A operand: a warp's
// adjacent 16-row groups with mma.sync, the warpgroup's 64-row M tiles with wgmma (kWg).
template <bool kWg>
constexpr int kGroupStride = kWg ? kBlockRows : kWarpRows;

// First tile row of warp `warp`'s row group g (the rows of its accumulators c[g]).
template <int kG, bool kWg>
SOLA_HD int group_row(int warp, int g) {
  return (kWg ? kWarpRows * warp : kWarpRows * kG * warp) + kGroupStride<kWg> * g;
}

// First row of A the products take for group 0: the warp's own with mma.sync, the warpgroup's
// (the block's) with wgmma; group g starts kGroupStride<kWg> g rows further.
template <int kG, bool kWg>
SOLA_HD int product_row0(int warp) {
  return kWg ? 0 : kWarpRows * kG * warp;
}

// ---- the same products on Hopper's warpgroup MMA (wgmma.cuh), tiles in core-matrix layout ----
// The block's 4 warps are one warpgroup; group g is the 64-row M tile 64 g .. 64 g + 63, of which
// warp w holds rows 64 g + 16 w .. (its c[g] in the same C layout as above).

template <int kN, int kG>
SOLA_DEVICE float (&flat(float (&c)[kG][kN / 8][4], int g))[kN / 2] {
  return reinterpret_cast<float(&)[kN / 2]>(c[g]);
}

// Issues c[g] = A_g B^T over kD columns (no commit, no wait): A_g = rows a0 + 64 g .. of tile a,
// B^T = the first 8 kNT rows of bt (both kD wide). The caller fences c and runs wgmma::fence() first.
template <typename T, int kD, int kG, int kNT>
SOLA_DEVICE void wg_issue_abt(float (&c)[kG][kNT][4], const T* a, int a0, const T* bt) {
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      wgmma::mma_ss<T, 8 * kNT>(flat<8 * kNT, kG>(c, g), wgmma::k_along_cols<kD>(a, a0 + kBlockRows * g, 16 * kk),
                                wgmma::k_along_cols<kD>(bt, 0, 16 * kk), kk > 0);
}

// Issues c[g] += X_g B (no commit, no wait): X_g = xf[g] (register A fragments of 8 kXT columns),
// B = the first 8 kXT rows, columns col0 .. col0 + 8 kOT - 1 of tile b (kCols wide; K runs along
// its rows). xf must stay unchanged until the wait.
template <typename T, int kCols, int kG, int kXF, int kOT>
SOLA_DEVICE void wg_issue_xb(float (&c)[kG][kOT][4], const FragA (&xf)[kG][kXF], const T* b, int col0) {
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int kk = 0; kk < kXF; ++kk)
      wgmma::mma_rs<T, 8 * kOT>(flat<8 * kOT, kG>(c, g), xf[g][kk].x, wgmma::k_along_rows<kCols>(b, 16 * kk, col0), 1);
}

template <int kG, int kNT>
SOLA_DEVICE void operand_fence(float (&c)[kG][kNT][4]) {
#pragma unroll
  for (int g = 0; g < kG; ++g) wgmma::operand_fence(flat<8 * kNT, kG>(c, g));
}
template <int kG, int kXF>
SOLA_DEVICE void operand_fence(FragA (&xf)[kG][kXF]) {
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int kk = 0; kk < kXF; ++kk) wgmma::operand_fence(xf[g][kk].x);
}

// One batch of wgmmas (issue()), committed and waited for at once. The register operands regs (A
// fragments, accumulators) are fenced before the issue and after the wait, so the compiler neither
// moves their values while the tensor cores read them nor reads the accumulators early.
template <typename Issue, typename... Regs>
SOLA_DEVICE void wg_batch(Issue&& issue, Regs&... regs) {
  (operand_fence(regs), ...);
  wgmma::fence();
  issue();
  wgmma::commit();
  wgmma::wait<0>();
  (operand_fence(regs), ...);
}

// xf[g][kk] = columns 16 kk .. of x[g] rounded to T (P, dS as register A fragments).
template <typename T, int kG, int kXT>
SOLA_DEVICE void pack_a(FragA (&xf)[kG][kXT / 2], const float (&x)[kG][kXT][4]) {
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int kk = 0; kk < kXT / 2; ++kk) xf[g][kk] = acc_to_a<T>(x[g], kk);
}

// c[g] += X_g B with X_g = x[g] (P, P^T, dS, dS^T) rounded to T (wg_issue_xb), waited for.
template <typename T, int kCols, int kG, int kXT, int kOT>
SOLA_DEVICE void wg_gemm_xb(float (&c)[kG][kOT][4], const float (&x)[kG][kXT][4], const T* b, int col0) {
  FragA xf[kG][kXT / 2];  // all of them first: the wgmmas read them until the wait
  pack_a<T>(xf, x);
  wg_batch([&] { wg_issue_xb<T, kCols>(c, xf, b, col0); }, xf, c);
}

// ---- fp32 on tensor cores: 3xTF32 -------------------------------------------------------------
// An fp32 product as three tf32 mma.sync m16n8k8 (mma_tf32.cuh: tf32::split3, tf32::mma_3x),
// fp32-level accuracy at tensor-core speed (CUTLASS's "FastF32", which SDPA's efficient backend runs
// for fp32). The accumulators have the m16n8k16 C layout (the same as m16n8k8's), so masking, the
// softmax and the epilogues are shared. Fragments: a 16-byte row of 4 fp32 is a row of one of
// ldmatrix's 8x8 16-bit matrices, so a non-transposed ldmatrix.x4 gives lane (g, t) element [g][t]
// of four 8x4 fp32 blocks: A and, for A B^T, B as they stand. X B (P V, ...) takes x's accumulator
// pairs (columns 2t, 2t + 1) as A's k slots t and t + 4, so B's rows are read in that order (b0 =
// row 2t, b1 = row 2t + 1: the sum over k is the same), element by element (banks 8t + g with
// fp32's row stride: no conflicts).

// fp32 operands for the 3xTF32 mma (SIMT for fp64).
template <typename T>
constexpr bool kTf32x3 = std::is_same_v<T, float>;
template <typename T>
constexpr bool kSimt = !kIsHalfType<T> && !kTf32x3<T>;

// A 3xTF32 fragment by ldmatrix.x4 from `at`: split here, or with lo_shift > 0 read as already split
// (split_landed: hi parts at `at`, lo parts lo_shift elements further).
SOLA_HD tf32::Frag<4> load_split(const float* at, int lo_shift) {
  uint32_t r[4];
  ldmatrix_x4<false>(r, at);
  if (lo_shift == 0) return tf32::split3(r);
  tf32::Frag<4> f;
  ldmatrix_x4<false>(f.lo, at + lo_shift);
#pragma unroll
  for (int j = 0; j < 4; ++j) f.hi[j] = r[j];
  return f;
}

// 3xTF32 c[g][16 x 8 kNT] = A_g B^T (gemm_abt's contract): k in steps of 8, B fragments of n8 tile
// pairs loaded once for every group. a_lo, b_lo: 0, or the tile a / bt was split where it landed
// (load_split).
template <int kD, int kG, int kNT>
SOLA_HD void gemm_abt_tf32(float (&c)[kG][kNT][4], const float* a, int a0, const float* bt, int live, int lane,
                           int a_lo, int b_lo) {
  constexpr int kLd = kD + kPad<float>;
  const int i = lane / 8;
#pragma unroll
  for (int g = 0; g < kG; ++g) zero(c[g]);
#pragma unroll
  for (int kk = 0; kk < kD / 8; ++kk) {
    tf32::Frag<4> af[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g)  // matrices: rows +0 / +8 (i % 2), columns +0 / +4 (i / 2)
      af[g] = load_split(a + (a0 + kWarpRows * g + lane % 8 + 8 * (i % 2)) * kLd + 8 * kk + 4 * (i / 2), a_lo);
#pragma unroll
    for (int n = 0; n < kNT; n += 2) {
      if (8 * n >= live) continue;
      // matrices: columns +0 / +4 (i % 2) of n8 tiles n, n + 1 (i / 2)
      const tf32::Frag<4> b = load_split(bt + (8 * n + lane % 8 + 8 * (i / 2)) * kLd + 8 * kk + 4 * (i % 2), b_lo);
      const tf32::Frag<2> bf0{{b.hi[0], b.hi[1]}, {b.lo[0], b.lo[1]}}, bf1{{b.hi[2], b.hi[3]}, {b.lo[2], b.lo[3]}};
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        tf32::mma_3x(c[g][n], af[g], bf0);
        tf32::mma_3x(c[g][n + 1], af[g], bf1);
      }
    }
  }
}

// 3xTF32 c[g][16 x 8 kOT] += X_g B (gemm_xb's contract; x 0 past `live` up to the next multiple of 8).
// lo_shift: 0, or b split where it landed (its lo parts lo_shift elements further).
template <int kD, int kG, int kXT, int kOT>
SOLA_HD void gemm_xb_tf32(float (&c)[kG][kOT][4], const float (&x)[kG][kXT][4], const float* b, int col0, int live,
                          int lane, int lo_shift) {
  constexpr int kLd = kD + kPad<float>;
#pragma unroll
  for (int kk = 0; kk < kXT; ++kk) {  // rows 8 kk .. 8 kk + 7 of b
    if (8 * kk >= live) continue;
    tf32::Frag<4> xf[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) {  // k slot t: column 2t, slot t + 4: column 2t + 1
      const float* e = x[g][kk];
      const uint32_t r[4] = {tf32::bits(e[0]), tf32::bits(e[2]), tf32::bits(e[1]), tf32::bits(e[3])};
      xf[g] = tf32::split3(r);
    }
    const float* row = b + (8 * kk + 2 * (lane % 4)) * kLd + col0 + lane / 4;  // b0: row 2t, b1: row 2t + 1
#pragma unroll
    for (int n = 0; n < kOT; ++n) {
      const uint32_t r[2] = {tf32::bits(row[8 * n]), tf32::bits(row[kLd + 8 * n])};
      const tf32::Frag<2> bf =
          lo_shift == 0 ? tf32::split3(r)
                        : tf32::Frag<2>{{r[0], r[1]}, {tf32::bits(row[8 * n + lo_shift]), tf32::bits(row[kLd + 8 * n + lo_shift])}};
#pragma unroll
      for (int g = 0; g < kG; ++g) tf32::mma_3x(c[g][n], xf[g], bf);
    }
  }
}

// ---- the two products of every flash kernel, per warp -------------------------------------------

// SIMT (fp64) c[16 x 8 kNT] += A B^T for one group of 16 rows (gemm_abt). This lane's rows g, g+8 of A
// and, per n8 tile, rows 2t, 2t+1 of B^T; 16-byte loads along k.
template <typename T, int kD, int kNT, typename acc>
SOLA_HD void gemm_abt_simt(acc (&c)[kNT][4], const T* a, int a0, const T* bt, int live, int lane) {
  constexpr int kLd = kD + kPad<T>;
  const T* a_lo = a + (a0 + lane / 4) * kLd;
  const T* b_lane = bt + 2 * (lane % 4) * kLd;
  for (int k = 0; k < kD; k += kVec16<T>) {
    const Vec16<T> x0 = load16(a_lo + k), x1 = load16(a_lo + 8 * kLd + k);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      if (8 * n >= live) continue;
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

// c[g][16 x 8 kNT] = A_g B^T over kD columns for kG groups of 16 rows: A_g = rows a0 + 16 g ..
// a0 + 16 g + 15 of tile a, B^T = the first 8 kNT rows of tile bt (both leading dim kD + kPad<T>).
// Q K^T, K Q^T, dO V^T, V dO^T. On tensor cores each B fragment loaded serves every group.
// `live`: rows of bt that exist (the edge tile of a sequence); the n8 tiles past them stay 0
// (callers mask them), so a 4-key edge tile costs one tile pair, not the whole tile. (The wgmma
// kernels issue these products themselves, batched: wg_issue_abt.) fp16 / bf16 on tensor cores,
// fp32 on them in 3xTF32 (a_lo / b_lo > 0: that tile split where it landed, load_split), fp64 on SIMT.
template <typename T, int kD, int kG, int kNT, typename acc>
SOLA_HD void gemm_abt(acc (&c)[kG][kNT][4], const T* a, int a0, const T* bt, int live, int lane, int a_lo = 0,
                      int b_lo = 0) {
  constexpr int kLd = kD + kPad<T>;
  if constexpr (kIsHalfType<T>) {
#pragma unroll
    for (int g = 0; g < kG; ++g) zero(c[g]);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      FragA af[kG];
#pragma unroll
      for (int g = 0; g < kG; ++g) af[g] = load_a(a, kLd, a0 + kWarpRows * g, 16 * kk, lane);
#pragma unroll
      for (int n = 0; n < kNT; n += 2) {
        if (8 * n >= live) continue;
        const FragB2 bf = load_b_trans(bt, kLd, 8 * n, 16 * kk, lane);
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          mma_16816<T>(c[g][n], af[g], bf.lo);
          mma_16816<T>(c[g][n + 1], af[g], bf.hi);
        }
      }
    }
  } else if constexpr (kTf32x3<T>) {
    gemm_abt_tf32<kD>(c, a, a0, bt, live, lane, a_lo, b_lo);
  } else {
    for (int g = 0; g < kG; ++g) {
      zero(c[g]);
      gemm_abt_simt<T, kD>(c[g], a, a0 + kWarpRows * g, bt, live, lane);
    }
  }
}

// Row stride of a warp's SIMT scratch holding a 16 x kCols accumulator tile.
template <typename acc, int kCols>
constexpr int kScratchLd = kCols + kVec16<acc>;

// SIMT (fp64) c[16 x 8 kOT] += X B for one group (gemm_xb): X goes through `scratch`, this warp's
// 16 x kScratchLd shared-memory rows.
template <typename T, int kD, int kXT, int kOT, typename acc>
SOLA_DEVICE void gemm_xb_simt(acc (&c)[kOT][4], const acc (&x)[kXT][4], const T* b, int col0, int live, acc* scratch,
                              int lane) {
  constexpr int kLd = kD + kPad<T>;
  constexpr int kLdX = kScratchLd<acc, 8 * kXT>;
#pragma unroll
  for (int n = 0; n < kXT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) scratch[acc_row(e, lane) * kLdX + acc_col(n, e, lane)] = x[n][e];
  __syncwarp();
  const acc* x_lo = scratch + (lane / 4) * kLdX;
  const T* b_lane = b + col0 + 2 * (lane % 4);
  for (int j = 0; j < 8 * kXT && j < live; j += kVec16<acc>) {
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
  __syncwarp();  // the scratch is rewritten by the next group or product
}

// c[g][16 x 8 kOT] += X_g B for kG groups: X_g = the warp's 16 x 8 kXT accumulator tile x[g] (P,
// P^T, dS or dS^T), B = rows 0 .. 8 kXT - 1, columns col0 .. col0 + 8 kOT - 1 of tile b (leading
// dim kD + kPad<T>). P V, P^T dO, dS^T Q, dS K. Tensor cores take x from registers (rounded to T, or
// split for 3xTF32) and load each B fragment once for every group; SIMT (fp64) goes through
// `scratch`, this warp's 16 x kScratchLd shared-memory rows, one group at a time. `live`: rows of b
// that exist; the columns of x past them must be 0 up to the next multiple of 16 (8 for fp32 and
// fp64). kWg: on wgmma (wg_gemm_xb; b in core-matrix layout, scratch and live unused). lo_shift: as
// gemm_abt's b_lo (fp32).
template <typename T, int kD, bool kWg = false, int kG, int kXT, int kOT, typename acc>
SOLA_DEVICE void gemm_xb(acc (&c)[kG][kOT][4], const acc (&x)[kG][kXT][4], const T* b, int col0, int live,
                         acc* scratch, int lane, int lo_shift = 0) {
  constexpr int kLd = kD + kPad<T>;
  if constexpr (kWg) {
    wg_gemm_xb<T, kD>(c, x, b, col0);
  } else if constexpr (kIsHalfType<T>) {
#pragma unroll
    for (int kk = 0; kk < kXT / 2; ++kk) {
      if (16 * kk >= live) continue;
      FragA xf[kG];
#pragma unroll
      for (int g = 0; g < kG; ++g) xf[g] = acc_to_a<T>(x[g], kk);
#pragma unroll
      for (int n = 0; n < kOT; n += 2) {
        const FragB2 bf = load_b(b, kLd, 16 * kk, col0 + 8 * n, lane);
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          mma_16816<T>(c[g][n], xf[g], bf.lo);
          mma_16816<T>(c[g][n + 1], xf[g], bf.hi);
        }
      }
    }
  } else if constexpr (kTf32x3<T>) {
    gemm_xb_tf32<kD>(c, x, b, col0, live, lane, lo_shift);
  } else {
    for (int g = 0; g < kG; ++g) gemm_xb_simt<T, kD>(c[g], x[g], b, col0, live, scratch, lane);
  }
}

// Bytes of a row-padded shared-memory tile of `rows` x kCols.
template <typename T, int kCols>
constexpr int tile_bytes(int rows) {
  return rows * (kCols + kPad<T>) * static_cast<int>(sizeof(T));
}

}  // namespace flash
}  // namespace sola
