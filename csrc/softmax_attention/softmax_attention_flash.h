// Host entry points of the flash softmax kernels: one tiling, tensor cores for fp16/bf16
// (mma.sync, sm_80+), SIMT for fp32/fp64. Each returns false, launching nothing, where it does
// not apply (another dtype, a head dim whose tiles exceed the device's shared memory); the
// caller then runs the row kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "cuda_utils.cuh"

#include "softmax_attention/softmax_attention.h"

namespace sola {

// The wgmma kernels run on a compute capability 9.0 GPU (H100, H200) when this build has sm_90a
// code (setup.py defines SOLA_SM90A when TORCH_CUDA_ARCH_LIST names 9.0a, which it makes of 9.0)
// and, until they are measured against the mma.sync kernels on a GPU, only when the environment
// asks for them: SOLA_FLASH_WGMMA=1 (read per launch).
inline bool flash_wgmma_enabled() {
#if defined(SOLA_SM90A) || defined(SOLA_HOST_EMULATION)
  const char* wanted = std::getenv("SOLA_FLASH_WGMMA");
  if (wanted == nullptr || std::strcmp(wanted, "1") != 0) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
#else
  return false;
#endif
}

// The callers check sm80_or_newer() first (cp.async, ldmatrix, mma.sync m16n8k16).
// out and lse.
bool flash_fwd_tensor_cores(const SoftmaxAttentionParams& p, cudaStream_t stream);
// The same kernels on Hopper's warpgroup MMA (fp16 / bf16, head dims up to 128): only where
// flash_wgmma_enabled(); flash_{fwd,bwd}_tensor_cores try them first.
bool flash_fwd_wgmma(const SoftmaxAttentionParams& p, cudaStream_t stream);
bool flash_fwd_simt(const SoftmaxAttentionParams& p, cudaStream_t stream);
// dq, dk, dv from q, k, v, grad_out, lse and delta = rowsum(grad_out * out) (already written).
bool flash_bwd_tensor_cores(const SoftmaxAttentionParams& p, cudaStream_t stream);
bool flash_bwd_wgmma(const SoftmaxAttentionParams& p, cudaStream_t stream);  // as flash_fwd_wgmma
bool flash_bwd_simt(const SoftmaxAttentionParams& p, cudaStream_t stream);

}  // namespace sola
