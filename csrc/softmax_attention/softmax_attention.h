// Non-causal softmax attention: what the op layer hands to the CPU and CUDA kernels.
//   out = softmax(scale * q k^T) v, with the row log-sum-exp saved for the backward.
#pragma once

#include <cmath>
#include <limits>

#include "common.h"

namespace sola {

// A row's log-sum-exp from its running max m and l = sum_j exp(s_j - m). A +inf score makes
// l = exp(inf - inf) = NaN; torch.logsumexp says +inf there (out is NaN either way).
template <typename T>
SOLA_HD T row_lse(T m, T l) {
  return m == std::numeric_limits<T>::infinity() ? m : m + std::log(l);
}

// The lse a backward subtracts: NaN for such a +inf row. Its out is NaN, and so must its probabilities be
// (exp(s - inf) is 0 for its finite scores: dv would come out finite where the reference's is NaN).
template <typename T>
SOLA_HD T backward_lse(T lse) {
  return lse == std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::quiet_NaN() : lse;
}

struct SoftmaxAttentionParams {
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, Dk = 0, Dv = 0;
  // Inputs, last dim contiguous, any other strides.
  View4 q, k, v;
  // Forward output (contiguous; read by the backward, strided) and lse: (B, H, Nq) contiguous, fp32 (fp64 for fp64 inputs),
  // natural log of sum_j exp(scale * q_i . k_j).
  View4 out;
  void* lse = nullptr;
  // Backward: grad_out (strided), delta = rowsum(grad_out * out) - grad_lse scratch shaped like
  // lse, and the gradients (contiguous). grad_lse: the gradient of lse, shaped and typed like it
  // (contiguous), or null when lse is not differentiated (d lse_i / d s_ij = P_ij, so it enters
  // dS_ij = P_ij (dP_ij - delta_i) through delta alone).
  View4 grad_out, dq, dk, dv;
  void* delta = nullptr;
  const void* grad_lse = nullptr;
  double scale = 1.0;
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// Forward: writes out and lse. Backward: writes delta, dq, dk, dv (deterministic).
void softmax_attention_fwd_cpu(const SoftmaxAttentionParams& p);
void softmax_attention_bwd_cpu(const SoftmaxAttentionParams& p);
#ifdef SOLA_WITH_CUDA
void softmax_attention_fwd_cuda(const SoftmaxAttentionParams& p);
void softmax_attention_bwd_cuda(const SoftmaxAttentionParams& p);
#endif

}  // namespace sola
