// Runs the silu_mul CUDA launchers (emulated on the CPU, see README.md) against the CPU kernels: out, then
// dx and dgate, every dtype, widths on and off each dtype's 16-byte vector (the vector and element
// kernels), inputs read in place at other row strides (the model's channel slices, a row broadcast at
// stride 0, a slice one element in: misaligned), contiguous inputs one element off alignment, NaN / inf /
// saturating values, grids capped so every thread walks several items. Emulated, both sides take the
// host's exp (kernel_exp), so they must agree bitwise. Usage: driver_silu_mul [all | quick | fuzz <seed> <count>
// [first]] (quick: bf16; fuzz: random cases).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "driver_rows.h"
#include "silu_mul/silu_mul.h"

using namespace sola;

// Layouts (driver_rows.h): Slice is x = y[:, C:], gate = y[:, :C] of one (rows, 2C) y with grad contiguous;
// Broadcast is gate's, x and grad contiguous.
struct Case {
  int64_t rows = 37, C = 64;
  at::ScalarType dt = at::kBFloat16;
  Layout layout = Layout::Contiguous;
  bool special = false;   // NaN, +-inf and saturating values in x, gate and grad
  const char* max_grid = nullptr;  // SOLA_MAX_GRID for the launches
};

static void silu_mul_case(const Case& c) {
  char name[200];
  std::snprintf(name, sizeof name, "silu_mul rows%ld C%ld %s %s s%d grid%s", (long)c.rows, (long)c.C,
                c10::toString(c.dt), layout_name(c.layout), c.special, c.max_grid ? c.max_grid : "-");
  const auto contiguous = [&](int64_t offset) { return contiguous_rows(c.rows, c.C, c.dt, offset); };
  const auto odd_slice = [&] { return slice_rows(c.rows, c.C, c.dt, c.C + 1, 1); };
  Rows x, gate, grad;
  switch (c.layout) {
    case Layout::Contiguous:
      x = contiguous(0), gate = contiguous(0), grad = contiguous(0);
      break;
    case Layout::Misaligned:
      x = contiguous(1), gate = contiguous(1), grad = contiguous(1);
      break;
    case Layout::Slice: {
      const at::Tensor y = random_values({c.rows, 2 * c.C}, c.dt);
      x = {y.narrow(1, c.C, c.C), 2 * c.C}, gate = {y.narrow(1, 0, c.C), 2 * c.C}, grad = contiguous(0);
      break;
    }
    case Layout::OddSlice:
      x = odd_slice(), gate = odd_slice(), grad = odd_slice();
      break;
    case Layout::Broadcast:
      x = contiguous(0), gate = broadcast_rows(c.rows, c.C, c.dt), grad = contiguous(0);
      break;
  }
  if (c.special) {
    const double values[8] = {NAN, INFINITY, -INFINITY, 100.0, -100.0, -89.0, 0.0, -1.28};
    add_special(x, 0, values), add_special(gate, 1, values), add_special(grad, 2, values);
  }
  if (c.max_grid) setenv("SOLA_MAX_GRID", c.max_grid, 1);

  SiluMulParams p;
  p.rows = c.rows, p.C = c.C, p.dtype = c.dt, p.device_index = -1;
  p.x = x.t.data_ptr(), p.x_stride = x.stride;
  p.gate = gate.t.data_ptr(), p.gate_stride = gate.stride;
  at::Tensor out[2], dx[2], dgate[2];
  for (int r = 0; r < 2; ++r) {  // 0: emulated CUDA, 1: CPU
    out[r] = nan_out({c.rows, c.C}, c.dt), dx[r] = nan_out({c.rows, c.C}, c.dt), dgate[r] = nan_out({c.rows, c.C}, c.dt);
    p.grad = nullptr, p.grad_stride = 0, p.out = out[r].data_ptr(), p.dgate = nullptr;
    if (r == 0) silu_mul_fwd_cuda(p);
    else silu_mul_fwd_cpu(p);
    p.grad = grad.t.data_ptr(), p.grad_stride = grad.stride, p.out = dx[r].data_ptr(), p.dgate = dgate[r].data_ptr();
    if (r == 0) silu_mul_bwd_cuda(p);
    else silu_mul_bwd_cpu(p);
  }
  if (c.max_grid) unsetenv("SOLA_MAX_GRID");
  const bool finite = !c.special;
  const char* what[] = {" out", " dx", " dgate"};
  const at::Tensor* got[] = {&out[0], &dx[0], &dgate[0]};
  const at::Tensor* want[] = {&out[1], &dx[1], &dgate[1]};
  for (int i = 0; i < 3; ++i) compare_bitwise(name + std::string(what[i]), *got[i], *want[i], c.dt, finite);
  if (finite && at::isnan(out[0]).any().item<bool>()) std::printf("FAIL %s: unwritten outputs\n", name), ++failures;
}

int main(int argc, char** argv) {
  at::manual_seed(0);
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which != "all" && which != "quick" && which != "fuzz")
    return std::printf("usage: driver_silu_mul [all | quick | fuzz <seed> <count> [first]]\n"), 2;
  if (which == "fuzz") {  // random cases (driver_common.h's fuzz_cases)
    fuzz_cases(argc, argv, [](FuzzDraw& f) {
      Case c;
      c.dt = f.dtype(), c.rows = f.length(400), c.C = f.width(128, 1100);
      c.layout = kLayouts[f.uniform(0, 4)], c.special = f.chance(0.1);
      const MaybeCappedGrid cap(f);
      silu_mul_case(c);
    });
    return report_failures();
  }
  const bool quick = which == "quick";
  std::vector<at::ScalarType> dts = {at::kBFloat16};
  if (!quick) dts = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
  for (auto dt : dts) {
    // 2, 4, 8: the fp64, fp32, fp16 / bf16 vector widths; 1, 3, 7, 33: off all of them.
    for (int64_t C : {1, 2, 3, 4, 7, 8, 16, 33, 64, 200, 520}) {
      for (Layout l : kLayouts) {
        Case c;
        c.dt = dt, c.C = C, c.layout = l;
        silu_mul_case(c);
      }
      Case s;
      s.dt = dt, s.C = C, s.special = true;
      silu_mul_case(s);
      s.layout = Layout::Slice;
      silu_mul_case(s);
    }
    Case one;  // a single row, a single element
    one.dt = dt, one.rows = 1, one.C = 1;
    silu_mul_case(one);
    for (Layout l : {Layout::Contiguous, Layout::OddSlice}) {
      Case walk;  // 2 blocks for 300 rows: each thread walks 5 to 38 items
      walk.dt = dt, walk.rows = 300, walk.C = 64, walk.layout = l, walk.max_grid = "2";
      silu_mul_case(walk);
    }
  }
  return report_failures();
}
