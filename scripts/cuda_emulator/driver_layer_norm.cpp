// Runs the LayerNorm CUDA launchers (emulated on the CPU, see README.md) against the CPU kernels:
// out, mean, rstd, dx and the weight and bias gradients, with and without weight and bias, every dtype,
// widths that take the vector and the scalar kernels, the register-cached rows (up to 512) and the
// longer ones (read per pass, the column kernel for the parameters), misaligned rows, NaN rows, row
// counts past one block and past the backward's block cap (teams walk several rows), an addend to dx
// (vector, scalar, uncached and misaligned rows; aligned rows with a misaligned addend). Usage:
// driver_layer_norm [all | quick | vision | fuzz <seed> <count> [first]] (quick: bf16, no walk; vision: model
// shapes for MEMSTAT=1; fuzz: random cases).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "driver_common.h"
#include "layer_norm/layer_norm.h"

using namespace sola;

struct Case {
  int64_t rows = 37, C = 64;
  at::ScalarType dt = at::kBFloat16;
  bool weight = true, bias = true, misaligned = false, poison = false, addend = false;
  bool huge = false;  // the poisoned element is 1e20, not NaN: its row's variance overflows fp32 (NaN row)
  bool addend_misaligned = false;  // the addend alone one element off (rows aligned): the scalar kernels
};

// rows x C: contiguous, or starting one element past a 16-byte boundary (misaligned).
static at::Tensor rows_of(const Case& c, bool misaligned) {
  const at::Tensor buf = at::randn({c.rows * c.C + 1}, at::kDouble).to(c.dt);
  return (misaligned ? buf.narrow(0, 1, c.rows * c.C) : buf.narrow(0, 0, c.rows * c.C)).view({c.rows, c.C});
}
static at::Tensor rows_of(const Case& c) { return rows_of(c, c.misaligned); }

static void ln_case(const Case& c) {
  char name[160];
  std::snprintf(name, sizeof name, "layer_norm rows%ld C%ld %s w%d b%d m%d p%d%s a%d%s", (long)c.rows, (long)c.C,
                c10::toString(c.dt), c.weight, c.bias, c.misaligned, c.poison, c.huge ? " (1e20)" : "", c.addend,
                c.addend_misaligned ? " (misaligned)" : "");
  const at::ScalarType dt = c.dt, acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = rows_of(c), g = rows_of(c);
  if (c.poison) x.select(0, c.rows / 2).select(0, c.C - 1).fill_(c.huge ? 1e20 : NAN);
  const at::Tensor weight = (at::randn({c.C}, at::kDouble) + 1).to(acc), bias = at::randn({c.C}, at::kDouble).to(acc);

  LayerNormParams p;
  p.rows = c.rows, p.C = c.C, p.eps = 1e-5, p.dtype = dt, p.device_index = -1;
  p.x = x.data_ptr(), p.grad = nullptr;
  p.weight = c.weight ? weight.data_ptr() : nullptr, p.bias = c.bias ? bias.data_ptr() : nullptr;
  at::Tensor out[2], mean[2], rstd[2], dx[3], dweight[3], dbias[3];
  for (int r = 0; r < 2; ++r) {  // 0: emulated CUDA, 1: CPU
    out[r] = c.misaligned ? rows_of(c).fill_(NAN) : nan_out({c.rows, c.C}, dt);
    mean[r] = nan_out({c.rows}, acc), rstd[r] = nan_out({c.rows}, acc);
    p.out = out[r].data_ptr(), p.mean = mean[r].data_ptr(), p.rstd = rstd[r].data_ptr(), p.grad = nullptr;
    if (r == 0) layer_norm_fwd_cuda(p);
    else layer_norm_fwd_cpu(p);
  }
  const bool finite = !c.poison;
  compare(std::string(name) + " out", out[0], out[1], dt, finite);
  compare(std::string(name) + " mean", mean[0], mean[1], acc, finite);
  compare(std::string(name) + " rstd", rstd[0], rstd[1], acc, finite);
  // misaligned as x is, or alone
  const at::Tensor addend = c.addend ? rows_of(c, c.misaligned || c.addend_misaligned) : at::Tensor();
  p.grad = g.data_ptr(), p.mean = mean[1].data_ptr(), p.rstd = rstd[1].data_ptr();
  if (c.addend) p.addend = addend.data_ptr();
  for (int r = 0; r < 3; ++r) {  // 0, 2: emulated CUDA (2: again, for determinism), 1: CPU
    dx[r] = c.misaligned ? rows_of(c).fill_(NAN) : nan_out({c.rows, c.C}, dt);
    dweight[r] = nan_out({c.C}, acc), dbias[r] = nan_out({c.C}, acc);
    p.out = dx[r].data_ptr();
    p.dweight = c.weight ? dweight[r].data_ptr() : nullptr, p.dbias = c.bias ? dbias[r].data_ptr() : nullptr;
    if (r == 1) layer_norm_bwd_cpu(p);
    else layer_norm_bwd_cuda(p);
  }
  compare(std::string(name) + " dx", dx[0], dx[1], dt, finite);
  // The parameters' gradients sum `rows` products: scale the tolerance by their count's square root.
  const double n = std::sqrt(double(c.rows));
  if (c.weight) compare(std::string(name) + " dweight", dweight[0] / n, dweight[1] / n, acc, finite);
  if (c.bias) compare(std::string(name) + " dbias", dbias[0] / n, dbias[1] / n, acc, finite);
  if (!c.weight && !at::isnan(dweight[0]).all().item<bool>())
    std::printf("FAIL %s: dweight written without weight\n", name), ++failures;
  if (!c.bias && !at::isnan(dbias[0]).all().item<bool>())
    std::printf("FAIL %s: dbias written without bias\n", name), ++failures;
  if (!at::equal(dx[0].nan_to_num(0), dx[2].nan_to_num(0)) || !at::equal(dweight[0].nan_to_num(0), dweight[2].nan_to_num(0)) ||
      !at::equal(dbias[0].nan_to_num(0), dbias[2].nan_to_num(0)))
    std::printf("FAIL %s: two backward runs differ\n", name), ++failures;
}

int main(int argc, char** argv) {
  at::manual_seed(0);
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which != "all" && which != "quick" && which != "vision" && which != "fuzz")
    return std::printf("usage: driver_layer_norm [all | quick | vision | fuzz <seed> <count> [first]]\n"), 2;
  if (which == "fuzz") {  // random cases (driver_common.h's fuzz_cases)
    fuzz_cases(argc, argv, [](FuzzDraw& f) {
      Case c;
      c.dt = f.dtype(), c.rows = f.length(400), c.C = f.width(128, 1100);
      c.weight = f.chance(0.8), c.bias = f.chance(0.8), c.misaligned = f.chance(0.25), c.poison = f.chance(0.1);
      c.addend = f.chance(0.3), c.addend_misaligned = c.addend && !c.misaligned && f.chance(0.3);
      const MaybeCappedGrid cap(f);
      ln_case(c);
    });
    return report_failures();
  }
  if (which == "vision") {  // SoLA-Vision tiny's first and last stages at batch 1 (MEMSTAT=1 statistics)
    Case c;
    c.rows = 3136, c.C = 64, c.addend = true;
    ln_case(c);
    c.rows = 49, c.C = 512;
    ln_case(c);
    return report_failures();
  }
  const bool quick = which == "quick";
  std::vector<at::ScalarType> dts = {at::kBFloat16};
  if (!quick) dts = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
  for (auto dt : dts) {
    // 1..512: cached (vector where C is a multiple of it, else scalar); 600, 1030, 2048: read per pass.
    for (int64_t C : {1, 3, 8, 16, 40, 64, 100, 200, 512, 600, 1030, 2048}) {
      Case c;
      c.dt = dt, c.C = C;
      ln_case(c);
    }
    for (auto [weight, bias] : {std::pair<bool, bool>{false, true}, {true, false}, {false, false}}) {
      for (int64_t C : {64, 1030}) {
        Case c;
        c.dt = dt, c.C = C, c.weight = weight, c.bias = bias;
        ln_case(c);
      }
    }
    for (int64_t C : {64, 1024}) {
      Case c;
      c.dt = dt, c.C = C, c.misaligned = true;
      ln_case(c);
      c = Case{};
      c.dt = dt, c.C = C, c.poison = true;
      ln_case(c);
      c.huge = true;
      ln_case(c);
    }
    for (int64_t C : {3, 64, 1030}) {  // scalar, vector (cached), read per pass
      Case c;
      c.dt = dt, c.C = C, c.addend = true;
      ln_case(c);
      c.misaligned = true;
      ln_case(c);
      c.misaligned = false, c.addend_misaligned = true;
      ln_case(c);
    }
    Case one;  // a single row
    one.dt = dt, one.rows = 1;
    ln_case(one);
  }
  if (!quick) {
    Case walk;  // 8-wide rows, 256 a block: 1172 groups of rows, past the backward's 1024 blocks
    walk.rows = 300000, walk.C = 8;
    ln_case(walk);
    walk.rows = 3000, walk.C = 1030;  // the column kernel with several partials
    ln_case(walk);
  }
  return report_failures();
}
