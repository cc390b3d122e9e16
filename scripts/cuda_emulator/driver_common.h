// What the emulator drivers share: inputs, NaN-filled outputs, per-dtype tolerances, the comparison of an
// emulated CUDA result with the CPU kernels' (NaN / inf patterns must agree), and their fuzz modes' draws.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
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

// Random cases for the drivers' `fuzz <seed> <count> [first]` modes: case i draws from (seed, i) alone,
// so `fuzz <seed> 1 <i>` reruns a failing case i by itself.
struct FuzzDraw {
  std::mt19937_64 rng;
  FuzzDraw(uint64_t seed, uint64_t index) : rng(seed * 1000003u + index) { at::manual_seed(seed * 7919u + index); }
  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
  double real(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
  bool chance(double p) { return real(0, 1) < p; }
  // A sequence length in [1, hi], log-uniform: short and edge-of-tile lengths as often as long ones.
  int64_t length(int64_t hi) { return std::min<int64_t>(hi, int64_t(std::exp(real(0, std::log(double(hi) + 1))))); }
  // A head dim up to 256: mostly the fast paths' buckets (32, 64, 128), then anything.
  int64_t head_dim() {
    const double u = real(0, 1);
    if (u < 0.45) return int64_t(32) << uniform(0, 2);
    if (u < 0.55) return int64_t(8) * uniform(1, 12);
    if (u < 0.85) return uniform(1, 128);
    return uniform(129, 256);
  }
  at::ScalarType dtype() {
    const double u = real(0, 1);
    return u < 0.35 ? at::kBFloat16 : u < 0.6 ? at::kHalf : u < 0.85 ? at::kFloat : at::kDouble;
  }
  // A channel count: mostly a multiple of 8 up to 8 * vectors (the vector kernels), else anything up to hi.
  int64_t width(int64_t vectors, int64_t hi) { return chance(0.6) ? 8 * uniform(1, vectors) : uniform(1, hi); }
};

// SOLA_MAX_GRID = 1..7 for this scope, by chance (15%): every grid capped, so blocks walk several work items.
struct MaybeCappedGrid {
  explicit MaybeCappedGrid(FuzzDraw& f) {
    if (f.chance(0.15)) setenv("SOLA_MAX_GRID", std::to_string(f.uniform(1, 7)).c_str(), 1);
  }
  ~MaybeCappedGrid() { unsetenv("SOLA_MAX_GRID"); }
};

// Parses `fuzz <seed> <count> [first]` and calls run_case(FuzzDraw(seed, i)) for i = first .. first + count - 1.
template <typename F>
void fuzz_cases(int argc, char** argv, F&& run_case) {
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  const int64_t count = argc > 3 ? std::strtoll(argv[3], nullptr, 10) : 50;
  const int64_t first = argc > 4 ? std::strtoll(argv[4], nullptr, 10) : 0;
  for (int64_t i = first; i < first + count; ++i) {
    const int before = failures;
    FuzzDraw draw(seed, uint64_t(i));
    run_case(draw);
    if (failures != before) std::printf("FAIL fuzz case: rerun with `fuzz %lu 1 %ld`\n", (unsigned long)seed, (long)i);
    std::fflush(stdout);
  }
}
