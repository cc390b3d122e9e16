// Depthwise 3x3 convolution of (B, H, W, C) tokens, zero padding 1, stride s = 1 or 2: the CPE,
// LePE and in-block convs of SoLA-Vision (s = 1) and its downsample's conv (s = 2), in the layout its
// blocks keep (channels last, so no NCHW copies), with an optional residual (out = x + conv(x), the
// CPE form, s = 1):
//   out[b, h, w, c] = bias[c] + sum_{dy, dx < 3} tap(c, 3 dy + dx) * x[b, s h + dy - 1, s w + dx - 1, c]
// for h < OH = ceil(H / s), w < OW = ceil(W / s), or, with activation "silu" / "relu", that of it
// (the block's in-block conv and its activation in one pass; the downsample's conv and its ReLU).
// The residual is a 1 added to the centre tap, so the kernels only convolve; at s = 1 the gradient of
// x is the same convolution of the output's gradient with the taps reversed. Both are flags the
// kernels apply as they read the weight, which they take as nn.Conv2d keeps it: no per-call
// re-layout. At s = 2 the gradient of x is its own kernel (the transposed convolution).
// input_activation "relu" convolves relu(x) instead (the downsample's expand conv -> ReLU -> this
// conv): the kernels that read x read relu of it, and the input gradient's kernels mask what they
// write by x > 0, so relu(x) and its gradient are never written.
// addend (the output's shape) is added to the forward's output as it is written (LePE's
// out = attention + conv(v)): the sum is never written and read back. dx_addend, at s = 1, is added to
// the input gradient the same way (the gradient of x's other consumers, summed where it is written).
// What the op layer hands to the CPU and CUDA kernels.
#pragma once

#include "common.h"

namespace sola {

constexpr int kDwTaps = 9;
// The weight gradient's rows: the 9 taps' gradients, then the bias's (sum of the output grads).
constexpr int kDwGradRows = kDwTaps + 1;

// What a convolution kernel writes for its sum s = bias + taps . window at each output position:
// s, silu(s) (the block's in-block conv and its activation, one pass), g * silu'(s) with g the
// output's gradient there (the first step of that pair's backward, s recomputed from x), or relu(s)
// (its backward needs only the output: the op layer masks the gradient with it).
enum class DwEpilogue : int { Plain = 0, Silu = 1, SiluGrad = 2, Relu = 3 };

struct DwconvParams {
  int64_t B = 0, H = 0, W = 0, C = 0;
  int stride = 1;
  int64_t OH = 0, OW = 0;  // the output's rows and columns: ceil(H / stride), ceil(W / stride)
  // Convolution: x (B, H, W, C) as a View4 over (b, h, w): channel dim contiguous, other strides
  // free -> out (B, OH, OW, C, contiguous). The transposed one (the input gradient at stride 2):
  // grad (B, OH, OW, C) -> out (B, H, W, C). weight (C, 9): tap 3 dy + dx of channel c at weight[9 c + 3 dy + dx]
  // (nn.Conv2d's (C, 1, 3, 3)), bias (C) or null; both acc-typed (fp32, fp64 for fp64) and contiguous.
  View4 x, out;
  const void* weight = nullptr;
  const void* bias = nullptr;
  bool residual = false;  // 1 added to the centre tap: out = x + conv(x)
  bool reversed = false;  // tap t read as tap 8 - t: the convolution that gives the input's gradient
  DwEpilogue epilogue = DwEpilogue::Plain;  // SiluGrad reads g from grad (B, OH, OW, C)
  // input_activation "relu": the kernels that read x as the convolution's input (the convolution and
  // SiluGrad's sum recomputed from x, the weight gradient) read relu(x) (dw_relu).
  bool relu_input = false;
  // Its input gradient: the kernels that write it (the reversed convolution at stride 1, the
  // transposed one at stride 2) write out where mask (the forward's x, out's shape) > 0, else 0
  // (dw_relu_grad); no mask where mask.ptr is null.
  View4 mask;
  // The forward's addend, or the backward's dx_addend (stride 1: the reversed convolution): the
  // convolution (dwconv_cpu / _cuda) writes out = epilogue + addend (out's shape, channel dim
  // contiguous), before any mask; no addend where addend.ptr is null. The transposed convolution and
  // the weight gradient do not read it.
  View4 addend;
  // Weight gradient: sums over the output positions (b, h, w) of grad[b, h, w, c] *
  // x[b, s h + dy - 1, s w + dx - 1, c] per tap into dweight (C, 9), and of grad into dbias (C;
  // skipped when null), acc-typed, in a fixed order.
  View4 grad;
  void* dweight = nullptr;
  void* dbias = nullptr;
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// Tap t as the kernels convolve with it, from w, the stored tap at t (kDwTaps - 1 - t when reversed;
// the centre, 4, is its own reverse).
template <typename acc>
SOLA_HD acc dw_tap_with_residual(const DwconvParams& p, acc w, int t) {
  return p.residual && t == kDwTaps / 2 ? w + acc(1) : w;
}

// Tap t of channel c as the kernels convolve with it.
template <typename acc>
SOLA_HD acc dw_tap(const DwconvParams& p, int64_t c, int t) {
  return dw_tap_with_residual(p, static_cast<const acc*>(p.weight)[c * kDwTaps + (p.reversed ? kDwTaps - 1 - t : t)], t);
}

// Runs the lambda-like body with `constexpr DwEpilogue kEpi` bound to epi.
#define SOLA_DW_EPILOGUE_SWITCH(epi, kEpi, ...)                                                                    \
  [&] {                                                                                                          \
    if ((epi) == ::sola::DwEpilogue::Relu) {                                                                     \
      constexpr auto kEpi = ::sola::DwEpilogue::Relu;                                                            \
      return __VA_ARGS__();                                                                                      \
    }                                                                                                            \
    return SOLA_SWITCH3(epi, kEpi, ::sola::DwEpilogue::Silu, ::sola::DwEpilogue::SiluGrad,                      \
                        ::sola::DwEpilogue::Plain, __VA_ARGS__);                                                 \
  }()

// Runs the lambda-like body with `constexpr int kS` bound to the stride (1 or 2).
#define SOLA_DW_STRIDE_SWITCH(stride, kS, ...) \
  [&] {                                       \
    if ((stride) == 2) {                      \
      constexpr int kS = 2;                   \
      return __VA_ARGS__();                   \
    }                                         \
    constexpr int kS = 1;                     \
    return __VA_ARGS__();                     \
  }()

// The epilogue's value for the sum s (g: the output's gradient, for SiluGrad).
template <DwEpilogue kEpi, typename acc>
SOLA_HD acc dw_epilogue(acc s, acc g) {
  if constexpr (kEpi == DwEpilogue::Plain) {
    return s;
  } else if constexpr (kEpi == DwEpilogue::Relu) {
    return s > acc(0) ? s : (s == s ? acc(0) : s);  // NaN stays NaN, as torch.relu
  } else {
    const acc sig = acc(1) / (acc(1) + kernel_exp<false>(-s));
    if constexpr (kEpi == DwEpilogue::Silu) return s * sig;
    else return g * (sig * (acc(1) + s * (acc(1) - sig)));
  }
}

// torch.relu: negatives to 0; NaN (and -0) as they are.
template <typename acc>
SOLA_HD acc dw_relu(acc v) {
  return v < acc(0) ? acc(0) : v;
}

// The gradient g of relu(x) at x as torch's threshold_backward(g, x, 0) selects it (its CPU and CUDA
// kernels: x <= 0 ? 0 : g): 0 where x <= 0 (a NaN or inf g too), g elsewhere, so a NaN x passes g
// (NaN <= 0 is false; torch.relu's own backward does the same).
template <typename acc>
SOLA_HD acc dw_relu_grad(acc g, acc x) {
  return x <= acc(0) ? acc(0) : g;
}

// Element i of the weight gradient's (10, C) sums: where it goes (tap-major order, as the kernels
// sum it; null for the bias's when there is no dbias).
template <typename acc>
SOLA_HD acc* dw_grad_slot(const DwconvParams& p, int64_t i) {
  const int64_t t = i / p.C, c = i % p.C;
  if (t < kDwTaps) return static_cast<acc*>(p.dweight) + c * kDwTaps + t;
  return p.dbias ? static_cast<acc*>(p.dbias) + c : nullptr;
}

// The op layer's entry points (schemas in sola.cpp).
at::Tensor depthwise_conv3x3_fwd(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, bool residual,
                                 std::string activation, int64_t stride, std::string input_activation,
                                 c10::optional<at::Tensor> addend);
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv3x3_bwd(
    at::Tensor grad_out, at::Tensor x, at::Tensor weight, bool residual, bool with_bias,
    c10::optional<at::Tensor> bias, std::string activation, int64_t stride, c10::optional<at::Tensor> out,
    std::string input_activation, c10::optional<at::Tensor> dx_addend);

void dwconv_cpu(const DwconvParams& p);
void dwconv_transposed_cpu(const DwconvParams& p);
void dwconv_wgrad_cpu(const DwconvParams& p);
#ifdef SOLA_WITH_CUDA
void dwconv_cuda(const DwconvParams& p);
void dwconv_transposed_cuda(const DwconvParams& p);
void dwconv_wgrad_cuda(const DwconvParams& p);
#endif

}  // namespace sola
