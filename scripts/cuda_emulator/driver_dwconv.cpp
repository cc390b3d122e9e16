// Runs the depthwise 3x3 conv CUDA launchers (emulated on the CPU, see README.md) against the CPU
// kernels: the convolution with and without bias, the residual's centre tap and the reversed taps,
// the epilogues (silu of the sum; the output's gradient times silu' of it; relu), stride 1 and 2, the
// transposed convolution (the input gradient at stride 2), the weight gradient (taps and bias), every dtype, channel counts that take the vector and the scalar
// kernels, images smaller than a strip and taller than one, strided and misaligned views, NaN inputs,
// and lanes that walk more than one task. Relu input (input_activation "relu"): the convolution, its
// epilogues and the weight gradient reading relu(x), and the input gradient's kernels masking by x (the
// transposed one at stride 2; at stride 1 the reversed convolution of g, as the op layer runs it).
// An addend added to the convolution's output (in the case's layout, or misaligned beside an aligned x),
// also to the reversed one's (the backward's dx_addend).
// Usage: driver_dwconv [all | quick | vision | fuzz <seed> <count> [first]] (quick: bf16, no walk; vision: model
// shapes for MEMSTAT=1; fuzz: random cases).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "driver_common.h"
#include "dwconv/dwconv.h"

using namespace sola;

struct Case {
  int64_t B = 2, H = 9, W = 7, C = 16;
  int stride = 1;
  at::ScalarType dt = at::kBFloat16;
  bool bias = true, strided = false, misaligned = false, poison = false, residual = false, reversed = false;
  bool relu_in = false;  // relu_input for the convolution and the weight gradient; dx masked by x
  int addend = 0;         // 0: none, 1: an addend in the case's layout, 2: misaligned (x as the case says)
  DwEpilogue epilogue = DwEpilogue::Plain;
};

// (B, H, W, C) tokens: contiguous, or a view with the channel dim contiguous and the others not
// (strided: H and W swapped in memory; misaligned: rows starting one element off 16 bytes).
static at::Tensor tokens(const Case& c, int64_t H, int64_t W) {
  if (c.strided) return at::randn({c.B, W, H, c.C}, at::kDouble).to(c.dt).transpose(1, 2);
  if (c.misaligned) return at::randn({c.B, H, W, c.C + 1}, at::kDouble).to(c.dt).narrow(3, 1, c.C);
  return at::randn({c.B, H, W, c.C}, at::kDouble).to(c.dt);
}

static void dwconv_case(const Case& c) {
  char name[200];
  std::snprintf(name, sizeof name, "dwconv B%ld H%ld W%ld C%ld /%d %s b%d s%d m%d p%d r%d f%d e%d i%d a%d", (long)c.B,
                (long)c.H, (long)c.W, (long)c.C, c.stride, c10::toString(c.dt), c.bias, c.strided, c.misaligned,
                c.poison, c.residual, c.reversed, (int)c.epilogue, c.relu_in, c.addend);
  const at::ScalarType dt = c.dt, acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t OH = ceil_div(c.H, c.stride), OW = ceil_div(c.W, c.stride);
  at::Tensor x = tokens(c, c.H, c.W), g = tokens(c, OH, OW);
  if (c.poison) x.select(0, 0).select(0, c.H / 2).select(0, c.W / 2).select(0, c.C - 1).fill_(NAN);
  const at::Tensor weight = at::randn({c.C, kDwTaps}, at::kDouble).to(acc);
  const at::Tensor bias = at::randn({c.C}, at::kDouble).to(acc);

  DwconvParams p;
  p.B = c.B, p.H = c.H, p.W = c.W, p.C = c.C;
  p.stride = c.stride, p.OH = OH, p.OW = OW;
  p.x = make_view(x), p.grad = make_view(g);
  p.weight = weight.data_ptr(), p.bias = c.bias ? bias.data_ptr() : nullptr;
  p.residual = c.residual, p.reversed = c.reversed, p.epilogue = c.epilogue;
  p.relu_input = c.relu_in;
  p.dtype = dt, p.device_index = -1;
  Case ac = c;
  ac.misaligned = c.misaligned || c.addend == 2;
  const at::Tensor addend = tokens(ac, OH, OW);
  if (c.addend) p.addend = make_view(addend);
  // The input gradient's g: with relu_in and misaligned, an aligned copy, so that the mask (x) alone is
  // misaligned (its own check picks the one-channel kernels; UBSAN=1 faults a vector access to it).
  const at::Tensor gdx = c.relu_in && c.misaligned ? g.contiguous() : g;
  at::Tensor out[3], dx[2], dweight[3], dbias[3];
  for (int r = 0; r < 3; ++r) {  // 0, 2: emulated CUDA (2: the weight gradient again), 1: CPU
    out[r] = nan_out({c.B, OH, OW, c.C}, dt);
    dweight[r] = nan_out({c.C, kDwTaps}, acc), dbias[r] = nan_out({c.C}, acc);
    p.out = make_view(out[r]), p.dweight = dweight[r].data_ptr(), p.dbias = c.bias ? dbias[r].data_ptr() : nullptr;
    if (r == 1) dwconv_cpu(p), dwconv_wgrad_cpu(p);
    else if (r == 0) dwconv_cuda(p), dwconv_wgrad_cuda(p);
    else dwconv_wgrad_cuda(p);
    if (r < 2 && c.stride == 2) {  // the transposed convolution of g, into x's shape (masked by x: relu_in)
      dx[r] = nan_out({c.B, c.H, c.W, c.C}, dt);
      DwconvParams q = p;
      q.grad = make_view(gdx), q.out = make_view(dx[r]), q.addend = View4{};
      if (c.relu_in) q.mask = q.x;
      if (r == 1) dwconv_transposed_cpu(q);
      else dwconv_transposed_cuda(q);
    } else if (r < 2 && c.relu_in) {  // stride 1: the reversed convolution of g, masked by x
      dx[r] = nan_out({c.B, c.H, c.W, c.C}, dt);
      DwconvParams q = p;
      q.x = make_view(gdx), q.mask = p.x, q.out = make_view(dx[r]);
      q.reversed = true, q.relu_input = false, q.epilogue = DwEpilogue::Plain, q.bias = nullptr, q.addend = View4{};
      if (r == 1) dwconv_cpu(q);
      else dwconv_cuda(q);
    }
  }
  const bool finite = !c.poison;
  compare(std::string(name) + " out", out[0], out[1], dt, finite);
  if (c.stride == 2) compare(std::string(name) + " transposed", dx[0], dx[1], dt, true);
  else if (c.relu_in) compare(std::string(name) + " masked dx", dx[0], dx[1], dt, true);
  // The weight gradient sums B * OH * OW products: scale the tolerance by their count's square root.
  const double n = std::sqrt(double(c.B * OH * OW));
  compare(std::string(name) + " dweight", dweight[0] / n, dweight[1] / n, acc, finite);
  if (c.bias) compare(std::string(name) + " dbias", dbias[0] / n, dbias[1] / n, acc, finite);
  else if (!at::isnan(dbias[0]).all().item<bool>()) std::printf("FAIL %s: dbias written without bias\n", name), ++failures;
  if (!at::equal(dweight[0].nan_to_num(0), dweight[2].nan_to_num(0)) || !at::equal(dbias[0].nan_to_num(0), dbias[2].nan_to_num(0)))
    std::printf("FAIL %s: two weight gradients differ\n", name), ++failures;
}

int main(int argc, char** argv) {
  at::manual_seed(0);
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which != "all" && which != "quick" && which != "vision" && which != "fuzz")
    return std::printf("usage: driver_dwconv [all | quick | vision | fuzz <seed> <count> [first]]\n"), 2;
  // Random cases (driver_common.h's fuzz_cases): sizes, channel counts, strides, the combinations of residual,
  // reversed taps, epilogue, relu input and addend that the op layer runs, layouts, NaN, capped grids.
  if (which == "fuzz") {
    fuzz_cases(argc, argv, [](FuzzDraw& f) {
      Case c;
      c.dt = f.dtype();
      c.B = f.uniform(1, 3), c.H = f.length(40), c.W = f.length(40);
      c.C = f.width(40, 300);
      c.stride = int(f.uniform(1, 2));
      const int64_t layout = f.uniform(0, 3);  // 0, 1: contiguous
      c.strided = layout == 2, c.misaligned = layout == 3;
      c.bias = f.chance(0.7), c.poison = f.chance(0.1);
      const double u = f.real(0, 1);
      if (c.stride == 1 && u < 0.2) {
        c.residual = true;  // the CPE
      } else if (c.stride == 1 && u < 0.3) {
        c.reversed = true, c.residual = f.chance(0.5);  // the stride-1 input gradient
      } else {
        c.epilogue = static_cast<DwEpilogue>(f.uniform(0, 3)), c.relu_in = f.chance(0.3);
      }
      if ((c.epilogue == DwEpilogue::Plain || c.epilogue == DwEpilogue::Silu) && f.chance(0.3))
        c.addend = int(f.uniform(1, 2));
      const MaybeCappedGrid cap(f);
      dwconv_case(c);
    });
    return report_failures();
  }
  if (which == "vision") {  // SoLA-Vision tiny's first stage at batch 1 (MEMSTAT=1 statistics): CPE with its
    Case c;                 // residual, the in-block conv with SiLU, the downsample's stride 2 with relu
    c.B = 1, c.H = c.W = 56, c.C = 64, c.residual = true;
    dwconv_case(c);
    c.residual = false, c.epilogue = DwEpilogue::Silu;
    dwconv_case(c);
    c.epilogue = DwEpilogue::Plain, c.C = 256, c.stride = 2, c.relu_in = true;
    dwconv_case(c);
    return report_failures();
  }
  const bool quick = which == "quick";
  std::vector<at::ScalarType> dts = {at::kBFloat16};
  if (!quick) dts = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
  for (auto dt : dts) {
    for (int64_t C : {1, 3, 4, 16, 66, 200}) {  // scalar kernels where C is not a multiple of the vector
      Case c;
      c.dt = dt, c.C = C;
      dwconv_case(c);
    }
    for (auto [H, W] : {std::pair<int64_t, int64_t>{1, 1}, {2, 5}, {8, 3}, {17, 1}, {3, 33}}) {
      Case c;
      c.dt = dt, c.H = H, c.W = W, c.bias = false;
      dwconv_case(c);
    }
    Case c;
    c.dt = dt, c.strided = true;
    dwconv_case(c);
    c = Case{};
    c.dt = dt, c.misaligned = true, c.C = 24;
    dwconv_case(c);
    c = Case{};
    c.dt = dt, c.poison = true;
    dwconv_case(c);
    for (int flags = 1; flags < 4; ++flags) {  // the residual's centre tap, the reversed taps, both
      c = Case{};
      c.dt = dt, c.residual = flags & 1, c.reversed = flags & 2, c.H = 11;
      dwconv_case(c);
    }
    for (auto epi : {DwEpilogue::Silu, DwEpilogue::SiluGrad}) {  // silu(s), g * silu'(s) (g read like x)
      for (int64_t C : {16, 7}) {
        c = Case{};
        c.dt = dt, c.epilogue = epi, c.C = C, c.H = 21;
        dwconv_case(c);
      }
      c = Case{};
      c.dt = dt, c.epilogue = epi, c.misaligned = true, c.C = 24;
      dwconv_case(c);
    }
  }
  for (auto dt : dts) {  // stride 2: the downsample's conv, its relu, and the transposed convolution
    for (int64_t C : {1, 3, 16, 66}) {
      Case c;
      c.dt = dt, c.C = C, c.stride = 2;
      dwconv_case(c);
    }
    for (auto [H, W] : {std::pair<int64_t, int64_t>{1, 1}, {2, 1}, {1, 2}, {2, 5}, {8, 3}, {37, 9}, {3, 33}}) {
      Case c;  // 37 rows: 19 output rows, past a 16-row strip
      c.dt = dt, c.H = H, c.W = W, c.bias = false, c.stride = 2;
      dwconv_case(c);
    }
    for (int layout = 0; layout < 3; ++layout) {
      Case c;
      c.dt = dt, c.stride = 2, c.strided = layout == 0, c.misaligned = layout == 1, c.poison = layout == 2;
      c.C = c.misaligned ? 24 : 16;
      dwconv_case(c);
    }
    for (auto epi : {DwEpilogue::Relu, DwEpilogue::Silu, DwEpilogue::SiluGrad}) {
      for (int64_t C : {16, 7}) {
        Case c;
        c.dt = dt, c.epilogue = epi, c.C = C, c.H = 21, c.W = 10, c.stride = 2;
        dwconv_case(c);
      }
    }
    Case relu;  // relu at stride 1 too
    relu.dt = dt, relu.epilogue = DwEpilogue::Relu, relu.H = 19;
    dwconv_case(relu);
  }
  for (auto dt : dts) {  // relu input at both strides: every epilogue, the one-channel kernels, layouts, NaN
    for (int stride : {1, 2}) {
      for (auto epi : {DwEpilogue::Plain, DwEpilogue::Relu, DwEpilogue::Silu, DwEpilogue::SiluGrad}) {
        for (int64_t C : {16, 7}) {
          Case c;
          c.dt = dt, c.relu_in = true, c.epilogue = epi, c.C = C, c.H = 21, c.W = 9, c.stride = stride;
          c.bias = C == 16;
          dwconv_case(c);
        }
      }
      for (int layout = 0; layout < 3; ++layout) {
        Case c;
        c.dt = dt, c.relu_in = true, c.stride = stride, c.H = 37, c.epilogue = DwEpilogue::Relu;
        c.strided = layout == 0, c.misaligned = layout == 1, c.poison = layout == 2;
        c.C = c.misaligned ? 24 : 16;
        dwconv_case(c);
      }
      for (auto [H, W] : {std::pair<int64_t, int64_t>{1, 1}, {2, 5}, {17, 2}}) {
        Case c;
        c.dt = dt, c.relu_in = true, c.stride = stride, c.H = H, c.W = W, c.C = 3;
        dwconv_case(c);
      }
    }
  }
  for (auto dt : dts) {  // an addend: each epilogue it takes, both strides, layouts, the one-channel kernels
    for (int stride : {1, 2}) {
      for (auto epi : {DwEpilogue::Plain, DwEpilogue::Silu}) {
        for (int64_t C : {16, 7}) {
          Case c;
          c.dt = dt, c.addend = 1, c.epilogue = epi, c.C = C, c.H = 21, c.W = 9, c.stride = stride;
          c.residual = stride == 1 && epi == DwEpilogue::Plain && C == 16;
          c.relu_in = stride == 2 && C == 7;
          dwconv_case(c);
        }
      }
      if (stride == 1) {  // the backward's dx_addend: the reversed convolution (the CPE's centre tap too)
        Case c;
        c.dt = dt, c.addend = 1, c.reversed = true, c.residual = true, c.C = 16, c.H = 21, c.W = 9;
        dwconv_case(c);
        c.addend = 2, c.residual = false, c.C = 24;  // misaligned, beside an aligned x
        dwconv_case(c);
      }
      for (int layout = 0; layout < 4; ++layout) {
        Case c;
        c.dt = dt, c.addend = layout == 3 ? 2 : 1, c.stride = stride, c.H = 37;
        c.strided = layout == 0, c.misaligned = layout == 1, c.poison = layout == 2;
        c.C = layout == 1 || layout == 3 ? 24 : 16;
        dwconv_case(c);
      }
    }
  }
  Case walk;  // 33 column blocks leave 16 partials for 160 tasks of 8 lanes: lanes walk two tasks
  walk.B = 2, walk.H = 8, walk.W = 80, walk.C = 1030;
  if (!quick) dwconv_case(walk);
  walk.H = 16, walk.W = 160, walk.stride = 2;  // the same tasks at stride 2
  if (!quick) dwconv_case(walk);
  walk.relu_in = true;  // and with relu input
  if (!quick) dwconv_case(walk);
  walk.relu_in = false, walk.addend = 1;  // and an addend
  if (!quick) dwconv_case(walk);
  return report_failures();
}
