// Flash backward of non-causal softmax attention, one tiling for all dtypes (tensor cores for
// fp16/bf16, 3xTF32 on them for fp32, SIMT for fp64; softmax_attention_flash.cuh). The probabilities
// are recomputed from q, k and the saved lse: P = exp(scale q k^T - lse), dP = dO V^T,
// dS = P (dP - delta) with delta = rowsum(dO * O) computed beforehand. Two kernels, each owning
// its output rows, so nothing is accumulated across blocks and the result is bitwise reproducible:
//   dkdv_kernel: 64 keys per row group, over all query tiles: dV += P^T dO, dK += scale dS^T Q
//   dq_kernel:   64 queries per row group, over all key tiles: dQ += scale dS K
// On tensor cores a block takes two row groups (128 rows, 32 per warp) when there are more than
// 64 rows (up to head dim 64; with_row_groups also wants a grid
// that fills the GPU), so each fragment of the streamed tiles feeds two mmas per warp (and
// shared memory, which feeds mma.sync, is read half as often per score). The second score product
// (dP, dP^T) runs per group, so only one group's tile of it is live next to both groups' P.
// Both keep their resident rows in shared memory and stream the other side in tiles, double-
// buffered where shared memory allows (pipeline). On tensor cores P^T / dS^T (or P / dS) go from
// the accumulators straight into the next product as A fragments.
// Gradient columns are split over blocks in chunks so the accumulators stay in registers.
// Instantiated per dtype family: softmax_attention_flash_bwd_{tc,simt}.cu, and with the products
// on Hopper's wgmma (kWg) in softmax_attention_flash_bwd_wgmma.cu.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cuda_utils.cuh"
#include "softmax_attention/softmax_attention_flash.cuh"
#include "softmax_attention/softmax_attention_flash.h"

namespace sola {
namespace flash {

// kGroups: row groups of 16 per warp (1 or 2: with_row_groups); kStreamRows: streamed rows per
// step, 0 for the default; kWgmma: the products on Hopper's warpgroup MMA (fp16 / bf16 up to head
// dim 128, sm_90a: softmax_attention_flash_bwd_wgmma.cu), tiles in its core-matrix layout.
// kDeep = false: the twin for GPUs whose blocks cannot take the default tiles (launch_bwd): the streamed
// tiles single-buffered (kStages 1) and dkdv_kernel's lse / delta in their rows' padding (kStatsInPad).
// kKeys: dkdv_kernel's tiles, which stage the streamed (query) rows' lse and delta in shared memory;
// dq_kernel keeps its own rows' in registers.
template <typename T, int kD, int kGroups, int kStreamRows, bool kWgmma, bool kDeep, bool kKeys>
struct BwdTiles {
  using value_t = T;
  using acc = acc_t<T>;
  static constexpr int kHeadDim = kD;
  static constexpr bool kTensor = kIsHalfType<T>;
  static constexpr bool kWg = kWgmma;
  static_assert(!kWgmma || (kTensor && kD <= 128), "wgmma: fp16 / bf16 up to head dim 128");
  static constexpr int kBlock = kBlockRows * kGroups;  // resident rows (keys or queries) of a block
  // fp32 up to head dim 64: the streamed tiles are split for 3xTF32 where they land (TileStream::
  // split_landed; their lo parts kLoShift elements further) rather than by every warp for each of
  // their two uses (per lane and 1024 scores at kD 64 ~640 splits of ~20 instructions: ~15 instructions
  // per score). In 32-row steps, so both parts fit where the 64-row ones did (kD 64: 104 KB, 2 blocks
  // per SM as before). The resident tiles, each warp's own rows, are split per fragment as before.
  static constexpr bool kPreSplit = kTf32x3<T> && !kWgmma && kD <= 64;
  static constexpr int kStream = kStreamRows ? kStreamRows : !kPreSplit && (kTensor || kD <= 64) ? 64 : 32;
  // Gradient columns of one block: what fits in registers next to S and dP. Past them the blocks
  // split the columns into chunks, each recomputing S and dP. On tensor cores every column up to
  // head dim 128 fits (one chunk: at kD 128 the backward runs 7 products per tile pair instead of
  // 11), with 32-row streamed steps where both S and dP of a 128-wide head would not.
  static constexpr int kDOut = std::min(kD, kTensor ? 128 : static_cast<int>(256 / sizeof(acc)));
  // dkdv_kernel's chunks cover max(Dk, Dv) columns (dK and dV), dq_kernel's Dk.
  static SOLA_HD int64_t dkdv_chunks(const SoftmaxAttentionParams& p) {
    return column_chunks<kDOut>(p.Dk > p.Dv ? p.Dk : p.Dv);
  }
  static SOLA_HD int64_t dq_chunks(const SoftmaxAttentionParams& p) { return column_chunks<kDOut>(p.Dk); }
  // Work items of each kernel's grid-stride loop: (b, h, row block, column chunk).
  static SOLA_HD int64_t dkdv_tiles(const SoftmaxAttentionParams& p) {
    return p.B * p.H * ceil_div(p.Nk, kBlock) * dkdv_chunks(p);
  }
  static SOLA_HD int64_t dq_tiles(const SoftmaxAttentionParams& p) {
    return p.B * p.H * ceil_div(p.Nq, kBlock) * dq_chunks(p);
  }
  static constexpr int kLd = kWgmma ? kD : kD + kPad<T>;
  static constexpr int kScratch = !kSimt<T> ? 0 : kWarps * kWarpRows * kScratchLd<acc, kStream>;
  // The twins' dkdv_kernel keeps a query row's lse and delta in the 16 bytes of padding after that row of
  // the streamed Q tile (never read by the products): 256 bytes fewer at 32 rows a step, what 16-bit head
  // dim 256 and fp32 128 miss on a 99 KB GPU (101632 bytes).
  static constexpr bool kStatsInPad = kKeys && !kDeep && !kWgmma;
  static_assert(!kStatsInPad || (kLd - kD) * sizeof(T) >= 2 * sizeof(acc), "lse and delta fit in a row's padding");
  static constexpr int kStatRows = kKeys && !kStatsInPad ? kStream : 0;  // of each array, per stage
  // Two resident tiles; per stage two streamed tiles (kPreSplit: and their lo parts, after all
  // stages' tiles) and the lse / delta arrays (kStatRows); the SIMT scratch.
  static constexpr int kStreamCopies = kPreSplit ? 2 : 1;  // of a streamed tile: kPreSplit keeps hi and lo
  static constexpr int smem_bytes(int stages) {
    return (2 * kBlock + stages * 2 * kStream * kStreamCopies) * kLd * static_cast<int>(sizeof(T)) +
           (stages * 2 * kStatRows + kScratch) * static_cast<int>(sizeof(acc));
  }
  // Double-buffer the streamed tiles (copy step j+1 while computing step j) where two blocks
  // still fit on an SM (228 KB, 1 KB reserved per block).
  static constexpr int kStages = kDeep && smem_bytes(2) <= 113 * 1024 ? 2 : 1;
  static constexpr int kSmem = smem_bytes(kStages);
  static constexpr int kLoShift = kPreSplit ? kStages * 2 * kStream * kLd : 0;
  // Blocks per SM the register allocation must allow (0: ptxas decides): 3 on tensor cores up to
  // head dim 64 with one row group (left alone ptxas took 164-224 registers there: 2 blocks for
  // dkdv at 64), 2 with two (255 registers); 1 for fp32 at head dim 256 (left alone ptxas held
  // dq_kernel to 128 registers and spilled 60 bytes; with 1 it takes 145, no spill).
  static constexpr int kMinBlocks = kGroups == 2 ? 2 : kTensor && kD <= 64 ? 3 : kTf32x3<T> && kD > 128 ? 1 : 0;
};

// dkdv_kernel's tiles. With two groups past head dim 32 it streams 32 queries per step: its dK
// and dV accumulators (8 tiles of 16 x 8 per group at head dim 64) leave no room for two groups of
// 16 x 64 scores; so does mma.sync at head dim 128 with one group (dK and dV 16 tiles each: with
// 64 queries a step it spilled 92 bytes).
template <typename T, int kD, int kG, bool kWg = false, bool kDeep = true>
using KeyBlockTiles = BwdTiles<T, kD, kG, ((kG == 2 && kD > 32) || (!kWg && kD > 64) ? 32 : 0), kWg, kDeep, true>;
// dq_kernel's (two groups only up to head dim 64: dispatch_bwd). Its twin streams 32 keys a step at
// 16-bit head dim 256 (64 take 132 KB).
template <typename T, int kD, int kG, bool kWg = false, bool kDeep = true>
using QueryBlockTiles = BwdTiles<T, kD, kG, (!kDeep && kD > 128 ? 32 : 0), kWg, kDeep, false>;

// Carves a backward kernel's dynamic shared memory (BwdTiles::smem_bytes).
template <typename Tiles>
struct BwdSmem {
  using T = typename Tiles::value_t;
  using acc = typename Tiles::acc;
  static constexpr int kStreamTile = Tiles::kStream * Tiles::kLd;
  T* resident[2];
  T* stream_base;
  acc* lse;    // [stage][kStatRows], in ExpUnits (dkdv_kernel; lse_at)
  acc* delta;  // [stage][kStatRows]
  acc* scratch;  // this warp's

  SOLA_HD BwdSmem(unsigned char* smem, int warp) {
    resident[0] = reinterpret_cast<T*>(smem);
    resident[1] = resident[0] + Tiles::kBlock * Tiles::kLd;
    stream_base = resident[1] + Tiles::kBlock * Tiles::kLd;
    lse = reinterpret_cast<acc*>(stream_base + Tiles::kStages * 2 * kStreamTile * Tiles::kStreamCopies);
    delta = lse + Tiles::kStages * Tiles::kStatRows;
    scratch = delta + Tiles::kStages * Tiles::kStatRows + warp * kWarpRows * kScratchLd<acc, Tiles::kStream>;
  }
  // Streamed tile `which` (0 or 1) of pipeline stage `stage`.
  SOLA_HD T* streamed(int stage, int which) const { return stream_base + (2 * stage + which) * kStreamTile; }
  // lse (in ExpUnits) and delta of streamed row `row` of stage `stage` (dkdv_kernel: a query's).
  SOLA_HD acc& lse_at(int stage, int row) const {
    return Tiles::kStatsInPad ? row_pad(stage, row)[0] : lse[stage * Tiles::kStatRows + row];
  }
  SOLA_HD acc& delta_at(int stage, int row) const {
    return Tiles::kStatsInPad ? row_pad(stage, row)[1] : delta[stage * Tiles::kStatRows + row];
  }

 private:
  // The padding after row `row` of the stage's first streamed tile (Tiles::kStatsInPad).
  SOLA_HD acc* row_pad(int stage, int row) const {
    return reinterpret_cast<acc*>(streamed(stage, 0) + row * Tiles::kLd + Tiles::kHeadDim);
  }
};

// A step's two streamed tiles (dkdv_kernel: Q and dO; dq_kernel: K and V), `first` at streamed(stage, 0)
// and `second` at streamed(stage, 1): their copies, committed as one group (pipeline's load) ...
template <typename Tiles, typename Stream>
SOLA_DEVICE void load_streamed(const BwdSmem<Tiles>& smem, int stage, Stream& first, Stream& second) {
  first.load(smem.streamed(stage, 0));
  second.load(smem.streamed(stage, 1));
  cp_async_commit();
}
// ... and, fp32 (BwdTiles::kPreSplit), this thread's pieces of them split once landed (pipeline's land).
template <typename Tiles, typename Stream>
SOLA_DEVICE void split_streamed(const BwdSmem<Tiles>& smem, int stage, const Stream& first, const Stream& second) {
  if constexpr (Tiles::kPreSplit) {
    first.split_landed(smem.streamed(stage, 0), Tiles::kLoShift);
    second.split_landed(smem.streamed(stage, 1), Tiles::kLoShift);
  }
}

// Runs compute(step, stage, edge) over the `rows` streamed rows in steps of kRows, with the
// streamed tiles of each step loaded by load(step, stage) (cp.async, committed inside; called for
// the steps in order), double-buffered when kStages is 2. With kPeelEdge, `edge` is
// std::true_type for the last step when it is partial, a copy of the step after the loop
// (inside the loop it pushed the kernels into spills); otherwise always std::false_type. Copies
// issued before the call (the resident tiles) are waited for with step 0's. Ends with every copy
// landed and every warp done with shared memory. kWg: the tiles are read by wgmma, so each
// thread's copies also pass fence.proxy.async before the barrier that publishes them. land(stage):
// once this thread's copies of a step have landed, before the barrier (fp32: split_landed).
struct NoLand {
  SOLA_HD void operator()(int) const {}
};
template <int kStages, int kRows, bool kPeelEdge, bool kWg, typename Load, typename Compute, typename Land = NoLand>
SOLA_DEVICE void pipeline(int64_t rows, Load load, Compute compute, Land land = {}) {
  const int64_t steps = ceil_div(rows, kRows), full = kPeelEdge ? rows / kRows : steps;
  auto step_at = [&](int64_t step, auto edge) {
    const int stage = static_cast<int>(step % kStages);
    if (kStages == 2 && step + 1 < steps) {
      load(step + 1, 1 - stage);  // its stage was last read before the previous step's barrier
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    land(stage);
    if constexpr (kWg) wgmma::async_proxy_fence();
    __syncthreads();  // this step's tiles are in for every thread
    compute(step, stage, edge);
    __syncthreads();  // every warp is done with this stage
    if (kStages == 1 && step + 1 < steps) load(step + 1, 0);
  };
  if (steps > 0) load(int64_t(0), 0);
  for (int64_t step = 0; step < full; ++step) step_at(step, std::false_type{});
  if (full < steps) step_at(full, std::true_type{});
  cp_async_wait_all();  // with no steps, the resident copies
  __syncthreads();
}

// Group g of a [kG][kNT][4] accumulator array as a one-group array (for a product per group).
template <int kG, int kNT, typename acc>
SOLA_HD acc (&one_group(acc (&x)[kG][kNT][4], int g))[1][kNT][4] {
  return *reinterpret_cast<acc(*)[1][kNT][4]>(&x[g]);
}

// ds[g] = p[g] * (ds[g] - delta(g, n, e)) for group g, ds holding dP (or dP^T): dS (dS^T).
template <int kNT, typename acc, typename Delta>
SOLA_HD void grad_from_dp(acc (&ds)[kNT][4], const acc (&p)[kNT][4], int g, Delta delta) {
#pragma unroll
  for (int n = 0; n < kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) ds[n][e] = p[n][e] * (ds[n][e] - delta(g, n, e));
}

// ds = p * (dP - delta(g, n, e)) with dP = A_g B^T (gemm_abt), one group at a time so that only
// one group's dP tile is live next to every group's p: dS from P (dq_kernel), dS^T from P^T (dkdv).
// mma.sync / SIMT only (the wgmma kernels batch both groups' dP with P: wg_gemm_abt2).
// a0: product_row0 (group g starts kWarpRows g rows further).
template <typename T, int kD, int kG, int kNT, typename acc, typename Delta>
SOLA_DEVICE void grad_scores(acc (&ds)[kG][kNT][4], const acc (&p)[kG][kNT][4], const T* a, int a0, const T* bt,
                             int live, int lane, Delta delta, int b_lo = 0) {
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    gemm_abt<T, kD>(one_group(ds, g), a, a0 + kWarpRows * g, bt, live, lane, 0, b_lo);
    grad_from_dp(ds[g], p[g], g, delta);
  }
}

// wgmma: c1 = A1 B1^T and c2 = A2 B2^T (A from rows 64 g of a1 / a2) issued as one batch and
// waited for once: S and dP (or S^T and dP^T) in one round trip of the tensor cores, not two.
template <typename T, int kD, int kG, int kNT>
SOLA_DEVICE void wg_gemm_abt2(float (&c1)[kG][kNT][4], const T* a1, const T* b1, float (&c2)[kG][kNT][4], const T* a2,
                              const T* b2) {
  wg_batch(
      [&] {
        wg_issue_abt<T, kD>(c1, a1, 0, b1);
        wg_issue_abt<T, kD>(c2, a2, 0, b2);
      },
      c1, c2);
}

// wgmma: c1 += X1 B1 and c2 += X2 B2 (X rounded to T as register A fragments, B tiles kCols wide
// from column col0) as one batch, waited for once: dV and dK in one round trip.
template <typename T, int kCols, int kG, int kXT, int kOT>
SOLA_DEVICE void wg_gemm_xb2(float (&c1)[kG][kOT][4], const float (&x1)[kG][kXT][4], const T* b1,
                             float (&c2)[kG][kOT][4], const float (&x2)[kG][kXT][4], const T* b2, int col0) {
  FragA f1[kG][kXT / 2], f2[kG][kXT / 2];  // all first: the wgmmas read them until the wait
  pack_a<T>(f1, x1);
  pack_a<T>(f2, x2);
  wg_batch(
      [&] {
        wg_issue_xb<T, kCols>(c1, f1, b1, col0);
        wg_issue_xb<T, kCols>(c2, f2, b2, col0);
      },
      f1, f2, c1, c2);
}

struct BwdAligned {
  bool q, k, v, grad_out;
};

// rows [row0, row0 + 16) of a warp's 16 x kDOut accumulator, times `mul`, into x (columns col0..).
template <typename T, int kOT, typename acc>
SOLA_HD void store_rows(const acc (&c)[kOT][4], acc mul, const View4& x, const TileIndex& t, int64_t row0,
                        int64_t rows, int cols, int lane) {
#pragma unroll
  for (int e0 = 0; e0 < 4; e0 += 2) {
    const int64_t r = row0 + acc_row(e0, lane);
    if (r >= rows) continue;
    T* dst = x.row<T>(t.b, t.h, r);
#pragma unroll
    for (int n = 0; n < kOT; ++n)
#pragma unroll
      for (int e = e0; e < e0 + 2; ++e) {
        const int col = t.col0 + acc_col(n, e, lane);
        if (col < cols) dst[col] = static_cast<T>(c[n][e] * mul);
      }
  }
}

template <typename T, int kD, int kG, bool kWg, bool kDeep>
__global__ void __launch_bounds__(kThreads, KeyBlockTiles<T, kD, kG, kWg, kDeep>::kMinBlocks)
    dkdv_kernel(const SoftmaxAttentionParams p, const BwdAligned al) {
  using Tiles = KeyBlockTiles<T, kD, kG, kWg, kDeep>;
  using acc = typename Tiles::acc;
  using Exp = ExpUnits<T>;
  constexpr int kBlock = Tiles::kBlock, kStream = Tiles::kStream;
  constexpr int kST = kStream / 8, kOT = Tiles::kDOut / 8, kLo = Tiles::kLoShift;
  SOLA_DYNAMIC_SMEM(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const BwdSmem<Tiles> smem(smem_raw, warp);
  const int a0 = product_row0<kG, kWg>(warp);  // the products' first row of the resident tiles
  T* sK = smem.resident[0];
  T* sV = smem.resident[1];
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const acc scale_u = static_cast<acc>(p.scale) * Exp::kPerNat;
  const int64_t chunks = Tiles::dkdv_chunks(p);
  const int64_t tiles = Tiles::dkdv_tiles(p);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileIndex t = tile_index<kBlock, Tiles::kDOut>(tile, p.Nk, p.H, chunks);
    load_tile<kBlock, kD, T, kWg>(sK, p.k, t.b, t.h, t.row0, p.Nk - t.row0, 0, Dk, al.k, tid);
    load_tile<kBlock, kD, T, kWg>(sV, p.v, t.b, t.h, t.row0, p.Nk - t.row0, 0, Dv, al.v, tid);
    acc dk[kG][kOT][4], dv[kG][kOT][4];
#pragma unroll
    for (int g = 0; g < kG; ++g) zero(dk[g]), zero(dv[g]);
    TileStream<kStream, kD, T, kWg> queries(p.q, t.b, t.h, 0, p.Nq, 0, Dk, al.q, tid);
    TileStream<kStream, kD, T, kWg> grads(p.grad_out, t.b, t.h, 0, p.Nq, 0, Dv, al.grad_out, tid);
    auto load = [&](int64_t step, int stage) {  // query rows m0 .. m0 + kStream (steps in order)
      const int64_t m0 = step * kStream;
      load_streamed(smem, stage, queries, grads);
      if (tid < kStream) {
        // Query rows past Nq get lse = +inf, so their P is exactly 0 (and their grad_out rows are 0).
        const bool valid = m0 + tid < p.Nq;
        const int64_t r = t.bh * p.Nq + m0 + tid;
        smem.lse_at(stage, tid) = valid ? backward_lse(static_cast<const acc*>(p.lse)[r]) * Exp::kPerNat
                                        : std::numeric_limits<acc>::infinity();
        smem.delta_at(stage, tid) = valid ? static_cast<const acc*>(p.delta)[r] : acc(0);
      }
    };
    // One query tile. Query rows past Nq (zero rows, lse = +inf, delta = 0, grad_out rows 0) have
    // P^T = dS^T = 0 but for an infinite key (below), so the peeled edge step (`edge`) only masks P.
    // Skipping their n8 tiles as well, as dq_kernel does, cost spills inside the loop here (dkdv kD 64
    // two groups: 1 -> 10 local loads / stores a step); the mask alone leaves the loop as it was
    // (nvcc 13.0 sm_90a: same SASS length +-2%, same local loads / stores).
    auto compute = [&](int64_t, int stage, auto edge) {
      const T* sQ = smem.streamed(stage, 0);
      const T* sG = smem.streamed(stage, 1);  // grad_out
      // P^T and dP^T, then dS^T: this warp's 16 keys per group x kStream queries. lse and delta
      // belong to the query (column): one shared-memory read serves every group.
      acc pt[kG][kST][4], dpt[kG][kST][4];
      // The edge step's rows past Nq: exp(s - inf) is 0 but for s = inf * 0 (an infinite key against
      // their zero rows), NaN, which would reach that key's dk and dv. Their lse is +inf (a real row's
      // +inf reads as NaN: backward_lse), so P is zeroed there.
      auto exp_pt = [&] {
#pragma unroll
        for (int n = 0; n < kST; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const acc lse_c = smem.lse_at(stage, acc_col(n, e, lane));
            const bool past_nq = decltype(edge)::value && lse_c == std::numeric_limits<acc>::infinity();
#pragma unroll
            for (int g = 0; g < kG; ++g) pt[g][n][e] = past_nq ? acc(0) : Exp::exp_scaled(pt[g][n][e], scale_u, lse_c);
          }
      };
      auto delta_c = [&](int, int n, int e) { return smem.delta_at(stage, acc_col(n, e, lane)); };
      if constexpr (kWg) {  // two batches of two products: S^T, dP^T; then dV, dK
        wg_gemm_abt2<T, kD>(pt, sK, sQ, dpt, sV, sG);
        exp_pt();
#pragma unroll
        for (int g = 0; g < kG; ++g) grad_from_dp(dpt[g], pt[g], g, delta_c);
        wg_gemm_xb2<T, kD>(dv, pt, sG, dk, dpt, sQ, t.col0);
      } else {
        constexpr int live = kStream;  // every column: rows past Nq are zeros (above)
        gemm_abt<T, kD>(pt, sK, a0, sQ, live, lane, 0, kLo);
        exp_pt();
        gemm_xb<T, kD>(dv, pt, sG, t.col0, live, smem.scratch, lane, kLo);
        grad_scores<T, kD>(dpt, pt, sV, a0, sG, live, lane, delta_c, kLo);
        gemm_xb<T, kD>(dk, dpt, sQ, t.col0, live, smem.scratch, lane, kLo);
      }
    };
    auto land = [&](int stage) { split_streamed(smem, stage, queries, grads); };
    pipeline<Tiles::kStages, kStream, true, kWg>(p.Nq, load, compute, land);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      const int64_t row0 = t.row0 + group_row<kG, kWg>(warp, g);
      store_rows<T>(dk[g], static_cast<acc>(p.scale), p.dk, t, row0, p.Nk, Dk, lane);
      store_rows<T>(dv[g], acc(1), p.dv, t, row0, p.Nk, Dv, lane);
    }
  }
}

template <typename T, int kD, int kG, bool kWg, bool kDeep>
__global__ void __launch_bounds__(kThreads, QueryBlockTiles<T, kD, kG, kWg, kDeep>::kMinBlocks)
    dq_kernel(const SoftmaxAttentionParams p, const BwdAligned al) {
  using Tiles = QueryBlockTiles<T, kD, kG, kWg, kDeep>;
  using acc = typename Tiles::acc;
  using Exp = ExpUnits<T>;
  constexpr int kBlock = Tiles::kBlock, kStream = Tiles::kStream;
  constexpr int kST = kStream / 8, kOT = Tiles::kDOut / 8, kLo = Tiles::kLoShift;
  SOLA_DYNAMIC_SMEM(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const BwdSmem<Tiles> smem(smem_raw, warp);
  const int a0 = product_row0<kG, kWg>(warp);  // as in dkdv_kernel
  T* sQ = smem.resident[0];
  T* sG = smem.resident[1];  // grad_out
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const acc scale_u = static_cast<acc>(p.scale) * Exp::kPerNat;
  const int64_t chunks = Tiles::dq_chunks(p);
  const int64_t tiles = Tiles::dq_tiles(p);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileIndex t = tile_index<kBlock, Tiles::kDOut>(tile, p.Nq, p.H, chunks);
    load_tile<kBlock, kD, T, kWg>(sQ, p.q, t.b, t.h, t.row0, p.Nq - t.row0, 0, Dk, al.q, tid);
    load_tile<kBlock, kD, T, kWg>(sG, p.grad_out, t.b, t.h, t.row0, p.Nq - t.row0, 0, Dv, al.grad_out, tid);
    // lse (in ExpUnits) and delta of this lane's two rows per group; rows past Nq are never stored.
    acc lse[kG][2], delta[kG][2], dq[kG][kOT][4];
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = t.row0 + group_row<kG, kWg>(warp, g) + acc_row(2 * r, lane);
        const int64_t idx = t.bh * p.Nq + (i < p.Nq ? i : 0);
        lse[g][r] = backward_lse(static_cast<const acc*>(p.lse)[idx]) * Exp::kPerNat;
        delta[g][r] = static_cast<const acc*>(p.delta)[idx];
      }
      zero(dq[g]);
    }
    TileStream<kStream, kD, T, kWg> keys(p.k, t.b, t.h, 0, p.Nk, 0, Dk, al.k, tid);
    TileStream<kStream, kD, T, kWg> values(p.v, t.b, t.h, 0, p.Nk, 0, Dv, al.v, tid);
    auto load = [&](int64_t, int stage) {  // the next kStream key rows (steps in order)
      load_streamed(smem, stage, keys, values);
    };
    // One key tile; the edge tile masks P past Nk, and its products skip those n8 tiles.
    auto compute = [&](int64_t step, int stage, auto edge) {
      constexpr bool kEdge = decltype(edge)::value;
      const int live = kEdge ? live_rows<kStream>(p.Nk - step * kStream) : kStream;
      const T* sK = smem.streamed(stage, 0);
      const T* sV = smem.streamed(stage, 1);
      // P and dP, then dS: this warp's 16 queries per group x kStream keys.
      acc s[kG][kST][4], dp[kG][kST][4];
      auto delta_r = [&](int g, int, int e) { return delta[g][e >> 1]; };
      if constexpr (kWg) {
        wg_gemm_abt2<T, kD>(s, sQ, sK, dp, sG, sV);  // S and dP in one batch
      } else {
        gemm_abt<T, kD>(s, sQ, a0, sK, live, lane, 0, kLo);
      }
      // Keys past Nk are zero rows of K and V, but exp(0 - lse) need not be small: mask P.
#pragma unroll
      for (int n = 0; n < kST; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int g = 0; g < kG; ++g) {
            const bool in_range = !kEdge || acc_col(n, e, lane) < live;
            s[g][n][e] = in_range ? Exp::exp_scaled(s[g][n][e], scale_u, lse[g][e >> 1]) : acc(0);
          }
      if constexpr (kWg) {
#pragma unroll
        for (int g = 0; g < kG; ++g) grad_from_dp(dp[g], s[g], g, delta_r);
      } else {
        grad_scores<T, kD>(dp, s, sG, a0, sV, live, lane, delta_r, kLo);
      }
      gemm_xb<T, kD, kWg>(dq, dp, sK, t.col0, live, smem.scratch, lane, kLo);
    };
    auto land = [&](int stage) { split_streamed(smem, stage, keys, values); };
    pipeline<Tiles::kStages, kStream, true, kWg>(p.Nk, load, compute, land);
#pragma unroll
    for (int g = 0; g < kG; ++g)
      store_rows<T>(dq[g], static_cast<acc>(p.scale), p.dq, t, t.row0 + group_row<kG, kWg>(warp, g), p.Nq, Dk, lane);
  }
}

// dkdv_kernel with kGK row groups over the keys, dq_kernel with kGQ over the queries (kDeepK, kDeepQ:
// their streamed tiles double-buffered where BwdTiles::kStages allows).
template <typename T, int kD, int kGK, int kGQ, bool kWg, bool kDeepK, bool kDeepQ>
bool launch_bwd_tiles(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  using KeyTiles = KeyBlockTiles<T, kD, kGK, kWg, kDeepK>;
  using QueryTiles = QueryBlockTiles<T, kD, kGQ, kWg, kDeepQ>;
  if (!allow_dynamic_smem<dkdv_kernel<T, kD, kGK, kWg, kDeepK>>(KeyTiles::kSmem) ||
      !allow_dynamic_smem<dq_kernel<T, kD, kGQ, kWg, kDeepQ>>(QueryTiles::kSmem))
    return false;
  const BwdAligned al{rows_aligned16<T>(p.q), rows_aligned16<T>(p.k), rows_aligned16<T>(p.v),
                      rows_aligned16<T>(p.grad_out)};
  const int64_t key_tiles = KeyTiles::dkdv_tiles(p);
  dkdv_kernel<T, kD, kGK, kWg, kDeepK><<<grid_x(key_tiles, 1), kThreads, KeyTiles::kSmem, stream>>>(p, al);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t query_tiles = QueryTiles::dq_tiles(p);
  if (query_tiles > 0) {
    dq_kernel<T, kD, kGQ, kWg, kDeepQ><<<grid_x(query_tiles, 1), kThreads, QueryTiles::kSmem, stream>>>(p, al);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return true;
}

// Whether Tiles' kernel has a twin (kDeep false) for GPUs with 99 KB of shared memory a block (sm_86,
// sm_89, sm_120; every sm_80+ GPU has at least that): where its default tiles need more (16-bit dq at head
// dims 65-128, double-buffered: 102 KB; fp32 at 33-64: dkdv 102.5 KB, dq 102 KB; 16-bit at 129-256: dkdv
// 99.25 KB, dq 132 KB; fp32 dkdv at 65-128: 99.25 KB) and the twin's fit.
template <typename Deep, typename Shallow>
constexpr bool kHasShallowTwin = Deep::kSmem > 99 * 1024 && Shallow::kSmem <= 99 * 1024;

// A kernel whose default tiles exceed the device's shared memory a block takes its twin above;
// without one the flash backward does not launch (the caller falls back to the row kernels).
// SOLA_FLASH_BWD_TWIN=1 (read per launch) takes every twin there is: to time on an H100 what a 99 KB
// GPU runs (bench/kernels.py's sola_ops_twin rows).
template <typename T, int kD, int kGK, int kGQ, bool kWg>
bool launch_bwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  using DeepK = KeyBlockTiles<T, kD, kGK, kWg>;
  using DeepQ = QueryBlockTiles<T, kD, kGQ, kWg>;
  constexpr bool kTwinK = kHasShallowTwin<DeepK, KeyBlockTiles<T, kD, kGK, kWg, false>>;
  constexpr bool kTwinQ = kHasShallowTwin<DeepQ, QueryBlockTiles<T, kD, kGQ, kWg, false>>;
  if constexpr (kTwinK || kTwinQ) {
    const int optin = static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
    const char* forced = std::getenv("SOLA_FLASH_BWD_TWIN");
    const bool twins = forced != nullptr && std::strcmp(forced, "1") == 0;
    const bool shallow_k = kTwinK && (twins || DeepK::kSmem > optin);
    const bool shallow_q = kTwinQ && (twins || DeepQ::kSmem > optin);
    // `!kTwinK` is false wherever shallow_k can hold, and true (the deep kernel) in a branch only a config
    // without a twin compiles: no twin is instantiated where none fits.
    if (shallow_k && shallow_q) return launch_bwd_tiles<T, kD, kGK, kGQ, kWg, !kTwinK, !kTwinQ>(p, stream);
    if (shallow_k) return launch_bwd_tiles<T, kD, kGK, kGQ, kWg, !kTwinK, true>(p, stream);
    if (shallow_q) return launch_bwd_tiles<T, kD, kGK, kGQ, kWg, true, !kTwinQ>(p, stream);
  }
  return launch_bwd_tiles<T, kD, kGK, kGQ, kWg, true, true>(p, stream);
}

// kWg: the wgmma kernels (up to head dim 128; the caller checks flash_wgmma_enabled()).
template <typename T, bool kWg = false>
bool dispatch_bwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  return SOLA_HEADDIM_SWITCH(std::max(p.Dk, p.Dv), kD, [&] {
    if constexpr (kWg && kD > 128) {
      return false;
    } else {
      const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      return with_row_groups<T, kD>(p.Nk, p.B * p.H, sms, [&](auto key_groups) {
        // dq_kernel: two groups up to kD 64 (dQ of 128 columns for two groups does not fit in
        // registers: on mma.sync 188 bytes of spill).
        return with_row_groups<T, kD, 64>(p.Nq, p.B * p.H, sms, [&](auto query_groups) {
          return launch_bwd<T, kD, decltype(key_groups)::value, decltype(query_groups)::value, kWg>(p, stream);
        });
      });
    }
  });
}

}  // namespace flash
}  // namespace sola
