// Flash forward on Hopper's warpgroup MMA (wgmma, sm_90a), fp16 / bf16, head dims up to 128.
// A block is one warpgroup (4 warps) over 64 query rows per row group (two groups: 128 rows, the
// 64-row M tiles of wgmma), the same tiling and softmax as the mma.sync kernel
// (softmax_attention_flash_fwd.cuh), plus what asynchronous products allow:
// - Overlap. Step j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} (async), waits for S_j only,
//   runs the online softmax of S_j while the tensor cores still work on P_{j-1} V_{j-1}, then
//   waits for that product and rescales O. P_{j-1} waits in registers as bf16 / fp16 A fragments.
// - A deeper ring of K / V stages (KvRing, as the mma.sync kernel's), filled kAhead tiles ahead.
// Stage reuse: tile j + kAhead goes to the stage of tile j - 2, free once every warp has passed
// the barrier of step j (each waited for P_{j-2} V_{j-2} in step j - 1), so kStages = kAhead + 2.
// Instantiated in softmax_attention_flash_fwd_wgmma.cu.
#pragma once

#include "softmax_attention/softmax_attention_flash_fwd.cuh"

namespace sola {
namespace flash {

template <typename T, int kD, int kGroups>
struct WgFwdTiles {
  static_assert(kIsHalfType<T> && kD <= 128, "wgmma: fp16 / bf16 up to head dim 128");
  using Base = FwdTiles<T, kD, kGroups>;
  static constexpr int kBlockM = Base::kBlockM, kDOut = Base::kDOut;
  // Keys per step: 64, 32 past head dim 64 (two groups: S and O of both in registers; one group:
  // a ring of 64-key stages would take 144 KB, one block per SM).
  static constexpr int kBlockN = kD <= 64 ? 64 : 32;
  static constexpr int kAhead = 2, kStages = kAhead + 2;
  // Tiles in core-matrix layout (no padding): Q, then the ring's kStages x (K tile, V tile).
  using Ring = KvRing<T, kStages, kAhead, kBlockN, kD, kDOut, true>;
  static constexpr int kSmem = (kBlockM * kD + kStages * Ring::kStageElems) * static_cast<int>(sizeof(T));
};

template <typename T, int kD, int kG>
__global__ void __launch_bounds__(kThreads) fwd_wg_kernel(const SoftmaxAttentionParams p, const FwdAligned al) {
  using Tiles = WgFwdTiles<T, kD, kG>;
  using Ring = typename Tiles::Ring;
  using acc = float;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kDOut = Tiles::kDOut;
  constexpr int kAhead = Tiles::kAhead;
  constexpr int kNT = kBlockN / 8, kOT = kDOut / 8;  // n8 tiles of S and of O
  constexpr acc kNegInf = -std::numeric_limits<acc>::infinity();
  SOLA_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Tiles written by this block's threads (cp.async, or stores of zeros) become visible to the wgmmas.
  auto publish = [] {
    wgmma::async_proxy_fence();
    __syncthreads();
  };
  const int Dk = static_cast<int>(p.Dk);
  const bool negate_q = p.scale < 0;
  const acc scale_u = scale_units<T>(p);
  const int64_t full_blocks = p.Nk / kBlockN, n_blocks = ceil_div(p.Nk, kBlockN);
  const int64_t tiles = FwdTiles<T, kD, kG>::tiles(p);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileIndex t = tile_index<kBlockM, kDOut>(tile, p.Nq, p.H, FwdTiles<T, kD, kG>::chunks(p));
    const int64_t b = t.b, h = t.h, m0 = t.row0;
    const int col0 = t.col0;
    Ring ring(sQ + kBlockM * kD, p, al, b, h, col0, tid);
    __syncthreads();  // the previous work item's last products are done with Q and the stages
    load_tile<kBlockM, kD, T, true>(sQ, p.q, b, h, m0, p.Nq - m0, 0, Dk, al.q, tid);
    cp_async_commit();
    ring.load_first();
    cp_async_wait<kAhead>();  // Q
    publish();
    if (negate_q) {
      negate_tile<kBlockM * kD>(sQ, tid);
      publish();
    }

    acc o[kG][kOT][4];
    acc m[kG][2], l[kG][2];  // running max (ExpUnits) and this lane's part of the sum, rows lane/4 (+8)
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      zero(o[g]);
      m[g][0] = m[g][1] = kNegInf;
      l[g][0] = l[g][1] = acc(0);
    }
    FragA pf[kG][kNT / 2];  // P_{j-1}, read by the wgmmas of step j until its second wait

    // Step j. kFirst: no P V to issue yet; kEdge: the last tile, keys from `live` on past Nk.
    auto key_step = [&](int64_t j, auto first, auto edge) {
      constexpr bool kFirst = decltype(first)::value, kEdge = decltype(edge)::value;
      ring.wait_tile();
      publish();  // tile j for everyone; every warp is done with tile j - 2
      ring.load(j + kAhead);

      acc s[kG][kNT][4];
      operand_fence(s);
      operand_fence(o);
      operand_fence(pf);
      wgmma::fence();
      wg_issue_abt<T, kD>(s, sQ, 0, ring.k(j));
      wgmma::commit();
      if constexpr (!kFirst) {
        wg_issue_xb<T, kDOut>(o, pf, ring.v(j - 1), 0);
        wgmma::commit();
      }
      wgmma::wait<kFirst ? 0 : 1>();  // S_j (P_{j-1} V_{j-1} may still run)
      operand_fence(s);

      const int live = kEdge ? live_rows<kBlockN>(p.Nk - j * kBlockN) : kBlockN;
      acc alpha[kG][2];
      online_softmax<T, kEdge>(s, m, l, alpha, live, scale_u, lane);

      wgmma::wait<0>();  // P_{j-1} V_{j-1}: o and pf are free
      operand_fence(o);
      operand_fence(pf);
      rescale(o, alpha);
      pack_a<T>(pf, s);
    };
    if (n_blocks > 0) {
      if (full_blocks == 0) {
        key_step(0, std::true_type{}, std::true_type{});
      } else {
        key_step(0, std::true_type{}, std::false_type{});
        for (int64_t j = 1; j < full_blocks; ++j) key_step(j, std::false_type{}, std::false_type{});
        if (full_blocks < n_blocks) key_step(full_blocks, std::false_type{}, std::true_type{});
      }
      // The last P V. (Tiles past the keys were committed empty: nothing is left in flight.)
      wg_batch([&] { wg_issue_xb<T, kDOut>(o, pf, ring.v(n_blocks - 1), 0); }, o, pf);
    }
    cp_async_wait<0>();  // the empty groups (nothing lands; the count starts over per work item)
    store_rows<kG, true, T>(p, o, m, l, b, h, m0, col0, warp, lane);
  }
}

template <typename T, int kD, int kG>
bool launch_fwd_wg(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  using Tiles = WgFwdTiles<T, kD, kG>;
  if (!allow_dynamic_smem<fwd_wg_kernel<T, kD, kG>>(Tiles::kSmem)) return false;
  const FwdAligned al{rows_aligned16<T>(p.q), rows_aligned16<T>(p.k), rows_aligned16<T>(p.v)};
  fwd_wg_kernel<T, kD, kG><<<grid_x(FwdTiles<T, kD, kG>::tiles(p), 1), kThreads, Tiles::kSmem, stream>>>(p, al);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Head dims up to 128 (false past them: the caller runs the mma.sync kernels).
template <typename T>
bool dispatch_fwd_wg(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  return SOLA_HEADDIM_SWITCH(std::max(p.Dk, p.Dv), kD, [&] {
    if constexpr (kD > 128) {
      return false;
    } else {
      const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      return with_row_groups<T, kD, 128>(p.Nq, p.B * p.H, sms, [&](auto groups) {
        return launch_fwd_wg<T, kD, decltype(groups)::value>(p, stream);
      });
    }
  });
}

}  // namespace flash
}  // namespace sola
