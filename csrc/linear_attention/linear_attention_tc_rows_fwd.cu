// The forward's tensor-core row kernel (linear_attention_tc.cuh: out = phi(q) S / den), fp16 and bf16,
// and where the tensor-core kernels take fused RoPE.
#include "linear_attention/linear_attention_tc.cuh"

namespace sola {
namespace la {

template RowsLaunch launch_rows_tc<at::Half, RowsMode::Out>(const LinearAttentionParams&, const BwdScratch&, cudaStream_t);
template RowsLaunch launch_rows_tc<at::BFloat16, RowsMode::Out>(const LinearAttentionParams&, const BwdScratch&, cudaStream_t);

}  // namespace la

// The conditions under which launch_token_reduce_tc and launch_rows_tc launch (every row mode,
// so the forward and the backward both run fused).
bool linear_attention_rope_fused_cuda(const LinearAttentionParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  if ((p.dtype != at::kHalf && p.dtype != at::kBFloat16) || !sm80_or_newer()) return false;
  const int64_t d = std::max(p.Dk, p.Dv);
  if (d > 128) return false;
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  auto fits = [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    using la::RowsMode, la::RowsTcConfig, la::RowsVariant;
    // RoPE comes without q_norm / k_norm (rope_tables checks it). Every variant must fit (the
    // unstaged ones are smaller): a kernel that cannot launch has no unfused fallback with RoPE.
    constexpr RowsVariant kPreSplit = RowsVariant::StagedPreSplit;
    const int64_t rows = std::max({RowsTcConfig<kD, RowsMode::Out>::smem_bytes(false, true),
                                   RowsTcConfig<kD, RowsMode::QueryGrad>::smem_bytes(false, true),
                                   RowsTcConfig<kD, RowsMode::KeyGrad>::smem_bytes(false, true),
                                   RowsTcConfig<kD, RowsMode::QueryGrad, kPreSplit>::smem_bytes(false, true),
                                   RowsTcConfig<kD, RowsMode::KeyGrad, kPreSplit>::smem_bytes(false, true)});
    const int64_t reduce = la::ReduceTcConfig<at::Half, 64>::smem_bytes(true, true);
    return std::max(rows, reduce) <= optin;
  };
  return la::with_rows_tc_bucket(d, fits);
}

}  // namespace sola
