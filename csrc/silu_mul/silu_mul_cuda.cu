// CUDA kernels of silu_mul (silu_mul.h). Memory-bound and elementwise: each thread takes one (row,
// vector) item of a grid-stride loop over rows x C / kV, kV elements a 16-byte vector, so adjacent
// threads read adjacent bytes of a row and every input (x, gate, grad: rows views at any row stride) is
// read once, every output written once. A row start or row stride off 16 bytes, or C not a multiple of
// kV, takes the same kernels with kV = 1 (element loads). Indices are 64-bit; the grid is capped
// (grid_x), so any rows x C fits.
#include "cuda_utils.cuh"
#include "row_views.cuh"
#include "silu_mul/silu_mul.h"
#include "vec_acc.cuh"

namespace sola {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int kV>
__global__ void __launch_bounds__(kThreads) silu_mul_fwd_kernel(const SiluMulParams p) {
  using acc = acc_t<scalar_t>;
  const int64_t nv = p.C / kV, items = p.rows * nv;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items; i += int64_t(gridDim.x) * kThreads) {
    const RowItem it(i, nv, kV);
    acc x[kV], g[kV];
    load_acc<kV>(static_cast<const scalar_t*>(p.x) + it.at(p.x_stride), x);
    load_acc<kV>(static_cast<const scalar_t*>(p.gate) + it.at(p.gate_stride), g);
#pragma unroll
    for (int e = 0; e < kV; ++e) x[e] = silu_mul_value(x[e], g[e]);
    store_acc<kV>(x, static_cast<scalar_t*>(p.out) + it.out(p.C));
  }
}

template <typename scalar_t, int kV>
__global__ void __launch_bounds__(kThreads) silu_mul_bwd_kernel(const SiluMulParams p) {
  using acc = acc_t<scalar_t>;
  const int64_t nv = p.C / kV, items = p.rows * nv;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items; i += int64_t(gridDim.x) * kThreads) {
    const RowItem it(i, nv, kV);
    acc grad[kV], x[kV], g[kV];
    load_acc<kV>(static_cast<const scalar_t*>(p.grad) + it.at(p.grad_stride), grad);
    load_acc<kV>(static_cast<const scalar_t*>(p.x) + it.at(p.x_stride), x);
    load_acc<kV>(static_cast<const scalar_t*>(p.gate) + it.at(p.gate_stride), g);
#pragma unroll
    for (int e = 0; e < kV; ++e) silu_mul_grads(grad[e], x[e], g[e], x[e], g[e]);  // (dx, dgate) in place
    store_acc<kV>(x, static_cast<scalar_t*>(p.out) + it.out(p.C));
    store_acc<kV>(g, static_cast<scalar_t*>(p.dgate) + it.out(p.C));
  }
}

// Whether the 16-byte vector kernels may run: C a multiple of the vector, every row of every tensor
// starting on a 16-byte boundary (pointer and row stride).
template <typename scalar_t>
bool vector_ok(const SiluMulParams& p) {
  return p.C % kVec16<scalar_t> == 0 && rows_aligned16<scalar_t>(p.x, p.x_stride) &&
         rows_aligned16<scalar_t>(p.gate, p.gate_stride) && rows_aligned16<scalar_t>(p.grad, p.grad_stride) &&
         rows_aligned16<scalar_t>(p.out, p.C) && rows_aligned16<scalar_t>(p.dgate, p.C);
}

}  // namespace

void silu_mul_fwd_cuda(const SiluMulParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "silu_mul_fwd_cuda", [&] {
    SOLA_VEC16_SWITCH(vector_ok<scalar_t>(p), scalar_t, kVec, [&] {
      silu_mul_fwd_kernel<scalar_t, kVec><<<grid_x(p.rows * (p.C / kVec), kThreads), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void silu_mul_bwd_cuda(const SiluMulParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "silu_mul_bwd_cuda", [&] {
    SOLA_VEC16_SWITCH(vector_ok<scalar_t>(p), scalar_t, kVec, [&] {
      silu_mul_bwd_kernel<scalar_t, kVec><<<grid_x(p.rows * (p.C / kVec), kThreads), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace sola
