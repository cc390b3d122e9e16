// The CUDA side of rows views (row_views.h), shared by the elementwise kernels (silu_mul, bias_gelu):
// a grid-stride item (row, 16-byte vector), the alignment test of the vector kernels, and the switch
// between the vector and the element kernels.
#pragma once

#include "common.h"

namespace sola {

// Item i of a grid-stride loop over rows x (C / kV) vectors: element offsets of its vector in an input
// of row stride `stride` (at) and in a contiguous (rows, C) output (out).
struct RowItem {
  int64_t r, c;
  __device__ RowItem(int64_t i, int64_t nv, int kV) : r(i / nv), c((i - r * nv) * kV) {}
  __device__ int64_t at(int64_t stride) const { return r * stride + c; }
  __device__ int64_t out(int64_t C) const { return r * C + c; }
};

// Whether every row of a rows view at ptr (row stride `stride` elements) starts on a 16-byte boundary,
// so its 16-byte vectors at column multiples of kVec16 are aligned; a null ptr (no tensor) passes.
template <typename scalar_t>
inline bool rows_aligned16(const void* ptr, int64_t stride) {
  return !ptr || (reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride % kVec16<scalar_t> == 0);
}

// Runs body with `constexpr int kVec`: the 16-byte vector width of scalar_t when vec (the caller's
// alignment test), else 1 (the element kernels).
#define SOLA_VEC16_SWITCH(vec, scalar_t, kVec, ...) \
  [&] {                                             \
    if (vec) {                                      \
      constexpr int kVec = kVec16<scalar_t>;        \
      return __VA_ARGS__();                         \
    }                                               \
    constexpr int kVec = 1;                         \
    return __VA_ARGS__();                           \
  }()

}  // namespace sola
