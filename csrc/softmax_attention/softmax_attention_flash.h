// Host entry points of the flash softmax kernels: one tiling, tensor cores for fp16/bf16
// (mma.sync, sm_80+), SIMT for fp32/fp64. Each returns false, launching nothing, where it does
// not apply (another dtype, a head dim whose tiles exceed the device's shared memory); the
// caller then runs the row kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include "cuda_utils.cuh"

#include "softmax_attention/softmax_attention.h"

namespace sola {

// The callers check sm80_or_newer() first (cp.async, ldmatrix, mma.sync m16n8k16).
// out and lse.
bool flash_fwd_tensor_cores(const SoftmaxAttentionParams& p, cudaStream_t stream);
bool flash_fwd_simt(const SoftmaxAttentionParams& p, cudaStream_t stream);
// dq, dk, dv from q, k, v, grad_out, lse and delta = rowsum(grad_out * out) (already written).
bool flash_bwd_tensor_cores(const SoftmaxAttentionParams& p, cudaStream_t stream);
bool flash_bwd_simt(const SoftmaxAttentionParams& p, cudaStream_t stream);

}  // namespace sola
