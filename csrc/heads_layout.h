// The memory layout of the attention ops' outputs and input gradients: that of the input they
// follow. A (B, H, N, D) input is either contiguous or, as a linear layer's (B, N, H * D) output
// reshaped to (B, N, H, D) and transposed gives it, heads-interleaved: (B, N, H, D) in memory.
// Writing the output in the second layout makes out.transpose(1, 2).reshape(B, N, H * D) a view
// where it would be a copy (one read and one write of the output, and of each gradient backward).
// The kernels take any strides (View4), so only the allocation changes. sola_ops/_ops.py's fake
// implementations apply the same rule (_new_like_heads).
#pragma once

#include "common.h"

namespace sola {

// `like` as the kernels see it (after last_dim_contiguous): (B, N, H, D) in memory, with more than
// one head and one token (otherwise both layouts are one).
inline bool heads_interleaved(const at::Tensor& like) {
  return like.dim() == 4 && like.numel() > 0 && like.size(1) > 1 && like.size(2) > 1 &&
         like.stride(1) < like.stride(2) && (like.size(3) <= 1 || like.stride(3) == 1);
}

// A new (B, H, N, D) output (new_output: NaN-filled in debug mode) in the layout of `like`.
inline at::Tensor new_output_like(at::IntArrayRef sizes, const at::TensorOptions& options, const at::Tensor& like) {
  if (!heads_interleaved(like)) return new_output(sizes, options);
  return new_output({sizes[0], sizes[2], sizes[1], sizes[3]}, options).transpose(1, 2);
}

}  // namespace sola
