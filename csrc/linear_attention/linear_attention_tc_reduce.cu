// The tensor-core token reduction (linear_attention_tc.cuh), fp16 and bf16.
#include "linear_attention/linear_attention_tc.cuh"

namespace sola {
namespace la {

template bool launch_token_reduce_tc<at::Half>(const TokenReduceArgs&, cudaStream_t);
template bool launch_token_reduce_tc<at::BFloat16>(const TokenReduceArgs&, cudaStream_t);

}  // namespace la
}  // namespace sola
