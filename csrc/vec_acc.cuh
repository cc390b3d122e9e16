// kV consecutive elements of scalar_t as one aligned vector (16 bytes for the widest kV), loaded into
// and stored from acc-typed registers: the row loads and stores of the elementwise kernels
// (layer_norm, silu_mul). The caller guarantees the alignment.
#pragma once

#include "common.h"

namespace sola {

template <int kV, typename scalar_t, typename acc>
__device__ __forceinline__ void load_acc(const scalar_t* src, acc (&dst)[kV]) {
  const Vec<scalar_t, kV> v = *reinterpret_cast<const Vec<scalar_t, kV>*>(src);
#pragma unroll
  for (int e = 0; e < kV; ++e) dst[e] = static_cast<acc>(v.v[e]);
}

template <int kV, typename scalar_t, typename acc>
__device__ __forceinline__ void store_acc(const acc (&src)[kV], scalar_t* dst) {
  Vec<scalar_t, kV> v;
#pragma unroll
  for (int e = 0; e < kV; ++e) v.v[e] = static_cast<scalar_t>(src[e]);
  *reinterpret_cast<Vec<scalar_t, kV>*>(dst) = v;
}

}  // namespace sola
