// Non-causal linear attention: what the op layer hands to the CPU and CUDA kernels.
//   S = mean_j phi(k_j) v_j^T,  z = mean_j phi(kn_j),  out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps)
// With RoPE fused (rope_cos set): phi(q_i), phi(k_j) in the numerator are rotated by row i's / j's
// angles (rope.h), the normaliser takes them unrotated (qn = q, kn = k).
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
  // Fused RoPE: acc-typed angle tables (N, Dk / 2), N = Nq = Nk, contiguous; null without. The CPU
  // kernels and the CUDA tensor-core ones take them (linear_attention_rope_fused_cuda); for the other
  // CUDA kernels the op layer runs the rope kernels and passes the rotated and unrotated inputs as
  // q, k and qn, kn.
  const void* rope_cos = nullptr;
  const void* rope_sin = nullptr;
  bool normalize = true;
  double eps = 1e-6;
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// out = num / d computed as (s num) * inv with one reciprocal per row, inv = 1 / (s d): s = 2^64 where
// |d| < 2^-64, else 1. 1 / d alone overflows for a subnormal fp32 d (eps = 0 and tiny features),
// which turned a finite num / d into inf or NaN; s is a power of 2, so it changes no other rounding.
template <typename acc>
struct RowDivisor {
  acc s, inv;
  SOLA_HD explicit RowDivisor(acc d)
      : s(d < acc(0x1p-64) && d > -acc(0x1p-64) ? acc(0x1p64) : acc(1)), inv(acc(1) / (s * d)) {}
  SOLA_HD acc divide(acc num) const { return num * s * inv; }
};

// Forward: writes state, z and out. Backward: reads state, z; writes dq, dk, dv (dqn, dkn).
void linear_attention_fwd_cpu(const LinearAttentionParams& p);
void linear_attention_bwd_cpu(const LinearAttentionParams& p);
#ifdef SOLA_WITH_CUDA
void linear_attention_fwd_cuda(const LinearAttentionParams& p);
void linear_attention_bwd_cuda(const LinearAttentionParams& p);
// Whether the CUDA kernels take p's RoPE tables themselves: fp16 / bf16 on sm_80+ with a state of
// at most 128 x 128 (the tensor-core kernels, their shared memory available on this device).
bool linear_attention_rope_fused_cuda(const LinearAttentionParams& p);
#endif

}  // namespace sola
