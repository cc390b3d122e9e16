// CUDA backward of non-causal softmax attention. delta_kernel runs first; then on sm_80+ the flash
// kernels (softmax_attention_flash_bwd.cuh), else (older GPUs, tiles beyond the device's shared
// memory) the row kernels here. The probabilities are recomputed from
// q, k and the saved lse, p_ij = exp(scale * q_i . k_j - lse_i), ds_ij = p_ij (g_i . v_j - delta_i):
//   delta_kernel (warp per query row): delta_i = g_i . out_i - grad_lse_i
//   dq_kernel    (warp per query row): dq_i = scale * sum_j ds_ij k_j
//   dkdv_kernel  (warp per key row):   dv_j = sum_i p_ij g_i,  dk_j = scale * sum_i ds_ij q_i
// Each gradient row is summed by one warp in a fixed order: deterministic, no atomics.
#include "cuda_utils.cuh"
#include "softmax_attention/softmax_attention_flash.h"

namespace sola {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) delta_kernel(const SoftmaxAttentionParams p) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t rows = p.B * p.H * p.Nq;
  for (int64_t row = warp_row0(); row < rows; row += warp_row_stride()) {
    const int64_t bh = row / p.Nq, i = row % p.Nq, b = bh / p.H, h = bh % p.H;
    const scalar_t* g = p.grad_out.row<const scalar_t>(b, h, i);
    const scalar_t* o = p.out.row<const scalar_t>(b, h, i);
    acc part = acc(0);
    for (int64_t c = lane; c < p.Dv; c += kWarpSize) part += static_cast<acc>(g[c]) * static_cast<acc>(o[c]);
    const acc delta = warp_sum(part);
    const acc* grad_lse = static_cast<const acc*>(p.grad_lse);
    if (lane == 0) static_cast<acc*>(p.delta)[row] = grad_lse ? delta - grad_lse[row] : delta;
  }
}

template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kRowThreads) dq_kernel(const SoftmaxAttentionParams p) {
  using acc = acc_t<scalar_t>;
  constexpr int kSlots = kHeadDim / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const acc scale = static_cast<acc>(p.scale);
  const int64_t rows = p.B * p.H * p.Nq;
  for (int64_t row = warp_row0(); row < rows; row += warp_row_stride()) {
    const int64_t bh = row / p.Nq, i = row % p.Nq, b = bh / p.H, h = bh % p.H;
    const acc lse = backward_lse(static_cast<const acc*>(p.lse)[row]);
    const acc delta = static_cast<const acc*>(p.delta)[row];
    acc q[kSlots], g[kSlots], dq[kSlots];
    load_slots(p.q.row<const scalar_t>(b, h, i), Dk, lane, q);
    load_slots(p.grad_out.row<const scalar_t>(b, h, i), Dv, lane, g);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) dq[t] = acc(0);
    for (int64_t j = 0; j < p.Nk; ++j) {
      acc kj[kSlots], vj[kSlots];
      load_slots(p.k.row<const scalar_t>(b, h, j), Dk, lane, kj);
      load_slots(p.v.row<const scalar_t>(b, h, j), Dv, lane, vj);
      const acc pij = std::exp(slot_dot(q, kj) * scale - lse);
      const acc ds = pij * (slot_dot(g, vj) - delta) * scale;
#pragma unroll
      for (int t = 0; t < kSlots; ++t) dq[t] += ds * kj[t];
    }
    scalar_t* dq_out = p.dq.row<scalar_t>(b, h, i);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int d = lane + kWarpSize * t;
      if (d < Dk) dq_out[d] = static_cast<scalar_t>(dq[t]);
    }
  }
}

// With Nq == 0 the loop is empty and dk, dv are written as zeros.
template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kRowThreads) dkdv_kernel(const SoftmaxAttentionParams p) {
  using acc = acc_t<scalar_t>;
  constexpr int kSlots = kHeadDim / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const acc scale = static_cast<acc>(p.scale);
  const acc* lse_all = static_cast<const acc*>(p.lse);
  const acc* delta_all = static_cast<const acc*>(p.delta);
  const int64_t rows = p.B * p.H * p.Nk;
  for (int64_t row = warp_row0(); row < rows; row += warp_row_stride()) {
    const int64_t bh = row / p.Nk, j = row % p.Nk, b = bh / p.H, h = bh % p.H;
    acc k[kSlots], v[kSlots], dk[kSlots], dv[kSlots];
    load_slots(p.k.row<const scalar_t>(b, h, j), Dk, lane, k);
    load_slots(p.v.row<const scalar_t>(b, h, j), Dv, lane, v);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) dk[t] = dv[t] = acc(0);
    for (int64_t i = 0; i < p.Nq; ++i) {
      acc qi[kSlots], gi[kSlots];
      load_slots(p.q.row<const scalar_t>(b, h, i), Dk, lane, qi);
      load_slots(p.grad_out.row<const scalar_t>(b, h, i), Dv, lane, gi);
      const int64_t r = bh * p.Nq + i;
      // The same products summed in the same order as the forward and dq_kernel.
      const acc pij = std::exp(slot_dot(qi, k) * scale - backward_lse(lse_all[r]));
      const acc ds = pij * (slot_dot(gi, v) - delta_all[r]) * scale;
#pragma unroll
      for (int t = 0; t < kSlots; ++t) {
        dv[t] += pij * gi[t];
        dk[t] += ds * qi[t];
      }
    }
    scalar_t* dk_out = p.dk.row<scalar_t>(b, h, j);
    scalar_t* dv_out = p.dv.row<scalar_t>(b, h, j);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int d = lane + kWarpSize * t;
      if (d < Dk) dk_out[d] = static_cast<scalar_t>(dk[t]);
      if (d < Dv) dv_out[d] = static_cast<scalar_t>(dv[t]);
    }
  }
}

}  // namespace

void softmax_attention_bwd_cuda(const SoftmaxAttentionParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t q_rows = p.B * p.H * p.Nq, k_rows = p.B * p.H * p.Nk;
  SOLA_DISPATCH_FLOATING(p.dtype, "softmax_attention_bwd_cuda", [&] {
    if (q_rows > 0) {
      delta_kernel<scalar_t><<<grid_x(q_rows, kRowWarps), kRowThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (sm80_or_newer() && (flash_bwd_tensor_cores(p, stream) || flash_bwd_simt(p, stream))) return;
    SOLA_HEADDIM_SWITCH(std::max(p.Dk, p.Dv), kHeadDim, [&] {
      if (q_rows > 0) {
        dq_kernel<scalar_t, kHeadDim><<<grid_x(q_rows, kRowWarps), kRowThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      dkdv_kernel<scalar_t, kHeadDim><<<grid_x(k_rows, kRowWarps), kRowThreads, 0, stream>>>(p);  // Nk >= 1
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace sola
