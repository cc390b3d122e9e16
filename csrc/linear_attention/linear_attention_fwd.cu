// CUDA forward of non-causal linear attention, two passes:
//   1. token reduction (linear_attention_reduce.cuh): S = mean_j phi(k_j) v_j^T, z = mean_j phi(kn_j),
//      split over key chunks when heads are few, partials summed in chunk order (deterministic);
//   2. rows_kernel<Out> (linear_attention_rows.cuh): out_i = phi(q_i) S / (phi(qn_i) . z + eps).
// Feature maps, q_norm/k_norm and normalize=False are applied in the kernels' load stages; no
// phi(q) or phi(k) tensor is ever written to memory.
#include "linear_attention/linear_attention_cuda.cuh"

namespace sola {

void linear_attention_fwd_cuda(const LinearAttentionParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  la::TokenReduceArgs state = la::state_reduce_args(p);
  // Partials on the current stream: the caching allocator keeps them until the kernels are done.
  const auto acc_options = at::TensorOptions()
                               .dtype(acc_dtype(p.dtype))
                               .device(at::Device(at::kCUDA, p.device_index));
  const at::Tensor partials = at::empty({la::token_reduce_workspace(state)}, acc_options);
  state.partials = partials.data_ptr();
  SOLA_DISPATCH_FLOATING(p.dtype, "linear_attention_fwd_cuda", [&] {
    la::launch_token_reduce<scalar_t>(state, stream);
    la::launch_rows<scalar_t, la::RowsMode::Out>(p, la::BwdScratch{}, p.Dv, stream);
  });
}

}  // namespace sola
