// CUDA forward of non-causal softmax attention. On sm_80+ the flash kernel runs
// (softmax_attention_flash_fwd.cuh: tensor cores for fp16/bf16, 3xTF32 on them for fp32, SIMT for
// fp64). GPUs before sm_80 and tiles beyond the device's shared memory (fp64 at head dims past 128)
// take the row kernel here: one warp per query row walks over all keys
// with an online softmax (running max m, running sum l), so memory is O(rows * D) and no score
// matrix exists. Lanes hold q_i and the output accumulator in slots d = lane + 32 * t.
#include <limits>

#include "cuda_utils.cuh"
#include "softmax_attention/softmax_attention_flash.h"

namespace sola {
namespace {

template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kRowThreads) fwd_kernel(const SoftmaxAttentionParams p) {
  using acc = acc_t<scalar_t>;
  constexpr int kSlots = kHeadDim / kWarpSize;
  constexpr acc kNegInf = -std::numeric_limits<acc>::infinity();
  const int lane = threadIdx.x % kWarpSize;
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const acc scale = static_cast<acc>(p.scale);
  const int64_t rows = p.B * p.H * p.Nq;
  for (int64_t row = warp_row0(); row < rows; row += warp_row_stride()) {
    const int64_t bh = row / p.Nq, i = row % p.Nq, b = bh / p.H, h = bh % p.H;
    acc q[kSlots], o[kSlots];
    load_slots(p.q.row<const scalar_t>(b, h, i), Dk, lane, q);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) o[t] = acc(0);
    acc m = kNegInf, l = acc(0);
    for (int64_t j = 0; j < p.Nk; ++j) {
      acc kj[kSlots], vj[kSlots];
      load_slots(p.k.row<const scalar_t>(b, h, j), Dk, lane, kj);
      const acc s = slot_dot(q, kj) * scale;
      // A NaN score never becomes the max (so m is never NaN); exp(NaN - m) then makes the row NaN.
      const acc m_new = s > m ? s : m;
      // m == m_new also covers -inf == -inf, whose difference would be NaN.
      const acc alpha = m_new == m ? acc(1) : std::exp(m - m_new);
      // While every score is -inf nothing is accumulated; a row of only -inf ends 0/0 = NaN, as torch.
      const acc pj = s == kNegInf ? acc(0) : std::exp(s - m_new);
      load_slots(p.v.row<const scalar_t>(b, h, j), Dv, lane, vj);
#pragma unroll
      for (int t = 0; t < kSlots; ++t) o[t] = o[t] * alpha + pj * vj[t];
      l = l * alpha + pj;
      m = m_new;
    }
    scalar_t* out = p.out.row<scalar_t>(b, h, i);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int c = lane + kWarpSize * t;
      if (c < Dv) out[c] = static_cast<scalar_t>(o[t] / l);
    }
    if (lane == 0) static_cast<acc*>(p.lse)[row] = row_lse(m, l);
  }
}

}  // namespace

void softmax_attention_fwd_cuda(const SoftmaxAttentionParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  const int64_t rows = p.B * p.H * p.Nq;
  if (rows == 0) return;  // no queries: out and lse are empty
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (sm80_or_newer() && (flash_fwd_tensor_cores(p, stream) || flash_fwd_simt(p, stream))) return;
  SOLA_DISPATCH_FLOATING(p.dtype, "softmax_attention_fwd_cuda", [&] {
    SOLA_HEADDIM_SWITCH(std::max(p.Dk, p.Dv), kHeadDim, [&] {
      fwd_kernel<scalar_t, kHeadDim><<<grid_x(rows, kRowWarps), kRowThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace sola
