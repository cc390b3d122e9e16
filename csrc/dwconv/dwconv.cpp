// The depthwise_conv3x3 ops: check arguments, hand the weight to the kernels as it is, allocate outputs,
// hand a params struct to the backend's kernels. Registered for CPU and (when built) CUDA.
#include <torch/library.h>

#include "dwconv/dwconv.h"
#include "elementwise_checks.h"

namespace sola {
namespace {

// t (x, grad_out, out) is (B, H, W, C) tokens: rank (with the layout's name), then what every op's
// tensors share with x (dtype, device, layout: check_attention_tensor).
void check_tokens(const at::Tensor& t, const char* name, const at::Tensor& x) {
  SOLA_CHECK(t.dim() == 4, name, " must be 4-D (B, H, W, C), channels last, got shape ", t.sizes());
  check_attention_tensor(t, name, x, "x");
}

// The output's shape for x at `stride`: (B, ceil(H / stride), ceil(W / stride), C).
std::vector<int64_t> output_sizes(const at::Tensor& x, int64_t stride) {
  return {x.size(0), ceil_div(x.size(1), stride), ceil_div(x.size(2), stride), x.size(3)};
}

// grad_out, the forward's out (relu) and addend have the output's shape.
void check_output_shaped(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t stride) {
  check_tokens(t, name, x);
  const std::vector<int64_t> want = output_sizes(x, stride);
  if (stride == 1) {
    SOLA_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  } else {
    SOLA_CHECK(t.sizes() == at::IntArrayRef(want), name, " must have the output's shape (B, OH, OW, C) = ", want,
               " at stride ", stride, ", got ", t.sizes());
  }
}

void check_weight(const at::Tensor& weight, const at::Tensor& x) {
  const int64_t C = x.size(3);
  const bool conv_shape = weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == 3 &&
                          weight.size(3) == 3;
  const bool plain_shape = weight.dim() == 3 && weight.size(0) == C && weight.size(1) == 3 && weight.size(2) == 3;
  SOLA_CHECK(conv_shape || plain_shape, "weight must be (C, 1, 3, 3) (a depthwise nn.Conv2d's) or (C, 3, 3) with C = ",
             C, " channels of x, got shape ", weight.sizes());
  check_param(weight, "weight", x);
}

// weight as the kernels read it: (C, 9) acc-typed, contiguous and 16-byte aligned (the CUDA kernels
// load a channel vector's taps as 16-byte vectors). A view of nn.Conv2d's fp32 weight (autocast keeps
// parameters fp32), a copy only for other dtypes or layouts, or a view starting off a 16-byte boundary.
at::Tensor kernel_weight(const at::Tensor& weight, const at::Tensor& x) {
  const at::Tensor w = weight.reshape({x.size(3), kDwTaps}).to(acc_dtype(x)).contiguous();
  return reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 ? w : w.clone();
}

DwconvParams make_params(const at::Tensor& x, const at::Tensor& weight, bool residual, int64_t stride) {
  DwconvParams p;
  p.B = x.size(0), p.H = x.size(1), p.W = x.size(2), p.C = x.size(3);
  p.stride = static_cast<int>(stride);
  p.OH = ceil_div(p.H, stride), p.OW = ceil_div(p.W, stride);
  p.x = make_view(x);
  p.weight = weight.data_ptr();
  p.residual = residual;
  p.dtype = x.scalar_type();
  p.device_index = x.is_cuda() ? x.device().index() : -1;
  return p;
}

// The convolution of src at stride (taps reversed: the input gradient's at stride 1), through
// `epilogue`; contiguous. SiluGrad reads the output's gradient from grad. relu_input: of relu(src);
// mask (out's shape, last dim contiguous): out where mask > 0, else 0 (input_activation "relu"'s input
// gradient, masked by x). addend (out's shape, last dim contiguous): added to what is written.
at::Tensor convolve(at::Tensor src, const at::Tensor& weight, const at::Tensor& bias, bool residual, bool reversed,
                    int64_t stride, DwEpilogue epilogue = DwEpilogue::Plain, const at::Tensor& grad = at::Tensor(),
                    bool relu_input = false, const at::Tensor& mask = at::Tensor(),
                    const at::Tensor& addend = at::Tensor()) {
  src = last_dim_contiguous(src);
  at::Tensor out = new_output(output_sizes(src, stride), src.options());
  if (out.numel() == 0) return out;
  DwconvParams p = make_params(src, weight, residual, stride);
  p.reversed = reversed;
  p.epilogue = epilogue;
  p.relu_input = relu_input;
  p.out = make_view(out);
  if (bias.defined()) p.bias = bias.data_ptr();
  if (grad.defined()) p.grad = make_view(grad);
  if (mask.defined()) p.mask = make_view(mask);
  if (addend.defined()) p.addend = make_view(addend);
  SOLA_RUN_KERNEL(src, "x", dwconv, p);
  return out;
}

// The input gradient at stride 2: the transposed convolution of grad (B, OH, OW, C) into x's shape;
// relu_input: masked by x > 0.
at::Tensor convolve_transposed(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                               bool relu_input) {
  at::Tensor out = new_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  DwconvParams p = make_params(x, weight, false, 2);
  p.grad = make_view(grad);
  p.out = make_view(out);
  if (relu_input) p.mask = p.x;
  SOLA_RUN_KERNEL(x, "x", dwconv_transposed, p);
  return out;
}

void check_x(const at::Tensor& x) {
  SOLA_CHECK(x.device().is_cpu() || x.device().is_cuda(), "x must be on a CPU or CUDA device, got ", x.device());
  check_tokens(x, "x", x);
}

// activation "none", "silu" or "relu" as the forward's epilogue; residual only without one, at stride 1.
DwEpilogue parse_activation(const std::string& activation, bool residual, int64_t stride) {
  SOLA_CHECK(activation == "none" || activation == "silu" || activation == "relu",
             "activation must be 'none', 'silu' or 'relu', got '", activation, "'");
  SOLA_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  SOLA_CHECK(!(residual && activation != "none"), "residual and activation='", activation, "' cannot be combined");
  SOLA_CHECK(!(residual && stride != 1), "residual needs stride 1 (out = x + conv(x)), got stride ", stride);
  if (activation == "silu") return DwEpilogue::Silu;
  return activation == "relu" ? DwEpilogue::Relu : DwEpilogue::Plain;
}

// input_activation "none" or "relu" (relu: true); not "relu" with residual (x + conv(relu(x))
// would add x, not relu(x)).
bool parse_input_activation(const std::string& input_activation, bool residual) {
  SOLA_CHECK(input_activation == "none" || input_activation == "relu",
             "input_activation must be 'none' or 'relu', got '", input_activation, "'");
  SOLA_CHECK(!(residual && input_activation != "none"), "residual and input_activation='", input_activation,
             "' cannot be combined");
  return input_activation == "relu";
}

}  // namespace

at::Tensor depthwise_conv3x3_fwd(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, bool residual,
                                 std::string activation, int64_t stride, std::string input_activation,
                                 c10::optional<at::Tensor> addend) {
  check_x(x);
  check_weight(weight, x);
  const DwEpilogue epilogue = parse_activation(activation, residual, stride);
  const bool relu_input = parse_input_activation(input_activation, residual);
  at::Tensor add;
  if (addend.has_value()) {
    // relu's backward masks the gradient by the output, which would then include the addend
    SOLA_CHECK(epilogue != DwEpilogue::Relu, "addend and activation='relu' cannot be combined");
    check_output_shaped(*addend, "addend", x, stride);
    add = last_dim_contiguous(*addend);
  }
  return convolve(x, kernel_weight(weight, x), acc_channel_param(bias, "bias", x), residual, false, stride, epilogue,
                  at::Tensor(), relu_input, at::Tensor(), add);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv3x3_bwd(
    at::Tensor grad_out, at::Tensor x, at::Tensor weight, bool residual, bool with_bias,
    c10::optional<at::Tensor> bias, std::string activation, int64_t stride, c10::optional<at::Tensor> out,
    std::string input_activation, c10::optional<at::Tensor> dx_addend) {
  check_x(x);
  check_weight(weight, x);
  const DwEpilogue epilogue = parse_activation(activation, residual, stride);
  const bool relu_input = parse_input_activation(input_activation, residual);
  check_output_shaped(grad_out, "grad_out", x, stride);
  at::Tensor dx_add;
  if (dx_addend.has_value()) {
    // only the reversed convolution adds it, and before its relu mask, which must not cover the addend
    SOLA_CHECK(stride == 1, "dx_addend needs stride 1, got stride ", stride);
    SOLA_CHECK(!relu_input, "dx_addend and input_activation='relu' cannot be combined");
    check_output_shaped(*dx_addend, "dx_addend", x, 1);
    dx_add = last_dim_contiguous(*dx_addend);
  }
  x = last_dim_contiguous(x);  // once each, for every kernel
  grad_out = last_dim_contiguous(grad_out);
  const at::Tensor w = kernel_weight(weight, x);
  // The gradient of the sum first. relu: g where the forward's out > 0, else 0 (torch's ReLU backward).
  // silu: g * silu'(conv(x) + bias), the sum recomputed from x (from relu(x) with relu_input).
  if (epilogue == DwEpilogue::Relu) {
    SOLA_CHECK(out.has_value(), "activation='relu' needs out (the forward's result) for its backward");
    check_output_shaped(*out, "out", x, stride);
    grad_out = last_dim_contiguous(at::threshold_backward(grad_out, *out, 0));  // it may take out's layout
  } else if (epilogue == DwEpilogue::Silu) {
    grad_out = convolve(x, w, acc_channel_param(bias, "bias", x), false, false, stride, DwEpilogue::SiluGrad, grad_out,
                        relu_input);
  }
  // dx: the gradient of the convolution's input, masked by x > 0 where that input was relu(x) (as
  // its kernels write it: dx = (x > 0) * conv^T(g)).
  const at::Tensor dx = stride == 1 ? convolve(grad_out, w, at::Tensor(), residual, true, 1, DwEpilogue::Plain,
                                               at::Tensor(), false, relu_input ? x : at::Tensor(), dx_add)
                                    : convolve_transposed(grad_out, x, w, relu_input);
  const auto acc_options = x.options().dtype(acc_dtype(x));
  at::Tensor dweight = new_output({x.size(3), kDwTaps}, acc_options);
  at::Tensor dbias = new_output({with_bias ? x.size(3) : 0}, acc_options);
  if (x.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
  } else {
    DwconvParams p = make_params(x, w, residual, stride);
    p.relu_input = relu_input;  // the weight gradient's products with relu(x)
    p.grad = make_view(grad_out);
    p.dweight = dweight.data_ptr();
    if (with_bias) p.dbias = dbias.data_ptr();
    SOLA_RUN_KERNEL(x, "x", dwconv_wgrad, p);
  }
  // dweight in the weight's dtype (a copy only when it is not the accumulator's); dbias stays in the
  // accumulator's: the bias may have a dtype of its own, which autograd casts it to.
  return {dx, dweight.reshape(weight.sizes()).to(weight.scalar_type()), dbias};
}

TORCH_LIBRARY_IMPL(sola_ops, CPU, m) {
  m.impl("depthwise_conv3x3_fwd", &depthwise_conv3x3_fwd);
  m.impl("depthwise_conv3x3_bwd", &depthwise_conv3x3_bwd);
}

#ifdef SOLA_WITH_CUDA
TORCH_LIBRARY_IMPL(sola_ops, CUDA, m) {
  m.impl("depthwise_conv3x3_fwd", &depthwise_conv3x3_fwd);
  m.impl("depthwise_conv3x3_bwd", &depthwise_conv3x3_bwd);
}
#endif

}  // namespace sola
