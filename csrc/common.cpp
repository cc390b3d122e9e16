// Argument checks and the NaN-fill debug mode shared by every op.
#include "common.h"

#include <atomic>
#include <cstdlib>
#include <limits>

namespace sola {

static std::atomic<bool>& nan_fill_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("SOLA_DEBUG_NAN_FILL");
    return env != nullptr && std::string(env) != "" && std::string(env) != "0";
  }()};
  return flag;
}

bool debug_nan_fill() { return nan_fill_flag().load(); }
void set_debug_nan_fill(bool on) { nan_fill_flag().store(on); }

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (debug_nan_fill()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x) {
  SOLA_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
  SOLA_CHECK(t.device() == x.device(), name, " must be on the device of x (", x.device(), "), got ", t.device());
  SOLA_CHECK(t.layout() == at::kStrided, name, " must be a dense (strided) tensor");
}

void check_cpu_build(const at::Tensor& t, const char* name) {
  SOLA_CHECK(t.is_cpu(), name, " is on ", t.device(), " but sola_ops was built without CUDA kernels");
}

void check_attention_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, const char* like_name) {
  SOLA_CHECK(t.dim() == 4, name, " must be 4-D (B, H, N, D), got shape ", t.sizes());
  const auto st = t.scalar_type();
  SOLA_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
             name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  SOLA_CHECK(t.scalar_type() == q.scalar_type(),
             name, " must have the dtype of ", like_name, " (", q.scalar_type(), "), got ", t.scalar_type());
  SOLA_CHECK(t.device() == q.device(), name, " must be on the device of ", like_name, " (", q.device(), "), got ",
             t.device());
  SOLA_CHECK(t.layout() == at::kStrided, name, " must be a dense (strided) tensor");
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  SOLA_CHECK(q.dim() == 4, "q must be 4-D (B, H, Nq, Dk), got shape ", q.sizes());
  SOLA_CHECK(q.device().is_cpu() || q.device().is_cuda(), "q must be on a CPU or CUDA device, got ", q.device());
  check_attention_tensor(q, "q", q);
  check_attention_tensor(k, "k", q);
  check_attention_tensor(v, "v", q);
  SOLA_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1),
             "k must have the batch and heads of q ", q.sizes(), ", got ", k.sizes());
  SOLA_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1),
             "v must have the batch and heads of q ", q.sizes(), ", got ", v.sizes());
  SOLA_CHECK(k.size(3) == q.size(3), "k must have the head dim of q (", q.size(3), "), got ", k.size(3));
  SOLA_CHECK(v.size(2) == k.size(2), "v must have the sequence length of k (", k.size(2), "), got ", v.size(2));
  SOLA_CHECK(k.size(2) >= 1, "k must have at least one key (Nk >= 1), got shape ", k.sizes());
  SOLA_CHECK(q.size(3) >= 1 && v.size(3) >= 1, "q and v need head dims >= 1, got ", q.size(3), " and ", v.size(3));
}

void check_cuda_head_dims(const at::Tensor& q, const at::Tensor& v) {
  if (!q.is_cuda()) return;
  SOLA_CHECK(q.size(3) <= kMaxCudaHeadDim, "q head dim ", q.size(3),
             " exceeds the CUDA kernels' maximum of ", kMaxCudaHeadDim);
  SOLA_CHECK(v.size(3) <= kMaxCudaHeadDim, "v head dim ", v.size(3),
             " exceeds the CUDA kernels' maximum of ", kMaxCudaHeadDim);
}

void check_fits_float32(double value, const char* name, const at::Tensor& q) {
  SOLA_CHECK(q.scalar_type() == at::kDouble || std::abs(value) <= std::numeric_limits<float>::max() / 2, name,
             " must be at most 1.7e38 in magnitude for ", q.scalar_type(),
             " inputs (the kernels compute in float32), got ", value);
}

FeatureMap parse_feature_map(const std::string& name) {
  if (name == "elu") return FeatureMap::Elu;
  if (name == "relu") return FeatureMap::Relu;
  if (name == "identity") return FeatureMap::Identity;
  SOLA_CHECK(false, "feature_map must be 'elu', 'relu' or 'identity', got '", name, "'");
  return FeatureMap::Elu;
}

}  // namespace sola
