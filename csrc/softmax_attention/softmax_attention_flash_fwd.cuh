// Flash forward of non-causal softmax attention. A block of 4 warps takes 64 query rows per row
// group (16 per warp and group; two groups on tensor cores up to head dim 128 past 64 queries,
// so each K / V fragment loaded feeds two mmas per warp) and walks over the keys in tiles:
// S = Q K^T, online softmax in registers (running max m and sum l per row), then O += P V.
// Scores never reach global memory. K / V tiles stream through a ring of 2-3 shared-memory stages
// (KvRing), copied by cp.async one or two tiles ahead of the step using them, with one barrier
// per step. Head dims pad up to 32/64/128/256;
// wide outputs are split over blocks in column chunks (each recomputes S) so the accumulators
// stay in registers.
// Instantiated per dtype family: softmax_attention_flash_fwd_{tc,simt}.cu. Hopper's wgmma forward
// (softmax_attention_flash_fwd_wg.cuh) shares the ring, the softmax step and the epilogue.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "cuda_utils.cuh"
#include "softmax_attention/softmax_attention_flash.cuh"
#include "softmax_attention/softmax_attention_flash.h"

namespace sola {
namespace flash {

struct FwdAligned {
  bool q, k, v;
};

// The K / V tiles of one head's keys through a ring of kStages shared-memory stages, filled kAhead
// tiles ahead by cp.async (kCore: wgmma's core-matrix layout, else rows padded by kPad<T>). Every
// thread commits one copy group per tile, empty past the last, so "tile j has landed" is always
// "all but this thread's newest kAhead - 1 groups have" (wait_tile), whatever Nk.
template <typename T, int kStages, int kAhead, int kBlockN, int kD, int kDOut, bool kCore = false>
struct KvRing {
  static constexpr int kLdK = kCore ? kD : kD + kPad<T>, kLdV = kCore ? kDOut : kDOut + kPad<T>;
  static constexpr int kStageElems = kBlockN * (kLdK + kLdV);
  TileStream<kBlockN, kD, T, kCore> keys;
  TileStream<kBlockN, kDOut, T, kCore> values;
  T* base;
  int64_t n_blocks;

  SOLA_HD KvRing(T* base_, const SoftmaxAttentionParams& p, const FwdAligned& al, int64_t b, int64_t h, int col0,
                 int tid)
      : keys(p.k, b, h, 0, p.Nk, 0, static_cast<int>(p.Dk), al.k, tid),
        values(p.v, b, h, 0, p.Nk, col0, static_cast<int>(p.Dv), al.v, tid),
        base(base_),
        n_blocks(ceil_div(p.Nk, kBlockN)) {}
  SOLA_HD T* k(int64_t j) const { return base + static_cast<int>(j % kStages) * kStageElems; }
  SOLA_HD T* v(int64_t j) const { return k(j) + kBlockN * kLdK; }
  // Copies tile j (tiles go in order) into its stage; commits a group either way.
  SOLA_HD void load(int64_t j) {
    if (j < n_blocks) {
      keys.load(k(j));
      values.load(v(j));
    }
    cp_async_commit();
  }
  SOLA_HD void load_first() {
#pragma unroll
    for (int j = 0; j < kAhead; ++j) load(j);
  }
  // This thread's copies of tile j have landed, when tiles up to j + kAhead - 1 were loaded.
  static SOLA_HD void wait_tile() { cp_async_wait<kAhead - 1>(); }
  // fp32: splits this thread's landed pieces of tile j for 3xTF32 (TileStream::split_landed).
  SOLA_HD void split_landed(int64_t j, int lo_shift) const {
    keys.split_landed(k(j), lo_shift);
    values.split_landed(v(j), lo_shift);
  }
};

// kGroups: row groups of 16 per warp (1 or 2: dispatch_fwd). kDeep: the larger shared-memory layout
// (launch_fwd takes the other where it would cost blocks per SM on the device): 3 K / V stages on
// tensor cores (else 2; SIMT always has 2), fp32's operands split where they land (kPreSplit).
template <typename T, int kD, int kGroups = 1, bool kDeep = true>
struct FwdTiles {
  using acc = acc_t<T>;
  static constexpr bool kTensor = kIsHalfType<T>;
  static constexpr int kBlockM = kBlockRows * kGroups;
  // Keys per step: 64 on tensor cores up to head dim 64, else 32, so that S, O and the K / V
  // ring leave as many blocks per SM as registers allow (2-4; SIMT: S and O of wide heads).
  static constexpr int kBlockN = kTensor && kD <= 64 ? 64 : 32;
  // Output columns of one block: what fits in registers next to S.
  static constexpr int kDOut = std::min(kD, kTensor ? 128 : static_cast<int>(256 / sizeof(acc)));
  static SOLA_HD int64_t chunks(const SoftmaxAttentionParams& p) { return column_chunks<kDOut>(p.Dv); }
  // Work items of the kernel's grid-stride loop: (b, h, row block, column chunk).
  static SOLA_HD int64_t tiles(const SoftmaxAttentionParams& p) {
    return p.B * p.H * ceil_div(p.Nq, kBlockM) * chunks(p);
  }
  static constexpr int kLd = kD + kPad<T>, kLdV = kDOut + kPad<T>;
  static constexpr int kScratch = !kSimt<T> ? 0 : kWarps * kWarpRows * kScratchLd<acc, kBlockN>;
  // K / V stages: 3 (two tiles in flight) on tensor cores, else 2 (SIMT is bound by its FMAs).
  static constexpr int kStages = kTensor && kDeep ? 3 : 2;
  // Q and the K / V stages, in elements.
  static constexpr int kTileElems = kBlockM * kLd + kStages * kBlockN * (kLd + kLdV);
  // fp32 up to head dim 64 keeps the 3xTF32 lo parts of Q, K and V in as many elements after them
  // (kLoShift from each element to its lo part), split once where a tile lands rather than per warp
  // and fragment (the split was ~20 of the fp32 step's ~24 instructions per mma): 55 / 104 KB, 4 / 2
  // blocks per SM. Past 64 that would leave one block per SM (kD 128: 170 KB) or none (256): there
  // every warp splits its fragments (kLoShift 0).
  static constexpr bool kPreSplit = kTf32x3<T> && kDeep && 2 * kTileElems * static_cast<int>(sizeof(T)) <= 113 * 1024;
  static constexpr int kLoShift = kPreSplit ? kTileElems : 0;
  static constexpr int kSmem =
      kTileElems * (kPreSplit ? 2 : 1) * static_cast<int>(sizeof(T)) + kScratch * static_cast<int>(sizeof(acc));
  using Ring = KvRing<T, kStages, kStages - 1, kBlockN, kD, kDOut>;
};

// exp(scale * s - m) needs the max of the scaled scores; with scale >= 0 that is the max of the
// raw scores, scaled once per row (rounding is monotonic). A negative scale negates the Q tile
// instead (exactly: -q k^T = -(q k^T), and (-s)(-scale) = s scale). scale_units: |scale| in ExpUnits.
template <typename T>
SOLA_HD acc_t<T> scale_units(const SoftmaxAttentionParams& p) {
  return static_cast<acc_t<T>>(p.scale < 0 ? -p.scale : p.scale) * ExpUnits<T>::kPerNat;
}

// Online softmax of one key tile for every row group: s (scores of rows lane/4 and lane/4 + 8 of
// each group) becomes P in place, the running max m (in ExpUnits) and this lane's part of the
// row sum l move on, and alpha gets the factor O must be scaled by. A NaN score never becomes the
// max (fmax), so exp(NaN * scale - m) makes its row NaN, as in torch. kEdge: columns from `live`
// on are keys past Nk (P = 0 there, without their exponentials).
template <typename T, bool kEdge, int kG, int kNT, typename acc>
SOLA_HD void online_softmax(acc (&s)[kG][kNT][4], acc (&m)[kG][2], acc (&l)[kG][2], acc (&alpha)[kG][2], int live,
                            acc scale_u, int lane) {
  using Exp = ExpUnits<T>;
  constexpr acc kNegInf = -std::numeric_limits<acc>::infinity();
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    acc raw[2] = {kNegInf, kNegInf};  // max of this tile's raw scores per row
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!kEdge || acc_col(n, e, lane) < live) raw[e >> 1] = std::fmax(raw[e >> 1], s[g][n][e]);
    acc base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share a row
      raw[r] = std::fmax(raw[r], __shfl_xor_sync(kFullMask, raw[r], 1));
      raw[r] = std::fmax(raw[r], __shfl_xor_sync(kFullMask, raw[r], 2));
      const acc m_new = std::fmax(m[g][r], Exp::scaled(raw[r], scale_u));
      // While a row has seen only -inf, subtract 0: exp(-inf) = 0 instead of exp(-inf + inf) = NaN.
      base[r] = m_new == kNegInf ? acc(0) : m_new;
      // exp(0) = 1 exactly when the max stays, whatever the exp2 approximation gives at 0.
      alpha[g][r] = m_new == m[g][r] ? acc(1) : Exp::exp(m[g][r] - base[r]);
      l[g][r] *= alpha[g][r];
      m[g][r] = m_new;
    }
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      if (kEdge && 8 * n >= live) {  // past the keys: P = 0 without the exponentials
#pragma unroll
        for (int e = 0; e < 4; ++e) s[g][n][e] = acc(0);
        continue;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const acc pe = Exp::exp_scaled(s[g][n][e], scale_u, base[e >> 1]);
        s[g][n][e] = !kEdge || acc_col(n, e, lane) < live ? pe : acc(0);
        l[g][e >> 1] += s[g][n][e];
      }
    }
  }
}

// o *= alpha per row. Once the running max settles, alpha is 1 for most tiles: the warp skips a
// group's rescale (kOT x 4 multiplies per lane, 64 at head dim 128) unless some row's max moved.
template <int kG, int kOT, typename acc>
SOLA_HD void rescale(acc (&o)[kG][kOT][4], const acc (&alpha)[kG][2]) {
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    if (__any_sync(kFullMask, alpha[g][0] != acc(1) || alpha[g][1] != acc(1))) {
#pragma unroll
      for (int n = 0; n < kOT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[g][n][e] *= alpha[g][e >> 1];
    }
  }
}

// The epilogue: out = o / l for this lane's rows of the block at m0 (columns col0 ..) and, from
// the first column chunk, lse. A row of only -inf scores has l = 0 and ends 0/0 = NaN with
// lse = -inf, as torch.
template <int kG, bool kWg, typename T, int kOT, typename acc>
SOLA_HD void store_rows(const SoftmaxAttentionParams& p, const acc (&o)[kG][kOT][4], const acc (&m)[kG][2],
                        const acc (&l)[kG][2], int64_t b, int64_t h, int64_t m0, int col0, int warp, int lane) {
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      acc sum = l[g][r];
      sum += __shfl_xor_sync(kFullMask, sum, 1);
      sum += __shfl_xor_sync(kFullMask, sum, 2);
      const int64_t i = m0 + group_row<kG, kWg>(warp, g) + acc_row(2 * r, lane);
      if (i >= p.Nq) continue;
      T* out = p.out.row<T>(b, h, i);
#pragma unroll
      for (int n = 0; n < kOT; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const int c = col0 + acc_col(n, e, lane);
          if (c < p.Dv) out[c] = static_cast<T>(o[g][n][e] / sum);
        }
      if (col0 == 0 && lane % 4 == 0)
        static_cast<acc*>(p.lse)[(b * p.H + h) * p.Nq + i] = row_lse(ExpUnits<T>::to_nat(m[g][r]), sum);
    }
}

// One key tile per step over a ring of K / V stages (FwdTiles::Ring, kStages - 1 tiles in flight):
// wait for tile j, one barrier (tile j is in for every warp, and every warp is done with step
// j - 1, whose stage tile j + kStages - 1 then refills), S = Q K_j^T, online softmax, O += P V_j.
template <typename T, int kD, int kG, bool kDeep>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const SoftmaxAttentionParams p, const FwdAligned al) {
  using Tiles = FwdTiles<T, kD, kG, kDeep>;
  using Ring = typename Tiles::Ring;
  using acc = typename Tiles::acc;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kDOut = Tiles::kDOut;
  constexpr int kLd = Tiles::kLd, kStages = Tiles::kStages;
  constexpr int kNT = kBlockN / 8, kOT = kDOut / 8;  // n8 tiles of S and of O
  constexpr acc kNegInf = -std::numeric_limits<acc>::infinity();
  SOLA_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* ring_base = sQ + kBlockM * kLd;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // fp64's scratch; fp32's lo parts take that place instead (FwdTiles::kLoShift).
  acc* scratch =
      reinterpret_cast<acc*>(ring_base + kStages * Ring::kStageElems) + warp * kWarpRows * kScratchLd<acc, kBlockN>;
  constexpr int kLoShift = Tiles::kLoShift;
  const int Dk = static_cast<int>(p.Dk);
  const bool negate_q = p.scale < 0;
  const acc scale_u = scale_units<T>(p);
  const int64_t full_blocks = p.Nk / kBlockN, n_blocks = ceil_div(p.Nk, kBlockN);
  const int64_t chunks = Tiles::chunks(p);
  const int64_t tiles = Tiles::tiles(p);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileIndex t = tile_index<kBlockM, kDOut>(tile, p.Nq, p.H, chunks);
    const int64_t b = t.b, h = t.h, m0 = t.row0;
    const int col0 = t.col0;
    Ring ring(ring_base, p, al, b, h, col0, tid);
    __syncthreads();  // every warp is done with the previous work item's tiles
    load_tile<kBlockM, kD, T>(sQ, p.q, b, h, m0, p.Nq - m0, 0, Dk, al.q, tid);
    cp_async_commit();
    ring.load_first();
    cp_async_wait<kStages - 1>();  // Q
    __syncthreads();
    if constexpr (Tiles::kPreSplit) {  // Q split once for every key tile (negated first, if so)
      split_tile<kBlockM, kD>(sQ, kLoShift, negate_q, tid);
      __syncthreads();
    } else if (negate_q) {
      negate_tile<kBlockM * kLd>(sQ, tid);
      __syncthreads();
    }

    acc o[kG][kOT][4];
    // Rows lane/4 and lane/4 + 8 of each group: running max (in ExpUnits) and this lane's part of the sum.
    acc m[kG][2], l[kG][2];
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      zero(o[g]);
      m[g][0] = m[g][1] = kNegInf;
      l[g][0] = l[g][1] = acc(0);
    }
    // One key tile. kEdge: the last tile, with keys past Nk (P = 0 there); full tiles skip the masking.
    auto key_step = [&](int64_t j, auto edge) {
      constexpr bool kEdge = decltype(edge)::value;
      const int live = kEdge ? live_rows<kBlockN>(p.Nk - j * kBlockN) : kBlockN;  // the products skip the rest
      ring.wait_tile();
      if constexpr (Tiles::kPreSplit) ring.split_landed(j, kLoShift);  // this thread's pieces, before the barrier
      __syncthreads();  // tile j is in for every warp; every warp is done with tile j - 1
      ring.load(j + kStages - 1);

      acc s[kG][kNT][4];
      gemm_abt<T, kD>(s, sQ, product_row0<kG, false>(warp), ring.k(j), live, lane, kLoShift, kLoShift);
      acc alpha[kG][2];
      online_softmax<T, kEdge>(s, m, l, alpha, live, scale_u, lane);
      rescale(o, alpha);
      gemm_xb<T, kDOut>(o, s, ring.v(j), 0, live, scratch, lane, kLoShift);
    };
    if constexpr (Tiles::kTensor) {
      for (int64_t j = 0; j < full_blocks; ++j) key_step(j, std::false_type{});
      if (full_blocks < n_blocks) key_step(full_blocks, std::true_type{});
    } else {
      for (int64_t j = 0; j < n_blocks; ++j) key_step(j, std::true_type{});
    }
    cp_async_wait<0>();  // the empty groups past the last tile
    store_rows<kG, false, T>(p, o, m, l, b, h, m0, col0, warp, lane);
  }
}

template <typename T, int kD, int kG, bool kDeep>
bool launch_fwd_stages(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  using Tiles = FwdTiles<T, kD, kG, kDeep>;
  if (!allow_dynamic_smem<fwd_kernel<T, kD, kG, kDeep>>(Tiles::kSmem)) return false;
  const FwdAligned al{rows_aligned16<T>(p.q), rows_aligned16<T>(p.k), rows_aligned16<T>(p.v)};
  fwd_kernel<T, kD, kG, kDeep><<<grid_x(Tiles::tiles(p), 1), kThreads, Tiles::kSmem, stream>>>(p, al);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Where two blocks of the deep layout need more than 81 KiB each (kD 128 with two groups, kD 256;
// fp32 at kD 64: 104 KB), an SM with less than twice that (A100: 164 KB; sm_86 / sm_89: 100 KB)
// takes the other (2 stages; fp32 split per fragment), so blocks per SM hold (and kD 256 still fits
// sm_86's 99 KB per block); H100 / H200 keep the deep one.
template <typename T, int kD, int kG>
bool launch_fwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  using Deep = FwdTiles<T, kD, kG, true>;
  if constexpr ((Deep::kTensor || Deep::kPreSplit) && Deep::kSmem > 81 * 1024) {
    const size_t per_sm = at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor;
    if (2 * (static_cast<size_t>(Deep::kSmem) + 1024) > per_sm) return launch_fwd_stages<T, kD, kG, false>(p, stream);
  }
  return launch_fwd_stages<T, kD, kG, true>(p, stream);
}

template <typename T>
bool dispatch_fwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  return SOLA_HEADDIM_SWITCH(std::max(p.Dk, p.Dv), kD, [&] {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    return with_row_groups<T, kD, 128>(p.Nq, p.B * p.H, sms, [&](auto groups) {
      return launch_fwd<T, kD, decltype(groups)::value>(p, stream);
    });
  });
}

}  // namespace flash
}  // namespace sola
