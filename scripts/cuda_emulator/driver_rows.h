// What the row-wise elementwise drivers (silu_mul, bias_gelu) share: (rows, C) inputs in the layouts the
// op layer hands over in place, special values, and the comparison with the CPU kernels (bitwise: emulated,
// both sides run the same host math).
#pragma once
#include <cmath>
#include <cstdio>
#include <string>

#include "driver_common.h"

// How an input is laid out as (rows, C) rows.
enum class Layout {
  Contiguous,  // rows of C
  Misaligned,  // rows of C, the tensor one element past a 16-byte boundary (element kernels)
  Slice,       // a channel half of a (rows, 2C) tensor: row stride 2C (each driver says which inputs)
  OddSlice,    // a [:, 1:C + 1] slice of a (rows, C + 1) tensor: stride C + 1, misaligned rows
  Broadcast,   // one row at stride 0 (each driver says which input)
};
inline constexpr Layout kLayouts[] = {Layout::Contiguous, Layout::Misaligned, Layout::Slice, Layout::OddSlice,
                                      Layout::Broadcast};
inline const char* layout_name(Layout l) {
  const char* names[] = {"contiguous", "misaligned", "slice", "odd_slice", "broadcast"};
  return names[static_cast<int>(l)];
}

struct Rows {
  at::Tensor t;  // the (rows, C) view (keeps its storage alive)
  int64_t stride;
};

inline at::Tensor random_values(at::IntArrayRef shape, at::ScalarType dt) {
  return (at::randn(shape, at::kDouble) * 2).to(dt);
}

// rows x C, contiguous from `offset` elements into its storage (1: misaligned).
inline Rows contiguous_rows(int64_t rows, int64_t C, at::ScalarType dt, int64_t offset) {
  return {random_values({rows * C + offset}, dt).narrow(0, offset, rows * C).view({rows, C}), C};
}

// Columns start .. start + C of a (rows, width) tensor.
inline Rows slice_rows(int64_t rows, int64_t C, at::ScalarType dt, int64_t width, int64_t start) {
  return {random_values({rows, width}, dt).narrow(1, start, C), width};
}

// One row of C, read at row stride 0.
inline Rows broadcast_rows(int64_t rows, int64_t C, at::ScalarType dt) {
  return {random_values({C}, dt).expand({rows, C}), 0};
}

// values[] at spread-out elements (every 5th from seed), so vector lanes and element loads both see them;
// a broadcast input gets them in its one row.
inline void add_special(const Rows& r, int seed, const double (&values)[8]) {
  at::Tensor t = r.stride == 0 ? r.t.select(0, 0) : r.t;
  at::Tensor flat = t.reshape({-1}).clone();
  for (int64_t i = seed; i < flat.numel(); i += 5) flat[i].fill_(values[(i / 5 + seed) % 8]);
  t.copy_(flat.view(t.sizes()));
}

// compare(), then bitwise equality (NaN where NaN): both sides ran the same host math.
inline void compare_bitwise(const std::string& what, const at::Tensor& got, const at::Tensor& want,
                            at::ScalarType dt, bool finite) {
  const int before = failures;
  compare(what, got, want, dt, finite);
  const auto zero_nan = [](const at::Tensor& t) { return at::where(t.isnan(), at::zeros_like(t), t); };
  if (failures == before && !at::equal(zero_nan(got), zero_nan(want)))
    std::printf("FAIL %s: not bitwise equal to the CPU kernel\n", what.c_str()), ++failures;
}
