// Non-causal linear attention: what the op layer hands to the CPU and CUDA kernels.
//   S = mean_j phi(k_j) v_j^T,  z = mean_j phi(kn_j),  out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps)
#pragma once

#include "common.h"

namespace sola {

struct LinearAttentionParams {
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, Dk = 0, Dv = 0;
  // Inputs, last dim contiguous, any other strides. qn/kn alias q/k when not given.
  View4 q, k, v, qn, kn;
  bool has_qn = false, has_kn = false;
  // Contiguous accumulator-typed (fp32, fp64 for fp64 inputs) state: S (B, H, Dk, Dv), z (B, H, Dk).
  void* state = nullptr;
  void* z = nullptr;
  // Forward output (contiguous).
  View4 out;
  // Backward: incoming gradient (strided like the inputs) and the gradients (contiguous).
  // When has_qn is false the normaliser's gradient lands in dq (same for kn and dk).
  View4 grad_out, dq, dk, dv, dqn, dkn;
  FeatureMap feature_map = FeatureMap::Elu;
  bool normalize = true;
  double eps = 1e-6;
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// Forward: writes state, z and out. Backward: reads state, z; writes dq, dk, dv (dqn, dkn).
void linear_attention_fwd_cpu(const LinearAttentionParams& p);
void linear_attention_bwd_cpu(const LinearAttentionParams& p);
#ifdef SOLA_WITH_CUDA
void linear_attention_fwd_cuda(const LinearAttentionParams& p);
void linear_attention_bwd_cuda(const LinearAttentionParams& p);
#endif

}  // namespace sola
