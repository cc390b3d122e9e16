// Flash backward, fp32 on the tensor cores in 3xTF32 and fp64 on the FMA pipes (softmax_attention_flash_bwd.cuh).
#include "softmax_attention/softmax_attention_flash_bwd.cuh"

namespace sola {

bool flash_bwd_simt(const SoftmaxAttentionParams& p, cudaStream_t stream) {
  if (p.dtype == at::kFloat) return flash::dispatch_bwd<float>(p, stream);
  if (p.dtype == at::kDouble) return flash::dispatch_bwd<double>(p, stream);
  return false;
}

}  // namespace sola
