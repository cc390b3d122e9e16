// Flash forward, fp32 on the tensor cores in 3xTF32 and fp64 on the FMA pipes (softmax_attention_flash_fwd.cuh).
#include "softmax_attention/softmax_attention_flash_fwd.cuh"

namespace sola {

bool flash_fwd_simt(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  if (p.dtype == at::kFloat) return flash::dispatch_fwd<float>(p, stream);
  if (p.dtype == at::kDouble) return flash::dispatch_fwd<double>(p, stream);
  return false;
}

}  // namespace sola
