// Flash backward, fp16/bf16 on tensor cores (softmax_attention_flash_bwd.cuh).
#include "softmax_attention/softmax_attention_flash_bwd.cuh"

namespace sola {

bool flash_bwd_tensor_cores(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  if (flash_bwd_wgmma(p, stream)) return true;
  if (p.dtype == at::kHalf) return flash::dispatch_bwd<c10::Half>(p, stream);
  if (p.dtype == at::kBFloat16) return flash::dispatch_bwd<c10::BFloat16>(p, stream);
  return false;
}

}  // namespace sola
