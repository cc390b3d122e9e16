// kV consecutive elements of scalar_t as one aligned vector (16 bytes for the widest kV), loaded into
// and stored from acc-typed registers: the row loads and stores of the elementwise kernels
// (layer_norm, silu_mul). The caller guarantees the alignment. store_row8: a thread's 8 floats into a
// shared tile without bank conflicts (the linear attention's tiles, bias_gelu's column sums).
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

// v at dst (16-byte aligned) as 16-byte stores, kV acc values filling whole ones.
template <int kV, typename acc>
__device__ __forceinline__ void store_vec16(acc* dst, const acc (&v)[kV]) {
  constexpr int kW = 16 / int(sizeof(acc));
  static_assert(kV % kW == 0, "whole 16-byte stores");
#pragma unroll
  for (int q = 0; q < kV; q += kW) {
    Vec<acc, kW> w;
#pragma unroll
    for (int e = 0; e < kW; ++e) w.v[e] = v[q + e];
    *reinterpret_cast<Vec<acc, kW>*>(dst + q) = w;
  }
}

// A thread's 8 consecutive fp32 values of a shared tile row (vector lc / 8 of row r, kVecsPerRow
// vectors a row, rows kPitch floats apart) as two 16-byte stores. A quarter warp (8 lanes) stores
// together: lanes l and l ^ 4 hold the next row's vector (4 a row) or the vector 4 on (8 or more);
// when their chunks start a multiple of 8 banks apart, the one with lane bit 2 set stores its
// second half first, so each store's 8 halves fill 32 distinct banks. Stored per element, the
// reduction's tiles (pitch 8 mod 32) took 8-way bank conflicts and the row tiles (4 mod 32) 4-way
// (scripts/cuda_emulator MEMSTAT=1).
template <int kPitch, int kVecsPerRow>
__device__ __forceinline__ void store_row8(float* dst, const float (&v)[8], int tid) {
  static_assert(kVecsPerRow >= 4 && kPitch % 4 == 0, "a quarter warp spans whole 4-vector groups");
  constexpr int kApart = kVecsPerRow == 4 ? kPitch : 32;  // floats between lanes l and l ^ 4
  const bool swap = (kApart / 4) % 2 == 0 && (tid & 4);   // selects, not a branch: one store each
  const Vec<float, 4> lo{{v[0], v[1], v[2], v[3]}}, hi{{v[4], v[5], v[6], v[7]}};
  auto* const d = reinterpret_cast<Vec<float, 4>*>(dst);
  d[swap ? 1 : 0] = swap ? hi : lo;
  d[swap ? 0 : 1] = swap ? lo : hi;
}

}  // namespace sola
