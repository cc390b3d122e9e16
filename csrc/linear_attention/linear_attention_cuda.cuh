// Host-side launchers of the linear-attention CUDA kernels, shared by the forward and backward
// translation units. Each kernel template is instantiated in one translation unit only:
// token_reduce_kernel in linear_attention_reduce.cu, rows_kernel<Out> in the forward file and the
// other row modes in the backward file.
#pragma once

#include <type_traits>

#include "cuda_utils.cuh"
#include "linear_attention/linear_attention_plan.h"
#include "linear_attention/linear_attention_rows.cuh"

namespace sola {
namespace la {

// S/z or dS/dz (TokenReduceArgs, planned), then the chunk combine when the tokens were split.
template <typename scalar_t>
void launch_token_reduce(const TokenReduceArgs& a, cudaStream_t stream);
// The combine alone: results = scale * sum of a.chunks partials, in chunk order.
template <typename acc>
void launch_combine_chunks(const TokenReduceArgs& a, cudaStream_t stream);

// What a row-kernel launch did: launched (else the caller runs another kernel) and, for
// QueryGrad, whether it summed dS and dz too (else the backward runs the token reduction).
struct RowsLaunch {
  bool launched = false, summed_dstate = false;
};

// Where QueryGrad's own dS, dz sums go (query_grad_sums_dstate): dstate_reduce_args with one token
// chunk per block group, so group c writes chunk c's partial and combine() sums them in group order
// (one group writes the results directly). Default-constructed: no fold, combine() does nothing.
struct DstateFold {
  TokenReduceArgs args;
  at::Tensor partials;  // on the current stream: the allocator keeps it until the combine has run

  DstateFold() = default;
  DstateFold(const LinearAttentionParams& p, const BwdScratch& s, int64_t groups) : args(dstate_reduce_args(p, s)) {
    args.chunks = groups;
    if (groups > 1) {
      partials = at::empty({token_reduce_workspace(args)},
                           at::TensorOptions().dtype(at::kFloat).device(at::Device(at::kCUDA, p.device_index)));
      args.partials = partials.data_ptr();
    }
  }
  void combine(cudaStream_t stream) const {
    if (args.chunks > 1) launch_combine_chunks<float>(args, stream);
  }
};

// fp16/bf16 (kIsHalfType) on sm_80+ run the tensor-core (tf32) kernels of linear_attention_tc.cuh.
// Each returns false, launching nothing, where it does not apply (GPU before sm_80; rows: a
// state wider than 128, or beyond the device's shared memory); the SIMT kernels run then.
template <typename scalar_t>
bool launch_token_reduce_tc(const TokenReduceArgs& a, cudaStream_t stream);  // without the combine
template <typename scalar_t, RowsMode kMode>
RowsLaunch launch_rows_tc(const LinearAttentionParams& p, const BwdScratch& s, cudaStream_t stream);

// rows_kernel for the head-dim bucket of d (the mode's widest operand). fp64 only takes the
// 256 bucket: it serves gradcheck and reference runs, not speed, and costs 3 fewer instantiations.
// Returns whether QueryGrad summed dS and dz as well (query_grad_sums_dstate: head dim 32).
template <typename scalar_t, RowsMode kMode>
bool launch_rows(const LinearAttentionParams& p, const BwdScratch& s, int64_t d, cudaStream_t stream) {
  const int64_t n = kMode == RowsMode::KeyGrad ? p.Nk : p.Nq;
  bool summed = false;
  auto launch = [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    constexpr bool kFold = kRowsFoldDs<scalar_t, kD, kMode>;
    // Without the fold a block takes one row tile (groups = row tiles), spreading a head's rows
    // over the GPU; the fold walks a group of tiles per block to sum dS over them.
    const int64_t heads = p.B * p.H, row_tiles = ceil_div(n, RowsConfig<scalar_t, kD>::kRows);
    const int64_t groups = kFold ? row_groups(heads, row_tiles) : row_tiles;
    const DstateFold fold = kFold ? DstateFold(p, s, groups) : DstateFold();
    rows_kernel<scalar_t, kD, kMode><<<grid_x(heads * groups, 1), kThreads, 0, stream>>>(p, s, groups, fold.args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fold.combine(stream);
    summed = kFold;
  };
  if (n == 0) return false;
  if constexpr (kIsHalfType<scalar_t>) {
    const RowsLaunch tc = launch_rows_tc<scalar_t, kMode>(p, s, stream);
    if (tc.launched) return tc.summed_dstate;
  }
  TORCH_INTERNAL_ASSERT(!p.rope_cos, "linear_attention: fused RoPE reached the SIMT row kernels");
  if constexpr (std::is_same_v<scalar_t, double>) {
    launch(std::integral_constant<int, 256>{});
  } else {
    SOLA_HEADDIM_SWITCH(d, kHeadDim, [&] { launch(std::integral_constant<int, kHeadDim>{}); });
  }
  return summed;
}

}  // namespace la
}  // namespace sola
