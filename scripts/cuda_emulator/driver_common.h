// What both emulator drivers share: inputs, NaN-filled outputs, per-dtype tolerances and the
// comparison of an emulated CUDA result with the CPU kernels' (NaN / inf patterns must agree).
#pragma once
#include <algorithm>
#include <cstdio>
#include <string>

#include <ATen/ATen.h>

inline int failures = 0;
// PASSED or FAILED (n) and the exit status: how the elementwise drivers end.
inline int report_failures() {
  std::printf(failures ? "FAILED (%d)\n" : "PASSED\n", failures);
  return failures ? 1 : 0;
}

inline at::Tensor input(int64_t B, int64_t H, int64_t N, int64_t D, at::ScalarType dt, bool strided, double scale = 1.0) {
  if (strided) return (at::randn({B, N, H, D}, at::kDouble) * scale).to(dt).transpose(1, 2);
  return (at::randn({B, H, N, D}, at::kDouble) * scale).to(dt);
}
inline at::Tensor nan_out(at::IntArrayRef s, at::ScalarType dt) { return at::full(s, NAN, at::TensorOptions().dtype(dt)); }

// A NaN-filled (B, H, N, D) output, (B, N, H, D) in memory when interleaved: the layout the ops give the
// outputs and gradients of a heads-interleaved input (csrc/heads_layout.h).
inline at::Tensor nan_out(at::IntArrayRef s, at::ScalarType dt, bool interleaved) {
  if (!interleaved) return nan_out(s, dt);
  return nan_out({s[0], s[2], s[1], s[3]}, dt).transpose(1, 2);
}

inline double tol(at::ScalarType dt) {
  return dt == at::kDouble ? 1e-11 : dt == at::kFloat ? 2e-5 : dt == at::kHalf ? 4e-3 : 3e-2;
}

inline void compare(const std::string& what, const at::Tensor& got, const at::Tensor& want, at::ScalarType dt,
             bool expect_finite = true) {
  if (got.sizes() != want.sizes()) {
    std::printf("FAIL %s: shape\n", what.c_str());
    ++failures;
    return;
  }
  if (got.numel() == 0) return;
  auto g = got.to(at::kDouble), w = want.to(at::kDouble);
  if (expect_finite && !at::isfinite(g).all().item<bool>()) {
    std::printf("FAIL %s: non-finite values (unwritten?) %ld of %ld\n", what.c_str(),
                (long)(~at::isfinite(g)).sum().item<int64_t>(), (long)g.numel());
    ++failures;
    return;
  }
  // NaN / inf positions must agree
  if (!at::equal(at::isnan(g), at::isnan(w))) {
    std::printf("FAIL %s: NaN pattern differs (got %ld, want %ld)\n", what.c_str(), (long)at::isnan(g).sum().item<int64_t>(),
                (long)at::isnan(w).sum().item<int64_t>());
    ++failures;
    return;
  }
  if (!at::equal(at::where(at::isinf(g), g, at::zeros_like(g)), at::where(at::isinf(w), w, at::zeros_like(w)))) {
    std::printf("FAIL %s: inf pattern differs\n", what.c_str());
    ++failures;
    return;
  }
  auto fin = at::isfinite(w);
  auto diff = at::where(fin, (g - w).abs(), at::zeros_like(g)).max().item<double>();
  auto scale = std::max(1.0, at::where(fin, w.abs(), at::zeros_like(w)).max().item<double>());
  if (!(diff <= tol(dt) * scale)) {
    std::printf("FAIL %s: max diff %g (scale %g)\n", what.c_str(), diff, scale);
    ++failures;
  }
}
