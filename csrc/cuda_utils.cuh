// Shared by the CUDA kernels: warp reductions, lane-slot vectors and grid sizing.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>

namespace sola {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Row kernels give each row (query or key) to one warp; blocks hold kRowWarps warps.
constexpr int kRowWarps = 4;
constexpr int kRowThreads = kRowWarps * kWarpSize;

// Kernels loop grid-stride over their flattened work, so any B * H fits: grid.x is capped far
// below CUDA's 2^31 - 1 (any cap would do; this one is plenty to fill a GPU).
constexpr int64_t kMaxGridX = 65535;

// Blocks for `work` items at `per_block` items per block; at least 1, at most kMaxGridX, or at most
// SOLA_MAX_GRID when that environment variable is set (a test hook: with a small cap every block walks
// several work items of its grid-stride loop, as on a GPU grids past kMaxGridX blocks do).
inline unsigned grid_x(int64_t work, int64_t per_block) {
  int64_t cap = kMaxGridX;
  if (const char* s = std::getenv("SOLA_MAX_GRID")) cap = std::clamp<int64_t>(std::strtol(s, nullptr, 10), 1, kMaxGridX);
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

// Tensor-core kernels (mma.sync, ldmatrix, cp.async) need sm_80 or newer.
inline bool sm80_or_newer() { return at::cuda::getCurrentDeviceProperties()->major >= 8; }

// Lets kKernel take `bytes` of dynamic shared memory (past 48 KB that needs an opt-in); false,
// changing nothing, when the device has less. The attribute sticks to the kernel on each device,
// so it is raised only when a launch needs more than was set there (a cudaFuncSetAttribute per
// launch costs host time that small shapes notice); a kernel whose size depends on its inputs
// (the linear row kernels) keeps the largest size asked for.
template <auto kKernel>
bool allow_dynamic_smem(int bytes) {
  if (bytes > static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin)) return false;
  static std::atomic<int> set_to[64] = {};  // the size set on device d (devices past 63 set it every time)
  static std::mutex raising;                // a smaller size must not overwrite a larger one
  const int device = c10::cuda::current_device();
  if (device < 64 && set_to[device].load(std::memory_order_acquire) >= bytes) return true;
  std::lock_guard<std::mutex> lock(raising);
  if (device < 64 && set_to[device].load(std::memory_order_acquire) >= bytes) return true;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (device < 64) set_to[device].store(bytes, std::memory_order_release);
  return true;
}

// Blocks of kKernel (kThreads threads, kSmemBytes of dynamic shared memory) that one SM holds at
// once, at least 1. Asked once per device and cached: the query costs host time per launch.
template <auto kKernel, int kThreads, int kSmemBytes>
int resident_blocks_per_sm() {
  static std::atomic<int> cached[64] = {};  // 0: not asked yet (devices past 63 ask every time)
  const int device = c10::cuda::current_device();
  if (device < 64) {
    if (const int n = cached[device].load(std::memory_order_relaxed)) return n;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, kSmemBytes));
  n = std::max(n, 1);
  if (device < 64) cached[device].store(n, std::memory_order_relaxed);
  return n;
}

// This warp's first row and the row stride of a grid-stride loop; the same for all its lanes,
// so every lane takes the same path and the full-mask shuffles below are safe.
__device__ __forceinline__ int64_t warp_row0() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t warp_row_stride() {
  return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
}

// Butterfly sum: every lane ends with the same value, bitwise (a + b == b + a at each step).
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// The same over a team of `lanes` lanes (a power of two <= 32, teams aligned in the warp): every lane
// of the team ends with the team's sum. All lanes of the warp must call it.
template <typename T>
__device__ __forceinline__ T team_sum(T x, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// ---- ordered sums of per-block partials ----------------------------------------------------------
// Element i (< width) of a deterministic reduction = the sum of partials[k * width + i] over the count
// partials k, in order: one warp per element, lane l summing partials l, l + 32, ..., then a butterfly
// (a fixed order too), so the bits depend on the partials alone. slot(i) (a functor: lambdas would need
// --extended-lambda) says where element i goes; null: nowhere.
constexpr int kSumPartialsThreads = 256;

template <typename acc, typename Slot>
__global__ void __launch_bounds__(kSumPartialsThreads) sum_partials_kernel(const acc* partials, unsigned count,
                                                                           int64_t width, Slot slot) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t i = warp_row0(); i < width; i += warp_row_stride()) {
    acc s = acc(0);
#pragma unroll 4
    for (unsigned k = lane; k < count; k += kWarpSize) s += partials[k * width + i];
    s = warp_sum(s);
    acc* dst = slot(i);
    if (lane == 0 && dst) *dst = s;
  }
}

template <typename acc, typename Slot>
void sum_partials(const acc* partials, unsigned count, int64_t width, Slot slot, cudaStream_t stream) {
  sum_partials_kernel<acc, Slot><<<grid_x(width, kSumPartialsThreads / kWarpSize), kSumPartialsThreads, 0, stream>>>(
      partials, count, width, slot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- lane-slot vectors ------------------------------------------------------------------------
// A warp holds a vector x[0, n) as x[lane + 32 * t] in slot t of each lane; slots at or past n
// hold 0, so dot products over all slots need no mask.

template <typename acc, int kSlots, typename scalar_t>
__device__ __forceinline__ void load_slots(const scalar_t* x, int n, int lane, acc (&dst)[kSlots]) {
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    const int d = lane + kWarpSize * t;
    dst[t] = d < n ? static_cast<acc>(x[d]) : acc(0);
  }
}

// sum_d x[d] * y[d], the same in every lane.
template <typename acc, int kSlots>
__device__ __forceinline__ acc slot_dot(const acc (&x)[kSlots], const acc (&y)[kSlots]) {
  acc part = acc(0);
#pragma unroll
  for (int t = 0; t < kSlots; ++t) part += x[t] * y[t];
  return warp_sum(part);
}

}  // namespace sola
