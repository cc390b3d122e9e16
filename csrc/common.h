// Shared by every op and backend: argument checks, strided views, dispatch switches, feature maps.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include "cpu_math.h"

#if defined(__CUDACC__)
#define SOLA_HD __host__ __device__ __forceinline__
// Device-only helpers (they use barriers); plain inline functions when emulated on the host.
#define SOLA_DEVICE __device__ __forceinline__
#else
#define SOLA_HD inline
#define SOLA_DEVICE inline
#endif

// A kernel's dynamic shared memory; with SOLA_HOST_EMULATION (scripts/cuda_emulator) the emulator's.
#if defined(SOLA_HOST_EMULATION)
#define SOLA_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()
#else
#define SOLA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Bad arguments raise ValueError naming the argument:
//   SOLA_CHECK(q.dim() == 4, "q must be (B, H, N, D), got ", q.sizes());
// The message is built by error_text (below), not by c10::str's ostringstream: on the H200 box
// (torch 2.11, GCC 13.3, 2026-12-04) a check whose message streamed a number crashed the process,
// while one streaming only text and a device raised cleanly (scripts/cxx_error_probe.py).
#define SOLA_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, ::sola::error_text(__VA_ARGS__))

// Largest head dim the CUDA kernels take (DESIGN.md: at least 256).
constexpr int64_t kMaxCudaHeadDim = 256;

namespace sola {

// ---- error messages without iostreams (SOLA_CHECK) ------------------------------------------------
namespace detail {
inline void append_text(std::string& s, const char* x) { s += x; }
inline void append_text(std::string& s, const std::string& x) { s += x; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline void append_text(std::string& s, T x) { s += std::to_string(x); }
inline void append_text(std::string& s, double x) {  // as an ostream prints it: %g
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  s += buf;
}
inline void append_text(std::string& s, c10::ArrayRef<int64_t> x) {  // [2, 3, 8], as torch prints sizes
  s += "[";
  for (size_t i = 0; i < x.size(); ++i) s += (i ? ", " : "") + std::to_string(x[i]);
  s += "]";
}
inline void append_text(std::string& s, const c10::Device& d) { s += d.str(); }
inline void append_text(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
}  // namespace detail

template <typename... Args>
std::string error_text(const Args&... args) {
  std::string s;
  (detail::append_text(s, args), ...);
  return s;
}

// fp16 / bf16: the dtypes the tensor-core kernels take.
template <typename T>
constexpr bool kIsHalfType = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// fp32 accumulation for fp16/bf16/fp32, fp64 for fp64.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// acc_t as a run-time dtype: the state, z, lse and angle tables are fp32, fp64 for fp64 inputs.
inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType acc_dtype(const at::Tensor& t) { return acc_dtype(t.scalar_type()); }

// A (B, H, N, D) tensor whose last dim is contiguous; the other strides are free, so
// x.view(B, N, H, D).transpose(1, 2) is read in place. 64-bit offsets throughout.
struct View4 {
  void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;

  template <typename T>
  SOLA_HD T* row(int64_t b, int64_t h, int64_t n) const {
    return static_cast<T*>(ptr) + b * sb + h * sh + n * sn;
  }
};

// N elements of T loaded or stored as one aligned vector.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements of scalar_t per 16-byte load: 8 fp16/bf16, 4 fp32, 2 fp64.
template <typename scalar_t>
constexpr int kVec16 = static_cast<int>(16 / sizeof(scalar_t));

SOLA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when every row of x starts on a multiple of `elems` elements' bytes, so vector
// accesses at column multiples of `elems` are aligned. Strides are free (View4), so this is
// decided at run time; misaligned views take the element-wise path.
template <typename scalar_t>
SOLA_HD bool rows_aligned(const View4& x, int elems) {
  const auto bytes = static_cast<uintptr_t>(elems) * sizeof(scalar_t);
  return reinterpret_cast<uintptr_t>(x.ptr) % bytes == 0 && x.sb % elems == 0 && x.sh % elems == 0 &&
         x.sn % elems == 0;
}

// Returns t when its last dim is contiguous, else a contiguous copy (other layouts are copied).
// Empty tensors count as contiguous to torch whatever their strides, so they are re-allocated.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  if (t.numel() == 0) return at::empty(t.sizes(), t.options());
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline View4 make_view(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 4 && (t.numel() == 0 || t.size(3) <= 1 || t.stride(3) == 1));
  return View4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// Outputs come from here so a debug mode can fill them with NaN and prove every element is written.
bool debug_nan_fill();
void set_debug_nan_fill(bool on);
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// A parameter tensor (weight, bias) of an op on x: floating (any float dtype), on x's device, dense.
void check_param(const at::Tensor& t, const char* name, const at::Tensor& x);

// A CPU-only build given a tensor on another device (CUDA): an error naming the argument.
void check_cpu_build(const at::Tensor& t, const char* name);

// Runs kernel_cuda(p) for a CUDA tensor t, else kernel_cpu(p): every op's backend dispatch.
#ifdef SOLA_WITH_CUDA
#define SOLA_RUN_KERNEL(t, name, kernel, p) ((t).is_cuda() ? kernel##_cuda(p) : kernel##_cpu(p))
#else
#define SOLA_RUN_KERNEL(t, name, kernel, p) (::sola::check_cpu_build(t, name), kernel##_cpu(p))
#endif

// Every tensor argument of an op: rank 4, floating, same device and dtype as q.
// like_name: what the messages call q ("x" for rope's gradients).
void check_attention_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, const char* like_name = "q");
// q, k, v agree on B, H, Dk and N as SDPA layout requires; Nk >= 1.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
// CUDA kernels take head dims up to kMaxCudaHeadDim.
void check_cuda_head_dims(const at::Tensor& q, const at::Tensor& v);
// value (linear attention's eps, softmax's scale) within half fp32's range unless q is fp64: the kernels
// compute in fp32, where past it they meet inf (the tensor-core softmax takes scale * log2(e)).
void check_fits_float32(double value, const char* name, const at::Tensor& q);

// ---- feature maps of linear attention, phi(x) and phi'(x) -----------------------------------
enum class FeatureMap : int { Elu = 0, Relu = 1, Identity = 2 };

FeatureMap parse_feature_map(const std::string& name);

template <FeatureMap FM>
struct Phi;

// exp in the kernels: the device's exp on CUDA; on the host cpu_exp, which vectorises. kNaNSelect = false drops
// cpu_exp's NaN select on the host (a NaN still comes out NaN, through the polynomial): before 1 / (1 + exp(x)),
// GCC sank that select's arms into the division and divided twice per vector (dwconv's SiLU).
template <bool kNaNSelect = true, typename T>
SOLA_HD T kernel_exp(T x) {
#ifdef __CUDA_ARCH__
  return std::exp(x);
#else
  return cpu_exp_impl<false, T, kNaNSelect>(x);
#endif
}

#ifdef __CUDA_ARCH__
// 2^x as one MUFU.EX2 (ex2.approx.ftz: ~2 ulp; results below 2^-126 flush to 0). exp2f would add
// a subnormal-result fix-up (a compare and two multiplies).
__device__ __forceinline__ float ex2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}
#endif

// exp of an fp32 value whose result is rounded to tf32 (2^-11) or 16 bits next, as phi in the
// tensor-core kernels: on the GPU one multiply and ex2_approx (relative error ~2^-21 for x in
// [-20, 0]) in place of expf's ~10 instructions, which also made the compiler branch around
// every element's exp.
template <typename T>
SOLA_HD T kernel_exp_fast(T x) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) {
    return ex2_approx(x * 1.4426950408889634f);
  } else {
    return std::exp(x);
  }
#else
  return cpu_exp(x);
#endif
}

// kFast: kernel_exp_fast (tensor-core kernels) rather than kernel_exp.
template <>
struct Phi<FeatureMap::Elu> {  // elu(x) + 1
  template <bool kFast = false, typename T>
  static SOLA_HD T f(T x) { return positive_or_exp<kFast>(x, x + T(1)); }
  template <bool kFast = false, typename T>
  static SOLA_HD T df(T x) { return positive_or_exp<kFast>(x, T(1)); }

 private:
  // x > 0 ? if_positive : exp(x). On the host exp is computed for every x: a select of two values lets
  // the CPU loops vectorise, where a branch around exp kept them scalar. Its argument is min(x, 0)
  // (NaN kept), so the exp without the overflow side serves.
  template <bool kFast, typename T>
  static SOLA_HD T positive_or_exp(T x, T if_positive) {
#ifdef __CUDA_ARCH__
    return x > T(0) ? if_positive : kFast ? kernel_exp_fast(x) : kernel_exp(x);
#else
    const T e = cpu_exp_nonpositive(x > T(0) ? T(0) : x);
    return x > T(0) ? if_positive : e;
#endif
  }
};

template <>
struct Phi<FeatureMap::Relu> {
  template <typename T>
  static SOLA_HD T f(T x) { return x > T(0) || x != x ? x : T(0); }  // NaN stays NaN, as torch.relu
  template <typename T>
  static SOLA_HD T df(T x) { return x > T(0) || x != x ? T(1) : T(0); }  // NaN passes grad, as torch
};

template <>
struct Phi<FeatureMap::Identity> {
  template <typename T>
  static SOLA_HD T f(T x) { return x; }
  template <typename T>
  static SOLA_HD T df(T) { return T(1); }
};

// grad * phi'(x) given dphi = phi'(x): exactly 0 where phi is flat (relu at x <= 0) even for a NaN
// or inf grad, as torch's relu backward; one NaN input of a head reaches every row's grad (through
// the state), and a product would spread it to inputs that take no part.
template <typename T>
SOLA_HD T through_phi(T grad, T dphi) {
  return dphi == T(0) ? T(0) : grad * dphi;
}

}  // namespace sola

// ---- static switches (flash-attention's static_switch.h style) -------------------------------

// Runs the lambda-like body with `constexpr auto kName` bound to value: case A, case B, or Other
// for anything else (the three-way enums: feature maps, dwconv epilogues).
#define SOLA_SWITCH3(value, kName, A, B, Other, ...) \
  [&] {                                              \
    switch (value) {                                 \
      case A: {                                      \
        constexpr auto kName = A;                    \
        return __VA_ARGS__();                        \
      }                                              \
      case B: {                                      \
        constexpr auto kName = B;                    \
        return __VA_ARGS__();                        \
      }                                              \
      default: {                                     \
        constexpr auto kName = Other;                \
        return __VA_ARGS__();                        \
      }                                              \
    }                                                \
  }()

// Runs the lambda-like body with `constexpr FeatureMap kFM` bound to fm.
#define SOLA_FEATURE_MAP_SWITCH(fm, kFM, ...) \
  SOLA_SWITCH3(fm, kFM, ::sola::FeatureMap::Elu, ::sola::FeatureMap::Relu, ::sola::FeatureMap::Identity, __VA_ARGS__)

// Binds `constexpr int kHeadDim` to the smallest bucket (32, 64, 128, 256) holding d.
#define SOLA_HEADDIM_SWITCH(d, kHeadDim, ...)          \
  [&] {                                                \
    if ((d) <= 32) {                                   \
      constexpr int kHeadDim = 32;                     \
      return __VA_ARGS__();                            \
    } else if ((d) <= 64) {                            \
      constexpr int kHeadDim = 64;                     \
      return __VA_ARGS__();                            \
    } else if ((d) <= 128) {                           \
      constexpr int kHeadDim = 128;                    \
      return __VA_ARGS__();                            \
    } else {                                           \
      constexpr int kHeadDim = 256;                    \
      return __VA_ARGS__();                            \
    }                                                  \
  }()

// fp16, bf16, fp32, fp64 -> `scalar_t`.
#define SOLA_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, dtype, name, __VA_ARGS__)
