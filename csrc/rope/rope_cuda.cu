// CUDA kernels of the fused feature map + rotary embedding (rope.h), forward and backward.
// Element-wise and memory-bound: each thread takes one 16-byte vector of a row (8 fp16/bf16, 4 fp32,
// 2 fp64 elements: whole channel pairs, as D is even) and its cos / sin values, grid-stride over
// every vector of every row. Misaligned views and a row's last partial vector take element loads.
#include "cuda_utils.cuh"
#include "linear_attention/linear_attention_device.cuh"
#include "rope/rope.h"

namespace sola {
namespace {

constexpr int kRopeThreads = 256;

// Alignment of everything a kernel touches per row, decided once per launch on the host.
struct RopeAlignment {
  bool x, a, b, out, table;  // forward: a = rot, b = feat; backward: a = grad_rot, b = grad_feat
};

// kBackward: dx from grad_rot (and grad_feat) and x; else rot (and feat) from x.
template <typename scalar_t, FeatureMap FM, bool kBackward>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p, const RopeAlignment al) {
  using acc = acc_t<scalar_t>;
  constexpr int kV = kVec16<scalar_t>, kP = kV / 2;
  const int64_t vectors_per_row = ceil_div(p.D, kV), total = p.B * p.H * p.N * vectors_per_row, half = p.D / 2;
  const int64_t stride = int64_t(gridDim.x) * kRopeThreads;
  const int D = static_cast<int>(p.D);
  for (int64_t i = int64_t(blockIdx.x) * kRopeThreads + threadIdx.x; i < total; i += stride) {
    // thread-vector i: columns col .. col + kV - 1 of row i / vectors_per_row
    const RopeRow v = rope_row(p, i / vectors_per_row);
    const int col = static_cast<int>(i % vectors_per_row) * kV;
    acc x[kV], c[kP], s[kP], out[kV];
    la::load_cols<kV>(p.x.row<const scalar_t>(v.b, v.h, v.n), col, D, al.x, x);
    la::load_cols<kP>(static_cast<const acc*>(p.cos) + v.n * half, col / 2, static_cast<int>(half), al.table, c);
    la::load_cols<kP>(static_cast<const acc*>(p.sin) + v.n * half, col / 2, static_cast<int>(half), al.table, s);
    if constexpr (kBackward) {
      acc g[kV], gf[kV];
      la::load_cols<kV>(p.grad_rot.row<const scalar_t>(v.b, v.h, v.n), col, D, al.a, g);
      if (p.grad_feat.ptr) {
        la::load_cols<kV>(p.grad_feat.row<const scalar_t>(v.b, v.h, v.n), col, D, al.b, gf);
      } else {
#pragma unroll
        for (int e = 0; e < kV; ++e) gf[e] = acc(0);
      }
#pragma unroll
      for (int j = 0; j < kP; ++j)
        unrotate_pair(g[2 * j], g[2 * j + 1], gf[2 * j], gf[2 * j + 1], c[j], s[j], out[2 * j], out[2 * j + 1]);
#pragma unroll
      for (int e = 0; e < kV; ++e) out[e] = through_phi(out[e], Phi<FM>::df(x[e]));
      la::store_cols<kV>(p.dx.row<scalar_t>(v.b, v.h, v.n), col, D, al.out, out);
    } else {
#pragma unroll
      for (int e = 0; e < kV; ++e) x[e] = Phi<FM>::f(x[e]);  // x now holds phi(x)
#pragma unroll
      for (int j = 0; j < kP; ++j) rotate_pair(x[2 * j], x[2 * j + 1], c[j], s[j], out[2 * j], out[2 * j + 1]);
      la::store_cols<kV>(p.rot.row<scalar_t>(v.b, v.h, v.n), col, D, al.a, out);
      if (p.feat.ptr) la::store_cols<kV>(p.feat.row<scalar_t>(v.b, v.h, v.n), col, D, al.b, x);
    }
  }
}

template <typename scalar_t>
RopeAlignment alignment(const RopeParams& p, const View4& a, const View4& b, const View4& out) {
  constexpr int kV = kVec16<scalar_t>;
  const bool table = rope_tables_aligned<acc_t<scalar_t>>(p.cos, p.sin, p.D / 2, kV / 2);
  return {rows_aligned<scalar_t>(p.x, kV), rows_aligned<scalar_t>(a, kV), !b.ptr || rows_aligned<scalar_t>(b, kV),
          !out.ptr || rows_aligned<scalar_t>(out, kV), table};
}

template <bool kBackward>
void launch(const RopeParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "rope_cuda", [&] {
    const int64_t vectors = p.B * p.H * p.N * ceil_div(p.D, kVec16<scalar_t>);
    const unsigned grid = grid_x(vectors, kRopeThreads);
    const RopeAlignment al = kBackward ? alignment<scalar_t>(p, p.grad_rot, p.grad_feat, p.dx)
                                       : alignment<scalar_t>(p, p.rot, p.feat, {});
    SOLA_FEATURE_MAP_SWITCH(p.feature_map, kFM, [&] {
      rope_kernel<scalar_t, kFM, kBackward><<<grid, kRopeThreads, 0, stream>>>(p, al);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

void rope_fwd_cuda(const RopeParams& p) { launch<false>(p); }
void rope_bwd_cuda(const RopeParams& p) { launch<true>(p); }

}  // namespace sola
