// Flash forward, fp16/bf16 on Hopper's warpgroup MMA (softmax_attention_flash_fwd_wg.cuh).
// Without sm_90a code in the build flash_wgmma_enabled() is false and nothing here launches.
#include "softmax_attention/softmax_attention_flash_fwd_wg.cuh"

namespace sola {

bool flash_fwd_wgmma(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  if (!flash_wgmma_enabled()) return false;
  if (p.dtype == at::kHalf) return flash::dispatch_fwd_wg<c10::Half>(p, stream);
  if (p.dtype == at::kBFloat16) return flash::dispatch_fwd_wg<c10::BFloat16>(p, stream);
  return false;
}

}  // namespace sola
