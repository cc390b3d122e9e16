// Launches the token reduction (linear_attention_reduce.cuh) shared by forward and backward.
#include "linear_attention/linear_attention_cuda.cuh"
#include "linear_attention/linear_attention_reduce.cuh"

namespace sola {
namespace la {

template <typename scalar_t>
void launch_token_reduce(const TokenReduceArgs& a, cudaStream_t stream) {
  const unsigned grid = grid_x(a.heads * a.chunks * a.tiles_m * a.tiles_n, 1);
  bool done = false;
  if constexpr (kIsHalfType<scalar_t>) done = launch_token_reduce_tc<scalar_t>(a, stream);
  TORCH_INTERNAL_ASSERT(done || !a.rope_cos, "linear_attention: fused RoPE reached the SIMT token reduction");
  if constexpr (!std::is_same_v<scalar_t, double>) {  // fp64 plans the 64 tile only
    if (!done && a.tile == 32) {
      token_reduce_kernel<scalar_t, 32><<<grid, ReduceConfig<scalar_t, 32>::kBlockThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (!done && a.tile == 64) {
    token_reduce_kernel<scalar_t, 64><<<grid, ReduceConfig<scalar_t, 64>::kBlockThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (a.chunks > 1) launch_combine_chunks<acc_t<scalar_t>>(a, stream);
}

template <typename acc>
void launch_combine_chunks(const TokenReduceArgs& a, cudaStream_t stream) {
  const int64_t entries = a.heads * (int64_t(a.Dm) * a.Dn + a.Dm);
  combine_chunks_kernel<acc><<<grid_x(entries, kThreads), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_combine_chunks<float>(const TokenReduceArgs&, cudaStream_t);
template void launch_combine_chunks<double>(const TokenReduceArgs&, cudaStream_t);

template void launch_token_reduce<at::Half>(const TokenReduceArgs&, cudaStream_t);
template void launch_token_reduce<at::BFloat16>(const TokenReduceArgs&, cudaStream_t);
template void launch_token_reduce<float>(const TokenReduceArgs&, cudaStream_t);
template void launch_token_reduce<double>(const TokenReduceArgs&, cudaStream_t);

}  // namespace la
}  // namespace sola
