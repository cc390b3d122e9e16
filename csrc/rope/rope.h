// Feature map + rotary position embedding of (B, H, N, D) rows, fused into one pass (the token
// mixers of SoLA-Vision rotate phi(q), phi(k) by 2-D RoPE and also need them unrotated):
//   f = phi(x),  rot[2p] = f[2p] cos[n][p] - f[2p+1] sin[n][p],  rot[2p+1] = f[2p] sin[n][p] + f[2p+1] cos[n][p]
// What the op layer hands to the CPU and CUDA kernels, and the per-pair math both share.
#pragma once

#include "common.h"

namespace sola {

struct RopeParams {
  int64_t B = 0, H = 0, N = 0, D = 0;  // D even
  // cos, sin: (N, D / 2) contiguous, accumulator-typed (fp32, fp64 for fp64 inputs).
  const void* cos = nullptr;
  const void* sin = nullptr;
  FeatureMap feature_map = FeatureMap::Identity;
  // Forward: x (last dim contiguous, any other strides) -> rot and, when feat.ptr is set, feat
  // (both contiguous).
  View4 x, rot, feat;
  // Backward: grad_rot, grad_feat (grad_feat.ptr null when absent; strided like x) -> dx (contiguous).
  View4 grad_rot, grad_feat, dx;
  at::ScalarType dtype = at::ScalarType::Float;
  c10::DeviceIndex device_index = -1;
};

// The ops (checks, outputs, the backend's kernels); linear_attention's RoPE calls them where its
// own kernels do not take the tables.
std::tuple<at::Tensor, at::Tensor> rope_fwd(at::Tensor x, at::Tensor cos, at::Tensor sin, std::string feature_map,
                                            bool with_features);
at::Tensor rope_bwd(at::Tensor grad_rot, c10::optional<at::Tensor> grad_feat, at::Tensor x, at::Tensor cos,
                    at::Tensor sin, std::string feature_map);
// A (N, D / 2) angle table for x (B, H, N, D), checked (errors name it `name`), as the kernels read
// it: accumulator-typed and contiguous (a copy only when it is not already).
at::Tensor rope_angle_table(const at::Tensor& t, const char* name, const at::Tensor& x, const char* like_name = "x");

void rope_fwd_cpu(const RopeParams& p);
void rope_bwd_cpu(const RopeParams& p);
#ifdef SOLA_WITH_CUDA
void rope_fwd_cuda(const RopeParams& p);
void rope_bwd_cuda(const RopeParams& p);
#endif

// Whether the angle tables (cos, sin: rows of `half` acc values) can be read as vectors of `pairs`
// values at pair offsets that are multiples of `pairs`: every row starts a whole vector and both
// tables start on a vector boundary.
template <typename acc>
SOLA_HD bool rope_tables_aligned(const void* cos, const void* sin, int64_t half, int pairs) {
  const auto bytes = static_cast<uintptr_t>(pairs) * sizeof(acc);
  return half % pairs == 0 && reinterpret_cast<uintptr_t>(cos) % bytes == 0 && reinterpret_cast<uintptr_t>(sin) % bytes == 0;
}

// Row r of the flattened (B, H, N) rows: its batch, head and token (the angle tables' row).
struct RopeRow {
  int64_t b, h, n;
};

SOLA_HD RopeRow rope_row(const RopeParams& p, int64_t r) { return {r / p.N / p.H, r / p.N % p.H, r % p.N}; }

// One channel pair (f0, f1) = (phi(x0), phi(x1)) rotated by the angle whose cosine is c, sine s.
template <typename acc>
SOLA_HD void rotate_pair(acc f0, acc f1, acc c, acc s, acc& r0, acc& r1) {
  r0 = f0 * c - f1 * s;
  r1 = f0 * s + f1 * c;
}

// A row of d (even) features f rotated pair by pair into rot by the angles whose cosines are c, sines s.
template <typename acc>
SOLA_HD void rotate_row(const acc* f, const acc* c, const acc* s, int64_t d, acc* rot) {
  for (int64_t i = 0; i < d / 2; ++i) rotate_pair(f[2 * i], f[2 * i + 1], c[i], s[i], rot[2 * i], rot[2 * i + 1]);
}

// The gradient of phi(x) for one pair: the rotation transposed applied to (g0, g1), plus the
// features' own gradient (h0, h1; 0 when they had none).
template <typename acc>
SOLA_HD void unrotate_pair(acc g0, acc g1, acc h0, acc h1, acc c, acc s, acc& d0, acc& d1) {
  d0 = g0 * c + g1 * s + h0;
  d1 = g1 * c - g0 * s + h1;
}

}  // namespace sola
