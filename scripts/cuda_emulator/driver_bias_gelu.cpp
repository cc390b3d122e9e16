// Runs the bias_gelu CUDA launchers (emulated on the CPU, see README.md) against the CPU kernels: out, then
// dx and dbias, every dtype, both approximations, with and without a bias (and with a bias but no dbias
// wanted), widths on and off each dtype's 16-byte vector (the vector and element kernels) and past one
// column group (32 vectors), x and grad read in place at other row strides (a channel slice at row stride
// 2C, a slice one element in: misaligned rows, a row broadcast at stride 0), contiguous inputs one element
// off alignment, a bias off its 32-byte boundary (the element kernels), NaN / inf / overflowing values,
// row counts giving several dbias slabs (partials), grids capped so blocks walk slabs and column groups.
// Emulated, both sides take the host's erf / tanh / exp, so out and dx must agree bitwise; dbias is summed
// in another order (slabs and row threads, not the CPU's chunks), so it is held to a tolerance, and a second
// CUDA backward must give the same bits. Usage: driver_bias_gelu [all | quick | vision | fuzz <seed> <count>
// [first]] (quick: bf16; fuzz: random cases).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bias_gelu/bias_gelu.h"
#include "driver_rows.h"

using namespace sola;

// Layouts (driver_rows.h): Slice is x = y[:, C:] of a (rows, 2C) y with grad contiguous; Broadcast is x's,
// grad contiguous.
enum class Bias { Sum, NoSum, None, Misaligned };  // dbias wanted, bias without dbias, no bias, bias off 32 bytes
const char* bias_name(Bias b) {
  const char* names[] = {"bias", "bias_nosum", "nobias", "bias_misaligned"};
  return names[static_cast<int>(b)];
}

struct Case {
  int64_t rows = 37, C = 64;
  at::ScalarType dt = at::kBFloat16;
  Layout layout = Layout::Contiguous;
  Bias bias = Bias::Sum;
  bool tanh = false;
  bool special = false;            // NaN, +-inf and overflowing values in x, bias and grad
  const char* max_grid = nullptr;  // SOLA_MAX_GRID for the launches
};

static void bias_gelu_case(const Case& c) {
  char name[220];
  std::snprintf(name, sizeof name, "bias_gelu rows%ld C%ld %s %s %s %s s%d grid%s", (long)c.rows, (long)c.C,
                c10::toString(c.dt), layout_name(c.layout), bias_name(c.bias), c.tanh ? "tanh" : "erf", c.special,
                c.max_grid ? c.max_grid : "-");
  const at::ScalarType acc = c.dt == at::kDouble ? at::kDouble : at::kFloat;
  const auto contiguous = [&](int64_t offset) { return contiguous_rows(c.rows, c.C, c.dt, offset); };
  Rows x, grad;
  switch (c.layout) {
    case Layout::Contiguous:
      x = contiguous(0), grad = contiguous(0);
      break;
    case Layout::Misaligned:
      x = contiguous(1), grad = contiguous(1);
      break;
    case Layout::Slice:
      x = slice_rows(c.rows, c.C, c.dt, 2 * c.C, c.C), grad = contiguous(0);
      break;
    case Layout::OddSlice:
      x = slice_rows(c.rows, c.C, c.dt, c.C + 1, 1), grad = slice_rows(c.rows, c.C, c.dt, c.C + 1, 1);
      break;
    case Layout::Broadcast:
      x = broadcast_rows(c.rows, c.C, c.dt), grad = contiguous(0);
      break;
  }
  // The bias: acc-typed, 32-byte aligned as the op layer hands it over (at::empty's storage is), or one
  // element past that (the vector kernels must not take it).
  const int64_t boff = c.bias == Bias::Misaligned ? 1 : 0;
  at::Tensor bias = at::randn({c.C + boff}, at::kDouble).to(acc).narrow(0, boff, c.C);
  if (c.special) {
    const double values[8] = {NAN, INFINITY, -INFINITY, 1e20, -1e20, -14.0, 0.0, -0.0};
    add_special(x, 0, values), add_special(grad, 2, values), add_special({bias.view({1, c.C}), c.C}, 1, values);
  }
  if (c.max_grid) setenv("SOLA_MAX_GRID", c.max_grid, 1);

  BiasGeluParams p;
  p.rows = c.rows, p.C = c.C, p.dtype = c.dt, p.device_index = -1, p.tanh = c.tanh;
  p.x = x.t.data_ptr(), p.x_stride = x.stride;
  p.bias = c.bias == Bias::None ? nullptr : bias.data_ptr();
  const bool sum = c.bias == Bias::Sum || c.bias == Bias::Misaligned;
  at::Tensor out[2], dx[3], dbias[3];
  for (int r = 0; r < 3; ++r) {  // 0, 2: emulated CUDA (2: again, for determinism), 1: CPU
    dx[r] = nan_out({c.rows, c.C}, c.dt), dbias[r] = nan_out({c.C}, acc);
    if (r < 2) {
      out[r] = nan_out({c.rows, c.C}, c.dt);
      p.grad = nullptr, p.grad_stride = 0, p.out = out[r].data_ptr(), p.dbias = nullptr;
      if (r == 0) bias_gelu_fwd_cuda(p);
      else bias_gelu_fwd_cpu(p);
    }
    p.grad = grad.t.data_ptr(), p.grad_stride = grad.stride, p.out = dx[r].data_ptr();
    p.dbias = sum ? dbias[r].data_ptr() : nullptr;
    if (r == 1) bias_gelu_bwd_cpu(p);
    else bias_gelu_bwd_cuda(p);
  }
  if (c.max_grid) unsetenv("SOLA_MAX_GRID");
  const bool finite = !c.special;
  const char* what[] = {" out", " dx"};
  const at::Tensor* got[] = {&out[0], &dx[0]};
  const at::Tensor* want[] = {&out[1], &dx[1]};
  for (int i = 0; i < 2; ++i) compare_bitwise(name + std::string(what[i]), *got[i], *want[i], c.dt, finite);
  if (finite && at::isnan(out[0]).any().item<bool>()) std::printf("FAIL %s: unwritten outputs\n", name), ++failures;
  if (sum) {
    // dbias sums `rows` values, in another order than the CPU's: the tolerance scales with their count's
    // square root.
    const double n = std::sqrt(double(c.rows));
    compare(std::string(name) + " dbias", dbias[0] / n, dbias[1] / n, acc, finite);
  } else if (!at::isnan(dbias[0]).all().item<bool>()) {
    std::printf("FAIL %s: dbias written though not wanted\n", name), ++failures;
  }
  if (!at::equal(dx[0].nan_to_num(0), dx[2].nan_to_num(0)) || !at::equal(dbias[0].nan_to_num(0), dbias[2].nan_to_num(0)) ||
      !at::equal(dbias[0].isnan(), dbias[2].isnan()))
    std::printf("FAIL %s: two backward runs differ\n", name), ++failures;
}

int main(int argc, char** argv) {
  at::manual_seed(0);
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which != "all" && which != "quick" && which != "vision" && which != "fuzz")
    return std::printf("usage: driver_bias_gelu [all | quick | vision | fuzz <seed> <count> [first]]\n"), 2;
  if (which == "fuzz") {  // random cases (driver_common.h's fuzz_cases)
    fuzz_cases(argc, argv, [](FuzzDraw& f) {
      Case c;
      c.dt = f.dtype(), c.rows = f.length(400), c.C = f.width(128, 1100);
      c.layout = kLayouts[f.uniform(0, 4)], c.bias = static_cast<Bias>(f.uniform(0, 3));
      c.tanh = f.chance(0.5), c.special = f.chance(0.1);
      const MaybeCappedGrid cap(f);
      bias_gelu_case(c);
    });
    return report_failures();
  }
  if (which == "vision") {  // SoLA-Vision tiny's first-stage MLP at batch 1 (MEMSTAT=1 statistics)
    Case c;
    c.rows = 3136, c.C = 256;
    bias_gelu_case(c);
    return report_failures();
  }
  const bool quick = which == "quick";
  std::vector<at::ScalarType> dts = {at::kBFloat16};
  if (!quick) dts = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
  for (auto dt : dts) {
    for (bool tanh : {false, true}) {
      // 2, 4, 8: the fp64, fp32, fp16 / bf16 vector widths; 1, 3, 7, 33: off all of them; 520: several
      // column groups for fp32 / fp64 (32 vectors a group) and the element kernels.
      for (int64_t C : {1, 2, 3, 4, 7, 8, 16, 33, 64, 200, 520}) {
        for (Layout l : kLayouts) {
          Case c;
          c.dt = dt, c.C = C, c.layout = l, c.tanh = tanh;
          bias_gelu_case(c);
        }
        for (Bias b : {Bias::NoSum, Bias::None, Bias::Misaligned}) {
          Case c;
          c.dt = dt, c.C = C, c.bias = b, c.tanh = tanh;
          bias_gelu_case(c);
        }
        Case s;
        s.dt = dt, s.C = C, s.special = true, s.tanh = tanh;
        bias_gelu_case(s);
        s.layout = Layout::Slice;
        bias_gelu_case(s);
      }
      Case one;  // a single row, a single element
      one.dt = dt, one.rows = 1, one.C = 1, one.tanh = tanh;
      bias_gelu_case(one);
      for (Layout l : {Layout::Contiguous, Layout::OddSlice}) {
        Case slabs;  // 300 rows: 5 slabs (dbias partials) of 64 rows; 2 blocks walk them
        slabs.dt = dt, slabs.rows = 300, slabs.C = 64, slabs.layout = l, slabs.tanh = tanh;
        bias_gelu_case(slabs);
        slabs.max_grid = "2";
        bias_gelu_case(slabs);
        slabs.C = 1100;  // several column groups, walked by 2 x 2 blocks
        slabs.rows = 140;
        bias_gelu_case(slabs);
      }
      Case many;  // 70000 rows of one vector: 1024 slabs of 69 rows, 4 blocks walking them
      many.dt = dt, many.rows = 70000, many.C = dt == at::kDouble ? 2 : dt == at::kFloat ? 4 : 8, many.tanh = tanh;
      many.max_grid = "4";
      if (!quick || !tanh) bias_gelu_case(many);
    }
  }
  return report_failures();
}
