// Building blocks of the linear-attention CUDA kernels: 16-byte row loads, the feature map chosen
// at run time, and the per-thread register tile of the block-level products.
// Only __host__ __device__ code and no CUDA runtime headers, so the kernels can also be compiled
// as host C++ (e.g. to emulate a block on the CPU).
#pragma once

#include <cstdint>

#include "common.h"

namespace sola {
namespace la {

// Every kernel of linear attention runs 256-thread blocks (8 warps); each thread owns a small
// register tile of the block's output, so the shared-memory operands are reused kTM + kTN times.
constexpr int kThreads = 256;

SOLA_HD int imin(int a, int b) { return a < b ? a : b; }

// ---- feature map ----------------------------------------------------------------------------
// Chosen at run time: a template parameter would triple the instantiations (build time), and one
// uniform switch per loaded vector costs nothing next to the load itself.

// v[e] = phi(v[e]) for e < valid, 0 from there on (padding stays 0: phi(0) = 1 for elu). One
// switch per vector rather than per element keeps the load stage free of per-element branches.
// kFast: the fast exp (kernel_exp_fast) for the tensor-core kernels.
template <bool kFast = false, int N, typename acc>
SOLA_HD void phi_cols(FeatureMap fm, int valid, acc (&v)[N]) {
  switch (fm) {
    case FeatureMap::Elu:
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if constexpr (kFast) {  // computed for every element, then selected: no branch per element
          const acc f = Phi<FeatureMap::Elu>::f<true>(v[e]);
          v[e] = e < valid ? f : acc(0);
        } else {
          v[e] = e < valid ? Phi<FeatureMap::Elu>::f(v[e]) : acc(0);
        }
      }
      break;
    case FeatureMap::Relu:
#pragma unroll
      for (int e = 0; e < N; ++e) v[e] = e < valid ? Phi<FeatureMap::Relu>::f(v[e]) : acc(0);
      break;
    default:
#pragma unroll
      for (int e = 0; e < N; ++e) v[e] = e < valid ? v[e] : acc(0);
  }
}

// v[e] = phi'(v[e]), one switch per vector.
template <bool kFast = false, int N, typename acc>
SOLA_HD void dphi_cols(FeatureMap fm, acc (&v)[N]) {
  switch (fm) {
    case FeatureMap::Elu:
#pragma unroll
      for (int e = 0; e < N; ++e) v[e] = Phi<FeatureMap::Elu>::df<kFast>(v[e]);
      break;
    case FeatureMap::Relu:
#pragma unroll
      for (int e = 0; e < N; ++e) v[e] = Phi<FeatureMap::Relu>::df(v[e]);
      break;
    default:
#pragma unroll
      for (int e = 0; e < N; ++e) v[e] = acc(1);
  }
}

// ---- vectorised row access ------------------------------------------------------------------

// dst[e] = row[col + e] as acc for e < N, 0 at or past n.
template <int N, typename acc, typename scalar_t>
SOLA_HD void load_cols(const scalar_t* row, int col, int n, bool aligned, acc (&dst)[N]) {
  if (aligned && col + N <= n) {
    const Vec<scalar_t, N> x = *reinterpret_cast<const Vec<scalar_t, N>*>(row + col);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = static_cast<acc>(x.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = col + e < n ? static_cast<acc>(row[col + e]) : acc(0);
  }
}

// row[col + e] = src[e] for col + e < n.
template <int N, typename acc, typename scalar_t>
SOLA_HD void store_cols(scalar_t* row, int col, int n, bool aligned, const acc (&src)[N]) {
  if (aligned && col + N <= n) {
    Vec<scalar_t, N> x;
#pragma unroll
    for (int e = 0; e < N; ++e) x.v[e] = static_cast<scalar_t>(src[e]);
    *reinterpret_cast<Vec<scalar_t, N>*>(row + col) = x;
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (col + e < n) row[col + e] = static_cast<scalar_t>(src[e]);
  }
}

// ---- register tile --------------------------------------------------------------------------
// c[i][j] += a[i] * b[j] for one step of the reduction: a and b are kTM and kTN consecutive values
// of a shared-memory row (16-byte aligned, so they load as 128-bit words).
template <typename acc, int kTM, int kTN>
struct RegTile {
  acc c[kTM][kTN];

  SOLA_HD void zero() {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) c[i][j] = acc(0);
  }

  SOLA_HD void fma(const acc* a, const acc* b) {
    acc av[kTM], bv[kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i) av[i] = a[i];
#pragma unroll
    for (int j = 0; j < kTN; ++j) bv[j] = b[j];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) c[i][j] += av[i] * bv[j];
  }
};

}  // namespace la
}  // namespace sola
