// Flash forward of non-causal softmax attention. A block of 4 warps takes 64 query rows (16 per
// warp) and walks over the keys in tiles: S = Q K^T, online softmax in registers (running max m
// and sum l per row), then O += P V. Scores never reach global memory. V of
// tile j is copied (cp.async) while S_j is computed and K of tile j+1 while P V_j is, so one
// buffer each suffices. Head dims pad up to 32/64/128/256; wide outputs are split over blocks in
// column chunks (each recomputes S) so the accumulators stay in registers.
// Instantiated per dtype family: softmax_attention_flash_fwd_{tc,simt}.cu.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "cuda_utils.cuh"
#include "softmax_attention/softmax_attention_flash.cuh"
#include "softmax_attention/softmax_attention_flash.h"

namespace sola {
namespace flash {

template <typename T, int kD>
struct FwdTiles {
  using acc = acc_t<T>;
  static constexpr bool kTensor = kIsHalfType<T>;
  static constexpr int kBlockM = kBlockRows;
  static constexpr int kBlockN = kTensor || kD <= 64 ? 64 : 32;
  // Output columns of one block: what fits in registers next to S.
  static constexpr int kDOut = std::min(kD, kTensor ? 128 : static_cast<int>(256 / sizeof(acc)));
  static SOLA_HD int64_t chunks(const SoftmaxAttentionParams& p) { return column_chunks<kDOut>(p.Dv); }
  // Work items of the kernel's grid-stride loop: (b, h, row block, column chunk).
  static SOLA_HD int64_t tiles(const SoftmaxAttentionParams& p) {
    return p.B * p.H * ceil_div(p.Nq, kBlockM) * chunks(p);
  }
  static constexpr int kLd = kD + kPad, kLdV = kDOut + kPad;
  static constexpr int kScratch = kTensor ? 0 : kWarps * kWarpRows * kScratchLd<acc, kBlockN>;
  static constexpr int kSmem = tile_bytes<T, kD>(kBlockM) + tile_bytes<T, kD>(kBlockN) +
                               tile_bytes<T, kDOut>(kBlockN) + kScratch * static_cast<int>(sizeof(acc));
};

struct FwdAligned {
  bool q, k, v;
};

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const SoftmaxAttentionParams p, const FwdAligned al) {
  using Tiles = FwdTiles<T, kD>;
  using acc = typename Tiles::acc;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kDOut = Tiles::kDOut;
  constexpr int kLd = Tiles::kLd, kLdV = Tiles::kLdV;
  constexpr int kNT = kBlockN / 8, kOT = kDOut / 8;  // n8 tiles of S and of O
  constexpr acc kNegInf = -std::numeric_limits<acc>::infinity();
  SOLA_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kLd;
  T* sV = sK + kBlockN * kLd;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  acc* scratch = reinterpret_cast<acc*>(sV + kBlockN * kLdV) + warp * kWarpRows * kScratchLd<acc, kBlockN>;
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  using Exp = ExpUnits<T>;
  const acc scale_u = static_cast<acc>(p.scale) * Exp::kPerNat;
  const int64_t n_blocks = ceil_div(p.Nk, kBlockN);
  const int64_t chunks = Tiles::chunks(p);
  const int64_t tiles = Tiles::tiles(p);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileIndex t = tile_index<kBlockM, kDOut>(tile, p.Nq, p.H, chunks);
    const int64_t b = t.b, h = t.h, bh = t.bh, m0 = t.row0;
    const int col0 = t.col0;
    load_tile<kBlockM, kD>(sQ, p.q, b, h, m0, p.Nq - m0, 0, Dk, al.q, tid);
    load_tile<kBlockN, kD>(sK, p.k, b, h, 0, p.Nk, 0, Dk, al.k, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    acc o[kOT][4];
    zero(o);
    // Rows lane/4 and lane/4 + 8 of the warp: running max (in ExpUnits) and this lane's part of the sum.
    acc m[2] = {kNegInf, kNegInf}, l[2] = {acc(0), acc(0)};
    for (int64_t nb = 0; nb < n_blocks; ++nb) {
      const int64_t n0 = nb * kBlockN;
      load_tile<kBlockN, kDOut>(sV, p.v, b, h, n0, p.Nk - n0, col0, Dv, al.v, tid);
      cp_async_commit();

      acc s[kNT][4];
      zero(s);
      gemm_abt<T, kD>(s, sQ, warp * kWarpRows, sK, lane);

      // Online softmax. Keys past Nk score -inf. A NaN score never becomes the max (fmax), so
      // exp(NaN - m) makes its row NaN, as in torch.
      acc m_new[2] = {m[0], m[1]};
      for_each_acc<kNT>(p.Nk - n0, lane, [&](int n, int e, bool in_range) {
        s[n][e] = in_range ? Exp::scaled(s[n][e], scale_u) : kNegInf;
        m_new[e >> 1] = std::fmax(m_new[e >> 1], s[n][e]);
      });
      acc base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share a row
        m_new[r] = std::fmax(m_new[r], __shfl_xor_sync(kFullMask, m_new[r], 1));
        m_new[r] = std::fmax(m_new[r], __shfl_xor_sync(kFullMask, m_new[r], 2));
        // While a row has seen only -inf, subtract 0: exp(-inf) = 0 instead of exp(-inf + inf) = NaN.
        base[r] = m_new[r] == kNegInf ? acc(0) : m_new[r];
        const acc alpha = Exp::exp(m[r] - base[r]);
        l[r] *= alpha;
#pragma unroll
        for (int n = 0; n < kOT; ++n) o[n][2 * r] *= alpha, o[n][2 * r + 1] *= alpha;
        m[r] = m_new[r];
      }
#pragma unroll
      for (int n = 0; n < kNT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = Exp::exp(s[n][e] - base[e >> 1]);
          l[e >> 1] += s[n][e];
        }

      cp_async_wait_all();
      __syncthreads();  // V_j is in; every warp is done with K_j
      if (nb + 1 < n_blocks) {
        load_tile<kBlockN, kD>(sK, p.k, b, h, n0 + kBlockN, p.Nk - n0 - kBlockN, 0, Dk, al.k, tid);
        cp_async_commit();
      }
      gemm_xb<T, kDOut>(o, s, sV, 0, scratch, lane);
      cp_async_wait_all();
      __syncthreads();  // K_{j+1} is in; every warp is done with V_j
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
      l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
      const int64_t i = m0 + warp * kWarpRows + acc_row(2 * r, lane);
      if (i >= p.Nq) continue;
      // A row of only -inf scores has l = 0 and ends 0/0 = NaN with lse = -inf, as torch.
      T* out = p.out.row<T>(b, h, i);
#pragma unroll
      for (int n = 0; n < kOT; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const int c = col0 + acc_col(n, e, lane);
          if (c < Dv) out[c] = static_cast<T>(o[n][e] / l[r]);
        }
      if (col0 == 0 && lane % 4 == 0) static_cast<acc*>(p.lse)[bh * p.Nq + i] = Exp::to_nat(m[r]) + std::log(l[r]);
    }
  }
}

template <typename T, int kD>
bool launch_fwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  using Tiles = FwdTiles<T, kD>;
  if (!allow_dynamic_smem<fwd_kernel<T, kD>, Tiles::kSmem>()) return false;
  const FwdAligned al{rows_aligned16<T>(p.q), rows_aligned16<T>(p.k), rows_aligned16<T>(p.v)};
  const int64_t tiles = Tiles::tiles(p);
  fwd_kernel<T, kD><<<grid_x(tiles, 1), kThreads, Tiles::kSmem, stream>>>(p, al);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
bool dispatch_fwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  return SOLA_HEADDIM_SWITCH(std::max(p.Dk, p.Dv), kD, [&] { return launch_fwd<T, kD>(p, stream); });
}

}  // namespace flash
}  // namespace sola
