// Flash forward of non-causal softmax attention on tensor cores (fp16/bf16). A block of 4 warps
// takes 64 query rows (16 per warp, Q held as A fragments in registers) and walks over the keys
// in tiles of 64: S = Q K^T, online softmax in registers (running max m and sum l per row, base-2
// exponent), then O += P V with P repacked from the S accumulators. Scores never leave registers.
// V of tile j is copied while S_j is computed and K of tile j+1 while P V_j is, so one buffer each
// suffices. Head dims pad up to 32/64/128/256; past 128 the output columns are split over blocks
// (each recomputes S) so the accumulators stay in registers.
#include <limits>

#include "cuda_utils.cuh"
#include "softmax_attention/softmax_attention_flash.cuh"
#include "softmax_attention/softmax_attention_flash.h"

namespace sola {
namespace flash {
namespace {

template <typename T, int kD>
struct FwdTiles {
  static constexpr int kBlockM = kBlockRows;
  static constexpr int kBlockN = 64;
  static constexpr int kDOut = kD < 128 ? kD : 128;  // output columns of one block
  static constexpr int kChunks = kD / kDOut;
  static constexpr int kLd = kD + kPad, kLdV = kDOut + kPad;
  static constexpr int kSmem = tile_bytes<T, kD>(kBlockM) + tile_bytes<T, kD>(kBlockN) + tile_bytes<T, kDOut>(kBlockN);
};

struct Aligned {
  bool q, k, v;
};

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const SoftmaxAttentionParams p, const Aligned al) {
  using Tiles = FwdTiles<T, kD>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kDOut = Tiles::kDOut;
  constexpr int kLd = Tiles::kLd, kLdV = Tiles::kLdV;
  constexpr int kNT = kBlockN / 8, kOT = kDOut / 8;  // n8 tiles of S and of O
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  SOLA_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kLd;
  T* sV = sK + kBlockN * kLd;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const int64_t m_blocks = ceil_div(p.Nq, kBlockM), n_blocks = ceil_div(p.Nk, kBlockN);
  const int64_t tiles = p.B * p.H * m_blocks * Tiles::kChunks;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int col0 = static_cast<int>(tile % Tiles::kChunks) * kDOut;
    const int64_t mb = tile / Tiles::kChunks % m_blocks, bh = tile / Tiles::kChunks / m_blocks;
    const int64_t b = bh / p.H, h = bh % p.H, m0 = mb * kBlockM;
    load_tile<kBlockM, kD>(sQ, p.q, b, h, m0, p.Nq - m0, 0, Dk, al.q, tid);
    load_tile<kBlockN, kD>(sK, p.k, b, h, 0, p.Nk, 0, Dk, al.k, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    FragA qf[kD / 16];
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) qf[kk] = load_a(sQ, kLd, warp * kWarpRows, 16 * kk, lane);

    float o[kOT][4];
    zero(o);
    // Rows lane/4 and lane/4 + 8 of the warp: running max (base 2) and this lane's part of the sum.
    float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
    for (int64_t nb = 0; nb < n_blocks; ++nb) {
      const int64_t n0 = nb * kBlockN;
      load_tile<kBlockN, kDOut>(sV, p.v, b, h, n0, p.Nk - n0, col0, Dv, al.v, tid);
      cp_async_commit();

      float s[kNT][4];
      zero(s);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk)
#pragma unroll
        for (int n = 0; n < kNT; ++n) mma_16816<T>(s[n], qf[kk], load_b_trans(sK, kLd, 8 * n, 16 * kk, lane));

      // Online softmax. Keys past Nk score -inf. A NaN score never becomes the max (fmaxf), so
      // exp2(NaN - m) makes its row NaN, as in torch.
      const int64_t valid = p.Nk - n0;
      float m_new[2] = {m[0], m[1]};
#pragma unroll
      for (int n = 0; n < kNT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = acc_col(n, e, lane) < valid ? s[n][e] * scale_log2 : kNegInf;
          m_new[e >> 1] = fmaxf(m_new[e >> 1], s[n][e]);
        }
      float base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share a row
        m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(kFullMask, m_new[r], 1));
        m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(kFullMask, m_new[r], 2));
        // While a row has seen only -inf, subtract 0: exp2(-inf) = 0 instead of exp2(-inf + inf) = NaN.
        base[r] = m_new[r] == kNegInf ? 0.f : m_new[r];
        const float alpha = exp2f(m[r] - base[r]);
        l[r] *= alpha;
#pragma unroll
        for (int n = 0; n < kOT; ++n) o[n][2 * r] *= alpha, o[n][2 * r + 1] *= alpha;
        m[r] = m_new[r];
      }
#pragma unroll
      for (int n = 0; n < kNT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = exp2f(s[n][e] - base[e >> 1]);
          l[e >> 1] += s[n][e];
        }

      cp_async_wait_all();
      __syncthreads();  // V_j is in; every warp is done with K_j
      if (nb + 1 < n_blocks) {
        load_tile<kBlockN, kD>(sK, p.k, b, h, n0 + kBlockN, p.Nk - n0 - kBlockN, 0, Dk, al.k, tid);
        cp_async_commit();
      }
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const FragA pf = acc_to_a<T>(s, kk);
#pragma unroll
        for (int n = 0; n < kOT; ++n) mma_16816<T>(o[n], pf, load_b(sV, kLdV, 16 * kk, 8 * n, lane));
      }
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
      if (col0 == 0 && lane % 4 == 0) static_cast<float*>(p.lse)[bh * p.Nq + i] = m[r] * kLn2 + logf(l[r]);
    }
  }
}

template <typename T, int kD>
bool launch_fwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  using Tiles = FwdTiles<T, kD>;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (Tiles::kSmem > static_cast<int>(prop->sharedMemPerBlockOptin)) return false;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(fwd_kernel<T, kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, Tiles::kSmem));
  const Aligned al{rows_aligned<T>(p.q, 8), rows_aligned<T>(p.k, 8), rows_aligned<T>(p.v, 8)};
  const int64_t tiles = p.B * p.H * ceil_div(p.Nq, Tiles::kBlockM) * Tiles::kChunks;
  fwd_kernel<T, kD><<<grid_x(tiles, 1), kThreads, Tiles::kSmem, stream>>>(p, al);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
bool dispatch_fwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  return SOLA_HEADDIM_SWITCH(std::max(p.Dk, p.Dv), kD, [&] { return launch_fwd<T, kD>(p, stream); });
}

}  // namespace
}  // namespace flash

bool try_flash_fwd(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  if (p.dtype == at::kHalf) return flash::dispatch_fwd<c10::Half>(p, stream);
  if (p.dtype == at::kBFloat16) return flash::dispatch_fwd<c10::BFloat16>(p, stream);
  return false;
}

}  // namespace sola
