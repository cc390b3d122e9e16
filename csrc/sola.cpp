// Schemas of every sola_ops op, and the Python module's small helpers (build info, debug mode).
// Each backend registers its kernels in its own TORCH_LIBRARY_IMPL.
#include <torch/extension.h>

#include "common.h"
#include "cpu_gemm.h"

TORCH_LIBRARY(sola_ops, m) {
  // Returns (out, state S (B, H, Dk, Dv), normaliser z (B, H, Dk)); S and z are saved for backward.
  // rope_cos, rope_sin (N, Dk / 2): RoPE of phi(q), phi(k) in the numerator (linear_attention.h).
  m.def("linear_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? q_norm, Tensor? k_norm, "
        "str feature_map, bool normalize, float eps, Tensor? rope_cos=None, Tensor? rope_sin=None) "
        "-> (Tensor, Tensor, Tensor)");
  // Returns (dq, dk, dv, dq_norm, dk_norm); dq_norm / dk_norm are empty when q_norm / k_norm are None.
  m.def("linear_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? q_norm, "
        "Tensor? k_norm, Tensor state, Tensor z, str feature_map, bool normalize, float eps, "
        "Tensor? rope_cos=None, Tensor? rope_sin=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (out, lse (B, H, Nq)).
  m.def("softmax_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv). grad_lse: the gradient of lse, when it was differentiated.
  m.def("softmax_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, float scale, Tensor? grad_lse=None) -> (Tensor, Tensor, Tensor)");
  // Feature map + rotary embedding of x (B, H, N, D) by cos, sin (N, D / 2): returns (rot, feat),
  // feat = phi(x) when with_features, else empty.
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin, str feature_map, bool with_features) -> (Tensor, Tensor)");
  // Returns dx. grad_feat: the gradient of feat, when it was differentiated.
  m.def("rope_bwd(Tensor grad_rot, Tensor? grad_feat, Tensor x, Tensor cos, Tensor sin, str feature_map) -> Tensor");
  // Depthwise 3x3 convolution of x (B, H, W, C), stride 1, zero padding 1; residual: x + conv(x).
  // weight (C, 1, 3, 3) or (C, 3, 3), bias (C) of any float dtype, computed in fp32 (fp64 for fp64 x).
  // activation: "none", "silu" or "relu" (of conv(x) + bias; not with residual). stride 1 or 2
  // (residual: 1); the output is (B, ceil(H / stride), ceil(W / stride), C). input_activation "none"
  // or "relu": the convolution of relu(x) (not with residual). addend (the output's shape and x's
  // dtype): added to the output (not with activation "relu").
  m.def("depthwise_conv3x3_fwd(Tensor x, Tensor weight, Tensor? bias, bool residual, str activation=\"none\", "
        "int stride=1, str input_activation=\"none\", Tensor? addend=None) -> Tensor");
  // Returns (dx, dweight, dbias): dweight in weight's dtype, dbias (C) fp32 (fp64 for fp64 x), empty
  // unless with_bias.
  // bias: needed with activation "silu" (the backward recomputes conv(x) + bias); out (the forward's
  // result): needed with "relu" (its gradient is masked where out is 0). dx_addend (x's shape and
  // dtype; stride 1, not with input_activation "relu"): added to dx as it is written (the gradient of
  // x's other consumers), the sum rounded once.
  m.def("depthwise_conv3x3_bwd(Tensor grad_out, Tensor x, Tensor weight, bool residual, bool with_bias, "
        "Tensor? bias=None, str activation=\"none\", int stride=1, Tensor? out=None, "
        "str input_activation=\"none\", Tensor? dx_addend=None) -> (Tensor, Tensor, Tensor)");
  // LayerNorm over x's last dim C: returns (out in x's dtype, mean, rstd), mean / rstd of x's shape
  // without its last dim, fp32 (fp64 for fp64 x). weight, bias (C) of any float dtype, or None.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (dx, dweight, dbias): dweight (C) when with_weight (needs weight), dbias (C) when with_bias,
  // both fp32 (fp64 for fp64 x); empty otherwise. addend (x's shape and dtype): added to dx as it is
  // written (the gradient of x's other consumer, e.g. a residual stream), the sum rounded once.
  m.def("layer_norm_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool with_weight, "
        "bool with_bias, Tensor? addend=None) -> (Tensor, Tensor, Tensor)");
  // x * silu(gate), fused (csrc/silu_mul): x and gate of one shape and dtype, the output contiguous.
  m.def("silu_mul_fwd(Tensor x, Tensor gate) -> Tensor");
  // Returns (dx, dgate) = (grad_out * silu(gate), grad_out * x * silu'(gate)), contiguous.
  m.def("silu_mul_bwd(Tensor grad_out, Tensor x, Tensor gate) -> (Tensor, Tensor)");
  // gelu(x + bias), fused (csrc/bias_gelu): x (..., C), bias (C) of any float dtype or None, approximate
  // "none" (erf) or "tanh"; the output contiguous, in x's dtype.
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, str approximate=\"none\") -> Tensor");
  // Returns (dx, dbias): dx = grad_out * gelu'(x + bias) in x's dtype, contiguous; dbias (C) = its column
  // sums over all rows (fp32, fp64 for fp64 x; a fixed order) when with_bias (needs bias), else empty.
  m.def("bias_gelu_bwd(Tensor grad_out, Tensor x, Tensor? bias, str approximate=\"none\", bool with_bias=True) "
        "-> (Tensor, Tensor)");
}

namespace sola {
#ifdef SOLA_WITH_CUDA
std::vector<int64_t> cuda_arch_list();  // the archs nvcc compiled for (cuda_info.cu)
#endif
}  // namespace sola

static py::dict build_info() {
  py::dict info;
  info["cpu"] = true;
#ifdef SOLA_WITH_CUDA
  py::list archs;
  for (int64_t arch : sola::cuda_arch_list()) archs.append(std::to_string(arch / 100) + "." + std::to_string(arch % 100 / 10));
  info["cuda"] = true;
  info["cuda_archs"] = archs;
#ifdef SOLA_SM90A
  info["sm90a"] = true;  // Hopper's wgmma kernels were compiled (softmax_attention_flash.h)
#else
  info["sm90a"] = false;
#endif
#else
  info["sm90a"] = false;
  info["cuda"] = false;
  info["cuda_archs"] = py::list();
#endif
  info["max_cuda_head_dim"] = kMaxCudaHeadDim;
  info["cpu_gemm"] = sola::cpu::gemm_isa();
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "Which backends and CUDA archs were compiled in.");
  m.def("debug_nan_fill", &sola::debug_nan_fill, "Whether outputs are pre-filled with NaN.");
  m.def("set_debug_nan_fill", &sola::set_debug_nan_fill,
        "Pre-fill every output with NaN so an unwritten element shows (debug mode).");
}
