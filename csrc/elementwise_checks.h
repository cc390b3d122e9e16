// Argument checks shared by the row-wise ops (layer_norm, silu_mul, bias_gelu): x any-rank float on CPU
// or CUDA, other tensors shaped, typed and placed like it, and per-channel parameters (dwconv's too).
#pragma once

#include "common.h"

namespace sola {

// x: dense, float16 / bfloat16 / float32 / float64, on a CPU or CUDA device (each op adds its rank rule).
inline void check_float_input(const at::Tensor& x) {
  SOLA_CHECK(x.device().is_cpu() || x.device().is_cuda(), "x must be on a CPU or CUDA device, got ", x.device());
  SOLA_CHECK(x.layout() == at::kStrided, "x must be a dense (strided) tensor");
  const auto st = x.scalar_type();
  SOLA_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
             "x must be float16, bfloat16, float32 or float64, got ", st);
}

// t (grad_out, gate) has x's shape (no broadcasting), dtype and device.
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  SOLA_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), " (no broadcasting), got ",
             t.sizes());
  SOLA_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
             t.scalar_type());
  SOLA_CHECK(t.device() == x.device(), name, " must be on the device of x (", x.device(), "), got ", t.device());
  SOLA_CHECK(t.layout() == at::kStrided, name, " must be a dense (strided) tensor");
}

// A per-channel parameter of x (..., C) (a weight or bias) as the kernels read it: (C) acc-typed and
// contiguous (a view of an fp32 parameter, a copy only for another dtype or layout), checked; undefined
// when absent. `what` names x's last dim in the message.
inline at::Tensor acc_channel_param(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                                    const char* what = "channels") {
  if (!t.has_value()) return at::Tensor();
  const int64_t C = x.size(-1);
  check_param(*t, name, x);
  SOLA_CHECK(t->dim() == 1 && t->size(0) == C, name, " must be (C,) with C = ", C, " ", what, " of x, got shape ",
             t->sizes());
  return t->to(acc_dtype(x)).contiguous();
}

}  // namespace sola
