// CUDA backward of non-causal linear attention. With den_i = phi(qn_i) . z + eps,
// u_i = S g_i, dd_i = -(phi(q_i) . u_i) / den_i^2 (den_i = 1, dd_i = 0 without normalize):
//   1. rows_kernel<QueryGrad>: dq_i = phi'(q_i) u_i / den_i (+ phi'(qn_i) z dd_i, or into dqn);
//      keeps 1/den_i and dd_i per query;
//   2. token reduction (the forward's template): dS = sum_i phi(q_i) (g_i / den_i)^T,
//      dz = sum_i phi(qn_i) dd_i, split over query chunks, summed in chunk order; up to head
//      dim 32 (not fp64) QueryGrad sums them itself instead (query_grad_sums_dstate: no second
//      read of q and g, no 1/den and dd);
//   3. rows_kernel<KeyGrad>: dv_j = dS^T phi(k_j) / Nk, then for the same rows
//      dk_j = phi'(k_j) (dS v_j) / Nk (+ phi'(kn_j) dz / Nk, or into dkn).
// Deterministic (fixed summation orders, no atomics); reuses the forward's state and z.
#include <algorithm>

#include "linear_attention/linear_attention_cuda.cuh"

namespace sola {

void linear_attention_bwd_cuda(const LinearAttentionParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t heads = p.B * p.H;
  // Scratch on the current stream, so the caching allocator keeps it until the kernels are done.
  const auto acc_options = at::TensorOptions()
                               .dtype(acc_dtype(p.dtype))
                               .device(at::Device(at::kCUDA, p.device_index));
  const bool fold = la::query_grad_sums_dstate(p);
  const int64_t per_query = fold ? 0 : heads * p.Nq;
  const at::Tensor inv_den = at::empty({per_query}, acc_options), dd = at::empty({per_query}, acc_options);
  const at::Tensor dstate = at::empty({heads * p.Dk * p.Dv}, acc_options), dz = at::empty({heads * p.Dk}, acc_options);
  const la::BwdScratch s{inv_den.data_ptr(), dd.data_ptr(), dstate.data_ptr(), dz.data_ptr()};
  SOLA_DISPATCH_FLOATING(p.dtype, "linear_attention_bwd_cuda", [&] {
    // Bucketed by both widths: the fold needs all of g in one stage of the head-dim 32 kernel.
    const bool summed = la::launch_rows<scalar_t, la::RowsMode::QueryGrad>(p, s, std::max(p.Dk, p.Dv), stream);
    TORCH_INTERNAL_ASSERT(summed == fold, "linear_attention_bwd_cuda: QueryGrad's dS fold disagrees with its plan");
    if (!summed) {
      la::TokenReduceArgs dstate_args = la::dstate_reduce_args(p, s);
      const at::Tensor partials = at::empty({la::token_reduce_workspace(dstate_args)}, acc_options);
      dstate_args.partials = partials.data_ptr();
      la::launch_token_reduce<scalar_t>(dstate_args, stream);  // Nq == 0 gives dS = dz = 0
    }
    la::launch_rows<scalar_t, la::RowsMode::KeyGrad>(p, s, std::max(p.Dk, p.Dv), stream);
  });
}

}  // namespace sola
