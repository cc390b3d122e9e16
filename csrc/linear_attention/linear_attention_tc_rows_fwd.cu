// The forward's tensor-core row kernel (linear_attention_tc.cuh: out = phi(q) S / den), fp16 and bf16.
#include "linear_attention/linear_attention_tc.cuh"

namespace sola {
namespace la {

template RowsLaunch launch_rows_tc<at::Half, RowsMode::Out>(const LinearAttentionParams&, const BwdScratch&, cudaStream_t);
template RowsLaunch launch_rows_tc<at::BFloat16, RowsMode::Out>(const LinearAttentionParams&, const BwdScratch&, cudaStream_t);

}  // namespace la
}  // namespace sola
