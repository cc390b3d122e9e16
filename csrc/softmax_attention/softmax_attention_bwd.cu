// CUDA backward of non-causal softmax attention. delta_kernel runs first; then on sm_80+ the flash
// kernels (softmax_attention_flash_bwd.cuh), else (older GPUs, tiles beyond the device's shared
// memory) the row kernels here. The probabilities are recomputed from
// q, k and the saved lse, p_ij = exp(scale * q_i . k_j - lse_i), ds_ij = p_ij (g_i . v_j - delta_i):
//   delta_kernel (a few lanes per query row): delta_i = g_i . out_i - grad_lse_i
//   dq_kernel    (warp per query row): dq_i = scale * sum_j ds_ij k_j
//   dkdv_kernel  (warp per key row):   dv_j = sum_i p_ij g_i,  dk_j = scale * sum_i ds_ij q_i
// Each gradient row is summed by one warp in a fixed order: deterministic, no atomics.
#include "cuda_utils.cuh"
#include "softmax_attention/softmax_attention_flash.h"
#include "vec_acc.cuh"

namespace sola {
namespace {

// `lanes` lanes (a power of two, 32 at most) share a query row: each sums the products of the
// kVec-element vectors at columns kVec * (sub + lanes * t) (16-byte loads when every row is aligned),
// then a butterfly over the row's lanes, a fixed order. A warp takes 32 / lanes rows a step, so a
// row's (b, h, i) division is paid by one lane group, not a warp. The kernel it replaces (a warp per
// row, one element a lane) ran at 83% SM and 14% DRAM throughput at head dim 32 (H200 profile:
// 167 us for 128 x 2 x 3136 rows, ~4x its bytes' time).
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kRowThreads) delta_kernel(const SoftmaxAttentionParams p, int lanes) {
  using acc = acc_t<scalar_t>;
  const int sub = threadIdx.x % lanes;
  const int rows_per_warp = kWarpSize / lanes;
  const int64_t rows = p.B * p.H * p.Nq;
  const int64_t mine = threadIdx.x % kWarpSize / lanes;
  const acc* grad_lse = static_cast<const acc*>(p.grad_lse);
  for (int64_t first = warp_row0() * rows_per_warp; first < rows; first += warp_row_stride() * rows_per_warp) {
    const int64_t row = first + mine;  // every lane of the warp runs each step: the shuffles need them all
    acc part = acc(0);
    if (row < rows) {
      const int64_t bh = row / p.Nq, i = row - bh * p.Nq, b = bh / p.H, h = bh - b * p.H;
      const scalar_t* g = p.grad_out.row<const scalar_t>(b, h, i);
      const scalar_t* o = p.out.row<const scalar_t>(b, h, i);
      for (int64_t c = int64_t(sub) * kVec; c < p.Dv; c += int64_t(lanes) * kVec) {
        acc gv[kVec], ov[kVec];
        load_acc<kVec>(g + c, gv);
        load_acc<kVec>(o + c, ov);
#pragma unroll
        for (int e = 0; e < kVec; ++e) part += gv[e] * ov[e];
      }
    }
    part = team_sum(part, lanes);
    if (sub == 0 && row < rows) static_cast<acc*>(p.delta)[row] = grad_lse ? part - grad_lse[row] : part;
  }
}

// delta_kernel's launch: 16-byte vectors when Dv is a whole number of them and both rows views are
// aligned, else one element a lane; the fewest lanes (a power of two) that cover Dv in one step.
template <typename scalar_t>
void launch_delta(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.Nq;
  constexpr int kVec = kVec16<scalar_t>;
  const bool vec = p.Dv % kVec == 0 && rows_aligned<scalar_t>(p.grad_out, kVec) && rows_aligned<scalar_t>(p.out, kVec);
  const int64_t pieces = vec ? p.Dv / kVec : p.Dv;
  int lanes = 1;
  while (lanes < kWarpSize && lanes < pieces) lanes *= 2;
  const unsigned grid = grid_x(rows, kRowThreads / lanes);
  if (vec) {
    delta_kernel<scalar_t, kVec><<<grid, kRowThreads, 0, stream>>>(p, lanes);
  } else {
    delta_kernel<scalar_t, 1><<<grid, kRowThreads, 0, stream>>>(p, lanes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    if (q_rows > 0) launch_delta<scalar_t>(p, stream);
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
