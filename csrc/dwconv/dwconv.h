// Depthwise 3x3 convolution of (B, H, W, C) tokens, stride 1, zero padding 1 ("same"): the CPE,
// LePE and in-block convs of SoLA-Vision, in the layout its blocks keep (channels last, so no
// NCHW copies), with an optional residual (out = x + conv(x), the CPE form):
//   out[b, h, w, c] = bias[c] + sum_{dy, dx < 3} tap[3 dy + dx][c] * x[b, h + dy - 1, w + dx - 1, c]
// The residual is a 1 added to the centre tap on the host, so the kernels only convolve; the
// gradient of x is the same convolution of the output's gradient with the taps reversed.
// What the op layer hands to the CPU and CUDA kernels.
#pragma once

#include "common.h"

namespace sola {

constexpr int kDwTaps = 9;
// The weight gradient's rows: the 9 taps' gradients, then the bias's (sum of the output grads).
constexpr int kDwGradRows = kDwTaps + 1;

struct DwconvParams {
  int64_t B = 0, H = 0, W = 0, C = 0;
  // Convolution: x (B, H, W, C) as a View4 over (b, h, w): channel dim contiguous, other strides
  // free -> out (contiguous). taps (9, C) and bias (C) are acc-typed (fp32, fp64 for fp64) and
  // contiguous; bias may be null.
  View4 x, out;
  const void* taps = nullptr;
  const void* bias = nullptr;
  // Weight gradient: sum over (b, h, w) of grad[b, h, w, c] * x[b, h + dy - 1, w + dx - 1, c] per
  // tap, and of grad (the bias's), into wgrad (10, C) acc-typed, summed in a fixed order.
  View4 grad;
  void* wgrad = nullptr;
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// The op layer's entry points (schemas in sola.cpp).
at::Tensor depthwise_conv3x3_fwd(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, bool residual);
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv3x3_bwd(at::Tensor grad_out, at::Tensor x,
                                                                     at::Tensor weight, bool residual, bool with_bias);

void dwconv_cpu(const DwconvParams& p);
void dwconv_wgrad_cpu(const DwconvParams& p);
#ifdef SOLA_WITH_CUDA
void dwconv_cuda(const DwconvParams& p);
void dwconv_wgrad_cuda(const DwconvParams& p);
#endif

}  // namespace sola
