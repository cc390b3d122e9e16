// CUDA kernels of non-causal linear attention, forward.
//   state_kernel: S = mean_j phi(k_j) v_j^T and z = mean_j phi(kn_j). Each thread owns one entry
//     and sums over the keys in order (deterministic, no atomics); keys come through shared memory.
//   out_kernel: one warp per query row, out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps).
#include "cuda_utils.cuh"
#include "linear_attention/linear_attention.h"

namespace sola {
namespace {

// One block covers kStateThreads entries of S; the last block row of the grid covers z, whose
// Dk <= kMaxCudaHeadDim entries fit in one block.
constexpr int kStateThreads = 256;
static_assert(kStateThreads >= kMaxCudaHeadDim, "a z row must fit in one block");

// Keys per shared-memory tile: two tiles of rows x 256 acc values, 32 KiB in all.
template <typename acc>
constexpr int state_tile_rows() {
  return static_cast<int>(16 * sizeof(float) / sizeof(acc));
}

// Number of S blocks per head (grid.y is this + 1 for z), at most 256 + 1.
inline unsigned state_blocks(int64_t Dk, int64_t Dv) {
  return static_cast<unsigned>((Dk * Dv + kStateThreads - 1) / kStateThreads);
}

// Phi of a row into lane slots; padding stays 0 (phi(0) is 1 for elu).
template <FeatureMap FM, typename acc, int kSlots, typename scalar_t>
__device__ __forceinline__ void load_phi_slots(const scalar_t* x, int n, int lane, acc (&dst)[kSlots]) {
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    const int d = lane + kWarpSize * t;
    dst[t] = d < n ? Phi<FM>::f(static_cast<acc>(x[d])) : acc(0);
  }
}

// grid = (heads, state_blocks + 1), block = kStateThreads.
template <typename scalar_t, FeatureMap FM>
__global__ void __launch_bounds__(kStateThreads) state_kernel(const LinearAttentionParams p) {
  using acc = acc_t<scalar_t>;
  constexpr int kRows = state_tile_rows<acc>();
  __shared__ acc fk_tile[kRows * kMaxCudaHeadDim];
  __shared__ acc v_tile[kRows * kMaxCudaHeadDim];
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const int64_t heads = p.B * p.H;
  const acc inv_nk = acc(1) / static_cast<acc>(p.Nk);

  if (blockIdx.y == gridDim.y - 1) {
    // z[a]: thread a walks down column a of kn; a warp reads consecutive elements of each row.
    const int a = threadIdx.x;
    if (a >= Dk) return;  // no barrier on this path
    for (int64_t bh = blockIdx.x; bh < heads; bh += gridDim.x) {
      const int64_t b = bh / p.H, h = bh % p.H;
      acc sum = acc(0);
      for (int64_t j = 0; j < p.Nk; ++j) sum += Phi<FM>::f(static_cast<acc>(p.kn.row<const scalar_t>(b, h, j)[a]));
      static_cast<acc*>(p.z)[bh * Dk + a] = sum * inv_nk;
    }
    return;
  }

  const int e = blockIdx.y * kStateThreads + threadIdx.x;  // this thread's entry S[a][c]
  const bool active = e < Dk * Dv;
  const int a = active ? e / Dv : 0, c = active ? e % Dv : 0;
  for (int64_t bh = blockIdx.x; bh < heads; bh += gridDim.x) {  // uniform per block
    const int64_t b = bh / p.H, h = bh % p.H;
    acc sum = acc(0);
    for (int64_t j0 = 0; j0 < p.Nk; j0 += kRows) {
      const int rows = p.Nk - j0 < kRows ? static_cast<int>(p.Nk - j0) : kRows;
      __syncthreads();  // every thread is done with the previous tile
      for (int idx = threadIdx.x; idx < rows * Dk; idx += kStateThreads)
        fk_tile[idx] = Phi<FM>::f(static_cast<acc>(p.k.row<const scalar_t>(b, h, j0 + idx / Dk)[idx % Dk]));
      for (int idx = threadIdx.x; idx < rows * Dv; idx += kStateThreads)
        v_tile[idx] = static_cast<acc>(p.v.row<const scalar_t>(b, h, j0 + idx / Dv)[idx % Dv]);
      __syncthreads();
      if (active)
        for (int t = 0; t < rows; ++t) sum += fk_tile[t * Dk + a] * v_tile[t * Dv + c];
    }
    if (active) static_cast<acc*>(p.state)[bh * Dk * Dv + e] = sum * inv_nk;
  }
}

// One warp per query row: lanes hold phi(q_i) and out_i in slots.
template <typename scalar_t, FeatureMap FM>
__global__ void __launch_bounds__(kRowThreads) out_kernel(const LinearAttentionParams p) {
  using acc = acc_t<scalar_t>;
  constexpr int kSlots = kMaxCudaHeadDim / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const int64_t rows = p.B * p.H * p.Nq;
  for (int64_t row = warp_row0(); row < rows; row += warp_row_stride()) {
    const int64_t bh = row / p.Nq, i = row % p.Nq, b = bh / p.H, h = bh % p.H;
    const acc* S = static_cast<const acc*>(p.state) + bh * Dk * Dv;
    const acc* z = static_cast<const acc*>(p.z) + bh * Dk;
    acc fq[kSlots], num[kSlots];
    load_phi_slots<FM>(p.q.row<const scalar_t>(b, h, i), Dk, lane, fq);
    warp_vec_mat(fq, S, Dk, Dv, lane, num);
    acc den = acc(1);
    if (p.normalize) {
      acc fqn[kSlots], zs[kSlots];
      load_phi_slots<FM>(p.qn.row<const scalar_t>(b, h, i), Dk, lane, fqn);
      load_slots(z, Dk, lane, zs);
      den = slot_dot(fqn, zs) + static_cast<acc>(p.eps);
    }
    scalar_t* out = p.out.row<scalar_t>(b, h, i);
#pragma unroll
    for (int u = 0; u < kSlots; ++u) {
      const int c = lane + kWarpSize * u;
      if (c < Dv) out[c] = static_cast<scalar_t>(num[u] / den);
    }
  }
}

}  // namespace

void linear_attention_fwd_cuda(const LinearAttentionParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t heads = p.B * p.H, rows = heads * p.Nq;
  const dim3 state_grid(grid_x(heads, 1), state_blocks(p.Dk, p.Dv) + 1);
  SOLA_DISPATCH_FLOATING(p.dtype, "linear_attention_fwd_cuda", [&] {
    SOLA_FEATURE_MAP_SWITCH(p.feature_map, kFM, [&] {
      state_kernel<scalar_t, kFM><<<state_grid, kStateThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (rows > 0) {  // with Nq == 0 the state and z are still outputs
        out_kernel<scalar_t, kFM><<<grid_x(rows, kRowWarps), kRowThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace sola
