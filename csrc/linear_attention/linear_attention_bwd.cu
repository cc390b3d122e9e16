// CUDA kernels of non-causal linear attention, backward. With da_i = g_i / den_i and
// dd_i = -(g_i . num_i) / den_i^2 (den_i = 1, dd_i = 0 without normalize):
//   query_kernel  (warp per query row): den_i, dd_i -> scratch; dq_i (dqn_i).
//   dstate_kernel (thread per entry):   dS = sum_i phi(q_i) da_i^T, dz = sum_i phi(qn_i) dd_i.
//   key_kernel    (warp per key row):   dk_j (dkn_j), dv_j from dS and dz.
// Every sum runs in a fixed order in one thread or warp: deterministic, no atomics.
#include "cuda_utils.cuh"
#include "linear_attention/linear_attention.h"

namespace sola {
namespace {

// As in the forward: one block per kStateThreads entries of dS, one more for dz.
constexpr int kStateThreads = 256;
static_assert(kStateThreads >= kMaxCudaHeadDim, "a dz row must fit in one block");
constexpr int kSlots = kMaxCudaHeadDim / kWarpSize;

template <typename acc>
constexpr int state_tile_rows() {
  return static_cast<int>(16 * sizeof(float) / sizeof(acc));
}

inline unsigned state_blocks(int64_t Dk, int64_t Dv) {
  return static_cast<unsigned>((Dk * Dv + kStateThreads - 1) / kStateThreads);
}

// Phi of raw lane slots (see load_slots); padding stays 0 (phi(0) is 1 for elu).
template <FeatureMap FM, typename acc>
__device__ __forceinline__ void phi_slots(const acc (&x)[kSlots], int n, int lane, acc (&dst)[kSlots]) {
#pragma unroll
  for (int t = 0; t < kSlots; ++t) dst[t] = lane + kWarpSize * t < n ? Phi<FM>::f(x[t]) : acc(0);
}

// Scratch written by query_kernel and read by dstate_kernel, and dstate_kernel's result.
template <typename acc>
struct Scratch {
  acc* den;     // (B*H*Nq)
  acc* dd;      // (B*H*Nq)
  acc* dstate;  // (B*H, Dk, Dv)
  acc* dz;      // (B*H, Dk)
};

template <typename scalar_t, FeatureMap FM>
__global__ void __launch_bounds__(kRowThreads) query_kernel(const LinearAttentionParams p,
                                                            const Scratch<acc_t<scalar_t>> w) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const int64_t rows = p.B * p.H * p.Nq;
  for (int64_t row = warp_row0(); row < rows; row += warp_row_stride()) {
    const int64_t bh = row / p.Nq, i = row % p.Nq, b = bh / p.H, h = bh % p.H;
    const acc* S = static_cast<const acc*>(p.state) + bh * Dk * Dv;
    const acc* z = static_cast<const acc*>(p.z) + bh * Dk;
    acc xq[kSlots], fq[kSlots], num[kSlots], g[kSlots];
    load_slots(p.q.row<const scalar_t>(b, h, i), Dk, lane, xq);
    phi_slots<FM>(xq, Dk, lane, fq);
    warp_vec_mat(fq, S, Dk, Dv, lane, num);  // num_i, as in the forward
    load_slots(p.grad_out.row<const scalar_t>(b, h, i), Dv, lane, g);

    acc den = acc(1), dd = acc(0), xqn[kSlots], zs[kSlots];
    if (p.normalize) {
      acc fqn[kSlots];
      load_slots(p.qn.row<const scalar_t>(b, h, i), Dk, lane, xqn);
      phi_slots<FM>(xqn, Dk, lane, fqn);
      load_slots(z, Dk, lane, zs);
      den = slot_dot(fqn, zs) + static_cast<acc>(p.eps);
      dd = -slot_dot(g, num) / (den * den);
    }
    acc da[kSlots], dfq[kSlots];
#pragma unroll
    for (int u = 0; u < kSlots; ++u) da[u] = g[u] / den;
    warp_mat_vec(S, da, Dk, Dv, lane, dfq);  // dphi(q_i) = S da_i

    scalar_t* dq = p.dq.row<scalar_t>(b, h, i);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int a = lane + kWarpSize * t;
      if (a >= Dk) continue;
      acc dq_a = dfq[t] * Phi<FM>::df(xq[t]);
      if (p.normalize) {
        const acc dqn_a = zs[t] * dd * Phi<FM>::df(xqn[t]);
        if (p.has_qn) p.dqn.row<scalar_t>(b, h, i)[a] = static_cast<scalar_t>(dqn_a);
        else dq_a += dqn_a;
      }
      dq[a] = static_cast<scalar_t>(dq_a);
    }
    if (lane == 0) {
      w.den[row] = den;
      w.dd[row] = dd;
    }
  }
}

// grid = (heads, state_blocks + 1), block = kStateThreads; the forward's state_kernel with
// phi(q_i) for phi(k_j), da_i for v_j and no mean.
template <typename scalar_t, FeatureMap FM>
__global__ void __launch_bounds__(kStateThreads) dstate_kernel(const LinearAttentionParams p,
                                                               const Scratch<acc_t<scalar_t>> w) {
  using acc = acc_t<scalar_t>;
  constexpr int kRows = state_tile_rows<acc>();
  __shared__ acc fq_tile[kRows * kMaxCudaHeadDim];
  __shared__ acc da_tile[kRows * kMaxCudaHeadDim];
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const int64_t heads = p.B * p.H;

  if (blockIdx.y == gridDim.y - 1) {
    // dz[a]: thread a walks down column a of qn.
    const int a = threadIdx.x;
    if (a >= Dk) return;  // no barrier on this path
    for (int64_t bh = blockIdx.x; bh < heads; bh += gridDim.x) {
      const int64_t b = bh / p.H, h = bh % p.H;
      acc sum = acc(0);
      if (p.normalize)
        for (int64_t i = 0; i < p.Nq; ++i)
          sum += Phi<FM>::f(static_cast<acc>(p.qn.row<const scalar_t>(b, h, i)[a])) * w.dd[bh * p.Nq + i];
      w.dz[bh * Dk + a] = sum;
    }
    return;
  }

  const int e = blockIdx.y * kStateThreads + threadIdx.x;  // this thread's entry dS[a][c]
  const bool active = e < Dk * Dv;
  const int a = active ? e / Dv : 0, c = active ? e % Dv : 0;
  for (int64_t bh = blockIdx.x; bh < heads; bh += gridDim.x) {  // uniform per block
    const int64_t b = bh / p.H, h = bh % p.H;
    acc sum = acc(0);
    for (int64_t i0 = 0; i0 < p.Nq; i0 += kRows) {
      const int rows = p.Nq - i0 < kRows ? static_cast<int>(p.Nq - i0) : kRows;
      __syncthreads();  // every thread is done with the previous tile
      for (int idx = threadIdx.x; idx < rows * Dk; idx += kStateThreads)
        fq_tile[idx] = Phi<FM>::f(static_cast<acc>(p.q.row<const scalar_t>(b, h, i0 + idx / Dk)[idx % Dk]));
      for (int idx = threadIdx.x; idx < rows * Dv; idx += kStateThreads) {
        const int64_t i = i0 + idx / Dv;
        da_tile[idx] = static_cast<acc>(p.grad_out.row<const scalar_t>(b, h, i)[idx % Dv]) / w.den[bh * p.Nq + i];
      }
      __syncthreads();
      if (active)
        for (int t = 0; t < rows; ++t) sum += fq_tile[t * Dk + a] * da_tile[t * Dv + c];
    }
    if (active) w.dstate[bh * Dk * Dv + e] = sum;  // Nq == 0 leaves 0
  }
}

// One warp per key row:
//   dv_j = dS^T phi(k_j) / Nk,  dk_j = phi'(k_j) (dS v_j) / Nk,  dkn_j = phi'(kn_j) dz / Nk.
template <typename scalar_t, FeatureMap FM>
__global__ void __launch_bounds__(kRowThreads) key_kernel(const LinearAttentionParams p,
                                                          const Scratch<acc_t<scalar_t>> w) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const acc inv_nk = acc(1) / static_cast<acc>(p.Nk);
  const int64_t rows = p.B * p.H * p.Nk;
  for (int64_t row = warp_row0(); row < rows; row += warp_row_stride()) {
    const int64_t bh = row / p.Nk, j = row % p.Nk, b = bh / p.H, h = bh % p.H;
    const acc* dS = w.dstate + bh * Dk * Dv;
    acc xk[kSlots], fk[kSlots], v[kSlots], dv[kSlots], dfk[kSlots];
    load_slots(p.k.row<const scalar_t>(b, h, j), Dk, lane, xk);
    phi_slots<FM>(xk, Dk, lane, fk);
    load_slots(p.v.row<const scalar_t>(b, h, j), Dv, lane, v);
    warp_vec_mat(fk, dS, Dk, Dv, lane, dv);
    warp_mat_vec(dS, v, Dk, Dv, lane, dfk);

    acc xkn[kSlots], dz[kSlots];
    if (p.normalize) {
      load_slots(p.kn.row<const scalar_t>(b, h, j), Dk, lane, xkn);
      load_slots(w.dz + bh * Dk, Dk, lane, dz);
    }
    scalar_t* dk = p.dk.row<scalar_t>(b, h, j);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int a = lane + kWarpSize * t;
      if (a >= Dk) continue;
      acc dk_a = dfk[t] * inv_nk * Phi<FM>::df(xk[t]);
      const acc dkn_a = p.normalize ? dz[t] * inv_nk * Phi<FM>::df(xkn[t]) : acc(0);
      if (p.has_kn) p.dkn.row<scalar_t>(b, h, j)[a] = static_cast<scalar_t>(dkn_a);
      else dk_a += dkn_a;
      dk[a] = static_cast<scalar_t>(dk_a);
    }
    scalar_t* dv_out = p.dv.row<scalar_t>(b, h, j);
#pragma unroll
    for (int u = 0; u < kSlots; ++u) {
      const int c = lane + kWarpSize * u;
      if (c < Dv) dv_out[c] = static_cast<scalar_t>(dv[u] * inv_nk);
    }
  }
}

}  // namespace

void linear_attention_bwd_cuda(const LinearAttentionParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t heads = p.B * p.H, q_rows = heads * p.Nq, k_rows = heads * p.Nk;
  // Scratch on the current stream, so the caching allocator keeps it until the kernels are done.
  const auto options = at::TensorOptions()
                           .dtype(p.dtype == at::kDouble ? at::kDouble : at::kFloat)
                           .device(at::Device(at::kCUDA, p.device_index));
  const at::Tensor den = at::empty({q_rows}, options), dd = at::empty({q_rows}, options);
  const at::Tensor dstate = at::empty({heads * p.Dk * p.Dv}, options), dz = at::empty({heads * p.Dk}, options);
  const dim3 state_grid(grid_x(heads, 1), state_blocks(p.Dk, p.Dv) + 1);
  SOLA_DISPATCH_FLOATING(p.dtype, "linear_attention_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const Scratch<acc> w{den.data_ptr<acc>(), dd.data_ptr<acc>(), dstate.data_ptr<acc>(), dz.data_ptr<acc>()};
    SOLA_FEATURE_MAP_SWITCH(p.feature_map, kFM, [&] {
      if (q_rows > 0) {  // with Nq == 0, dS and dz are 0 and so are dk, dv
        query_kernel<scalar_t, kFM><<<grid_x(q_rows, kRowWarps), kRowThreads, 0, stream>>>(p, w);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      dstate_kernel<scalar_t, kFM><<<state_grid, kStateThreads, 0, stream>>>(p, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      key_kernel<scalar_t, kFM><<<grid_x(k_rows, kRowWarps), kRowThreads, 0, stream>>>(p, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace sola
