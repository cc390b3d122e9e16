// The backward's tensor-core row kernels (linear_attention_tc.cuh: QueryGrad, KeyGrad), fp16 and bf16.
#include "linear_attention/linear_attention_tc.cuh"

namespace sola {
namespace la {

template RowsLaunch launch_rows_tc<at::Half, RowsMode::QueryGrad>(const LinearAttentionParams&, const BwdScratch&, cudaStream_t);
template RowsLaunch launch_rows_tc<at::BFloat16, RowsMode::QueryGrad>(const LinearAttentionParams&, const BwdScratch&, cudaStream_t);
template RowsLaunch launch_rows_tc<at::Half, RowsMode::KeyGrad>(const LinearAttentionParams&, const BwdScratch&, cudaStream_t);
template RowsLaunch launch_rows_tc<at::BFloat16, RowsMode::KeyGrad>(const LinearAttentionParams&, const BwdScratch&, cudaStream_t);

}  // namespace la
}  // namespace sola
