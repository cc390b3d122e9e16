// Host entry points of the flash softmax kernels (fp16/bf16 on tensor cores, sm_80 and newer).
// Each returns false, launching nothing, where it does not apply (other dtypes, older GPUs, a
// head dim whose tiles exceed the device's shared memory); the caller then runs the row kernels.
#pragma once

#include <cuda_runtime_api.h>

#include "softmax_attention/softmax_attention.h"

namespace sola {

// out and lse.
bool try_flash_fwd(const SoftmaxAttentionParams& p, cudaStream_t stream);
// dq, dk, dv from q, k, v, grad_out, lse and delta = rowsum(grad_out * out) (already written).
bool try_flash_bwd(const SoftmaxAttentionParams& p, cudaStream_t stream);

}  // namespace sola
