// Tensors the elementwise ops (silu_mul, bias_gelu) read as (rows, C) "rows" views: the last dim
// contiguous and the leading dims collapsing to one row stride, so a channel slice y[..., :C] of a
// (..., 2C) tensor (row stride 2C) or a row broadcast over the leading dims (row stride 0) is read in
// place; any other layout is copied first.
#pragma once

#include "common.h"

namespace sola {

// The row stride of t as (rows, C) rows: the last dim contiguous and every leading dim of size > 1 at
// the stride of one row times the rows inside it; -1 when t is no such view.
inline int64_t row_stride(const at::Tensor& t) {
  const int64_t d = t.dim();
  if (t.size(d - 1) > 1 && t.stride(d - 1) != 1) return -1;
  int64_t stride = -1, inner_rows = 1;
  for (int64_t i = d - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (stride < 0) stride = t.stride(i);  // the innermost leading dim that counts
    if (t.stride(i) != stride * inner_rows) return -1;
    inner_rows *= t.size(i);
  }
  return stride < 0 ? t.size(d - 1) : stride;  // one row: any stride will do
}

// t as the kernels read it: itself when it is a rows view, else a contiguous copy; stride: its row stride.
inline at::Tensor as_rows(const at::Tensor& t, int64_t& stride) {
  stride = row_stride(t);
  if (stride >= 0) return t;
  stride = t.size(-1);
  return t.contiguous();
}

}  // namespace sola
