// CUDA kernels of LayerNorm (layer_norm.h). Memory-bound: each row is read once and written once in
// its own dtype. A team of tpr threads (a power of two up to 32, so a team sits inside a warp and
// reduces by shuffles) takes a row, each thread a vector of kV elements (16 bytes) at a time, adjacent
// threads adjacent vectors: a team reads contiguous bytes. Rows of up to kLnCache * 32 elements (512;
// every SoLA-Vision width) stay in registers between the statistics and the write; longer ones are
// read again per pass. The weight and bias gradients are summed in a fixed order (deterministic): in
// registers per thread over the rows its team takes, then over the block's teams in order into one
// partial per block, then over the partials in order; rows past the register cache take a column
// kernel for them instead. C not a multiple of the vector, or any of x, out, grad and the backward's
// addend off a 16-byte boundary, take the scalar kernels.
#include "cuda_utils.cuh"
#include "layer_norm/layer_norm.h"
#include "vec_acc.cuh"

namespace sola {
namespace {

constexpr int kLnThreads = 256;
// Elements of a row each thread keeps in registers (kLnCache / kV vectors): 512-wide rows at 32
// threads a row. The backward's weight and bias sums take twice as many registers again.
constexpr int kLnCache = 16;
// The backward's blocks at most: one partial each, so a count set by the shape (and whether the rows
// are 16-byte aligned: the vector and scalar kernels split rows differently), not by the GPU; it sets
// the sums' order. About 4 waves of an H100 / H200 at 2 blocks per SM.
constexpr unsigned kLnBwdBlocks = 1024;
// The column kernel's rows per partial, at least (rows past the register cache).
constexpr int64_t kLnColumnRows = 64;

template <typename scalar_t>
constexpr int kLnVec = kVec16<scalar_t>;

// weight[c] (1 when absent) and bias[c] (0).
template <typename acc>
__device__ __forceinline__ acc weight_at(const LayerNormParams& p, int64_t c) {
  return p.weight ? static_cast<const acc*>(p.weight)[c] : acc(1);
}
template <typename acc>
__device__ __forceinline__ acc bias_at(const LayerNormParams& p, int64_t c) {
  return p.bias ? static_cast<const acc*>(p.bias)[c] : acc(0);
}

// Where a thread sits: its team (row in the block's group of rows) and lane in the team.
struct Team {
  int tpr, index, lane, per_block;
  __device__ explicit Team(int threads_per_row)
      : tpr(threads_per_row), index(threadIdx.x / threads_per_row), lane(threadIdx.x % threads_per_row),
        per_block(kLnThreads / threads_per_row) {}
};

// The forward. kChunks: the vectors per thread a row has at most, kept in registers; 0: any row
// length, read three times (sum, squared deviations, output).
template <typename scalar_t, int kV, int kChunks>
__global__ void __launch_bounds__(kLnThreads) ln_fwd_kernel(const LayerNormParams p, int tpr) {
  using acc = acc_t<scalar_t>;
  const Team t(tpr);
  const int64_t nv = p.C / kV;
  // The loop's bounds are the same for the whole block, so every lane reaches every shuffle.
  for (int64_t r0 = int64_t(blockIdx.x) * t.per_block; r0 < p.rows; r0 += int64_t(gridDim.x) * t.per_block) {
    const int64_t r = r0 + t.index;
    const bool live = r < p.rows;
    const scalar_t* x = static_cast<const scalar_t*>(p.x) + (live ? r : 0) * p.C;
    scalar_t* out = static_cast<scalar_t*>(p.out) + (live ? r : 0) * p.C;
    acc v[kChunks > 0 ? kChunks : 1][kV];
    // The sum of x - x[0]: a shift, so a large mean costs no accuracy.
    const acc shift = live ? static_cast<acc>(x[0]) : acc(0);
    acc s = acc(0);
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int64_t j = t.lane + int64_t(t.tpr) * i;
        if (live && j < nv) {
          load_acc<kV>(x + j * kV, v[i]);
#pragma unroll
          for (int e = 0; e < kV; ++e) s += v[i][e] - shift;
        }
      }
    } else {
      for (int64_t j = t.lane; live && j < nv; j += t.tpr) {
        load_acc<kV>(x + j * kV, v[0]);
        for (int e = 0; e < kV; ++e) s += v[0][e] - shift;
      }
    }
    const acc mean = shift + team_sum(s, t.tpr) / acc(p.C);
    acc q = acc(0);
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        if (!live || t.lane + int64_t(t.tpr) * i >= nv) continue;  // padding, not row elements
#pragma unroll
        for (int e = 0; e < kV; ++e) q += (v[i][e] - mean) * (v[i][e] - mean);
      }
    } else {
      for (int64_t j = t.lane; live && j < nv; j += t.tpr) {
        load_acc<kV>(x + j * kV, v[0]);
        for (int e = 0; e < kV; ++e) q += (v[0][e] - mean) * (v[0][e] - mean);
      }
    }
    const acc rstd = row_rstd(team_sum(q, t.tpr), p.C, p.eps);
    if (!live) continue;  // no shuffles below
    if (t.lane == 0) static_cast<acc*>(p.mean)[r] = mean, static_cast<acc*>(p.rstd)[r] = rstd;
    auto emit = [&](int64_t j, acc(&y)[kV]) {
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        const int64_t c = j * kV + e;
        y[e] = (y[e] - mean) * rstd * weight_at<acc>(p, c) + bias_at<acc>(p, c);
      }
      store_acc<kV>(y, out + j * kV);
    };
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int64_t j = t.lane + int64_t(t.tpr) * i;
        if (j < nv) emit(j, v[i]);
      }
    } else {
      for (int64_t j = t.lane; j < nv; j += t.tpr) {
        load_acc<kV>(x + j * kV, v[0]);
        emit(j, v[0]);
      }
    }
  }
}

// The input gradient, and with kChunks > 0 the weight and bias gradients' partial of this block
// (partials (gridDim.x, 2, C)): each thread sums grad * xhat and grad over its team's rows for the
// columns it owns, then the block sums its teams in order.
template <typename scalar_t, int kV, int kChunks>
__global__ void __launch_bounds__(kLnThreads) ln_bwd_kernel(const LayerNormParams p, int tpr, acc_t<scalar_t>* partials) {
  using acc = acc_t<scalar_t>;
  const Team t(tpr);
  const int64_t nv = p.C / kV;
  constexpr int kSlots = kChunks > 0 ? kChunks : 1;
  acc dw[kSlots][kV], db[kSlots][kV];  // used with kChunks > 0 only
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
#pragma unroll
    for (int e = 0; e < kV; ++e) dw[i][e] = db[i][e] = acc(0);
  for (int64_t r0 = int64_t(blockIdx.x) * t.per_block; r0 < p.rows; r0 += int64_t(gridDim.x) * t.per_block) {
    const int64_t r = r0 + t.index;
    const bool live = r < p.rows;
    const int64_t off = (live ? r : 0) * p.C;
    const scalar_t* x = static_cast<const scalar_t*>(p.x) + off;
    const scalar_t* grad = static_cast<const scalar_t*>(p.grad) + off;
    const acc mean = live ? static_cast<const acc*>(p.mean)[r] : acc(0);
    const acc rstd = live ? static_cast<const acc*>(p.rstd)[r] : acc(0);
    // xhat and grad of vector j, kept in registers with kChunks > 0.
    acc xh[kSlots][kV], dy[kSlots][kV];
    acc sum_g = acc(0), sum_gx = acc(0);
    auto load = [&](int64_t j, acc(&xv)[kV], acc(&gv)[kV]) {
      load_acc<kV>(x + j * kV, xv);
      load_acc<kV>(grad + j * kV, gv);
#pragma unroll
      for (int e = 0; e < kV; ++e) xv[e] = (xv[e] - mean) * rstd;
    };
    auto add_sums = [&](int64_t j, const acc(&xv)[kV], const acc(&gv)[kV]) {
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        const acc g = gv[e] * weight_at<acc>(p, j * kV + e);
        sum_g += g;
        sum_gx += g * xv[e];
      }
    };
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int64_t j = t.lane + int64_t(t.tpr) * i;
        if (live && j < nv) {
          load(j, xh[i], dy[i]);
          add_sums(j, xh[i], dy[i]);
        } else {
          for (int e = 0; e < kV; ++e) xh[i][e] = dy[i][e] = acc(0);
        }
      }
    } else {
      for (int64_t j = t.lane; live && j < nv; j += t.tpr) {
        load(j, xh[0], dy[0]);
        add_sums(j, xh[0], dy[0]);
      }
    }
    const acc mean_g = team_sum(sum_g, t.tpr) / acc(p.C), mean_gx = team_sum(sum_gx, t.tpr) / acc(p.C);
    if (!live) continue;  // no shuffles below
    scalar_t* dx = static_cast<scalar_t*>(p.out) + off;
    const scalar_t* addend = p.addend ? static_cast<const scalar_t*>(p.addend) + off : nullptr;
    auto emit = [&](int64_t j, const acc(&xv)[kV], const acc(&gv)[kV]) {
      acc out[kV];
#pragma unroll
      for (int e = 0; e < kV; ++e)
        out[e] = rstd * (gv[e] * weight_at<acc>(p, j * kV + e) - mean_g - xv[e] * mean_gx);
      if (addend) {
        acc add[kV];
        load_acc<kV>(addend + j * kV, add);
#pragma unroll
        for (int e = 0; e < kV; ++e) out[e] += add[e];
      }
      store_acc<kV>(out, dx + j * kV);
    };
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int64_t j = t.lane + int64_t(t.tpr) * i;
        if (j >= nv) continue;
#pragma unroll
        for (int e = 0; e < kV; ++e) {
          dw[i][e] += dy[i][e] * xh[i][e];
          db[i][e] += dy[i][e];
        }
        emit(j, xh[i], dy[i]);
      }
    } else {
      for (int64_t j = t.lane; j < nv; j += t.tpr) {
        load(j, xh[0], dy[0]);
        emit(j, xh[0], dy[0]);
      }
    }
  }
  if constexpr (kChunks > 0) {
    if (!partials) return;  // the whole block agrees: no barrier is skipped by part of it
    // Column c's sums over the block's teams, in team order, one pass for dw, one for db. Rows padded
    // by one element: a 16-element stride would put a warp's writes in a few banks.
    __shared__ acc red[kLnThreads][kSlots * kV + 1];
    acc* part = partials + int64_t(blockIdx.x) * 2 * p.C;
    for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
      for (int i = 0; i < kSlots; ++i)
#pragma unroll
        for (int e = 0; e < kV; ++e) red[threadIdx.x][i * kV + e] = pass == 0 ? dw[i][e] : db[i][e];
      __syncthreads();
      for (int64_t c = threadIdx.x; c < p.C; c += kLnThreads) {
        const int64_t j = c / kV;
        const int lane = static_cast<int>(j % t.tpr), slot = static_cast<int>(j / t.tpr) * kV + static_cast<int>(c % kV);
        acc s = acc(0);
        for (int team = 0; team < t.per_block; ++team) s += red[team * t.tpr + lane][slot];
        part[pass * p.C + c] = s;
      }
      __syncthreads();
    }
  }
}

// The weight and bias gradients' partials for rows past the register cache: thread column c of
// partial blockIdx.y sums grad * xhat and grad over rows blockIdx.y * step .. + step, in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kLnThreads) ln_column_kernel(const LayerNormParams p, int64_t step,
                                                               acc_t<scalar_t>* partials) {
  using acc = acc_t<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * kLnThreads + threadIdx.x;
  if (c >= p.C) return;
  const int64_t r1 = std::min<int64_t>(p.rows, (int64_t(blockIdx.y) + 1) * step);
  acc dw = acc(0), db = acc(0);
  for (int64_t r = int64_t(blockIdx.y) * step; r < r1; ++r) {
    const acc g = static_cast<acc>(static_cast<const scalar_t*>(p.grad)[r * p.C + c]);
    const acc x = static_cast<acc>(static_cast<const scalar_t*>(p.x)[r * p.C + c]);
    dw += g * ((x - static_cast<const acc*>(p.mean)[r]) * static_cast<const acc*>(p.rstd)[r]);
    db += g;
  }
  acc* part = partials + int64_t(blockIdx.y) * 2 * p.C;
  part[c] = dw, part[p.C + c] = db;
}

// Where element i of the partials' (2, C) sums goes: dweight[i], then dbias[i - C] (sum_partials' slot).
template <typename acc>
struct ParamGradSlot {
  acc* dweight;
  acc* dbias;
  int64_t C;
  __device__ acc* operator()(int64_t i) const {
    acc* dst = i < C ? dweight : dbias;
    return dst ? dst + i % C : nullptr;
  }
};

// How the kernels split a row: the vector width (kV or 1), threads per row, register chunks needed.
struct RowSplit {
  bool vec;
  int tpr;
  bool cached;
};

template <typename scalar_t>
RowSplit row_split(const LayerNormParams& p) {
  constexpr int kV = kLnVec<scalar_t>;
  RowSplit s;
  const auto aligned = [&](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % (kV * sizeof(scalar_t)) == 0; };
  s.vec = p.C % kV == 0 && aligned(p.x) && aligned(p.out) && (!p.grad || aligned(p.grad)) &&
          (!p.addend || aligned(p.addend));
  const int64_t nv = s.vec ? p.C / kV : p.C;
  s.tpr = 1;
  while (s.tpr < kWarpSize && s.tpr < nv) s.tpr *= 2;
  s.cached = nv <= int64_t(s.tpr) * (kLnCache / (s.vec ? kV : 1));
  if (!s.cached) s.tpr = kWarpSize;
  return s;
}

// Runs body with `constexpr int kVec` (the vector width) and `constexpr int kChunks` (0: not cached).
#define SOLA_LN_SWITCH(split, scalar_t, kVec, kChunks, ...)                          \
  [&] {                                                                             \
    if ((split).vec) {                                                              \
      constexpr int kVec = kLnVec<scalar_t>;                                        \
      if ((split).cached) {                                                         \
        constexpr int kChunks = kLnCache / kVec;                                    \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      constexpr int kChunks = 0;                                                    \
      return __VA_ARGS__();                                                         \
    }                                                                               \
    constexpr int kVec = 1;                                                         \
    if ((split).cached) {                                                           \
      constexpr int kChunks = kLnCache;                                             \
      return __VA_ARGS__();                                                         \
    }                                                                               \
    constexpr int kChunks = 0;                                                      \
    return __VA_ARGS__();                                                           \
  }()

}  // namespace

void layer_norm_fwd_cuda(const LayerNormParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "layer_norm_fwd_cuda", [&] {
    const RowSplit s = row_split<scalar_t>(p);
    const unsigned grid = grid_x(p.rows, kLnThreads / s.tpr);
    SOLA_LN_SWITCH(s, scalar_t, kVec, kChunks, [&] {
      ln_fwd_kernel<scalar_t, kVec, kChunks><<<grid, kLnThreads, 0, stream>>>(p, s.tpr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void layer_norm_bwd_cuda(const LayerNormParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "layer_norm_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const RowSplit s = row_split<scalar_t>(p);
    const bool params = p.dweight || p.dbias;
    const unsigned grid = std::min(grid_x(p.rows, kLnThreads / s.tpr), kLnBwdBlocks);
    // Column-kernel partials (rows past the register cache): a count set by the shape alone.
    const int64_t step = std::max<int64_t>(kLnColumnRows, ceil_div(p.rows, kLnBwdBlocks));
    const unsigned count = !params ? 0 : s.cached ? grid : static_cast<unsigned>(ceil_div(p.rows, step));
    // Partials on the current stream: the caching allocator keeps them until the kernels are done.
    at::Tensor partials;
    if (params)
      partials = at::empty({int64_t(count) * 2 * p.C},
                           at::TensorOptions().dtype(acc_dtype(p.dtype)).device(at::Device(at::kCUDA, p.device_index)));
    acc* part = params ? partials.data_ptr<acc>() : nullptr;
    SOLA_LN_SWITCH(s, scalar_t, kVec, kChunks, [&] {
      ln_bwd_kernel<scalar_t, kVec, kChunks><<<grid, kLnThreads, 0, stream>>>(p, s.tpr, kChunks > 0 ? part : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (!params) return;
    if (!s.cached) {
      const dim3 columns(static_cast<unsigned>(ceil_div(p.C, kLnThreads)), count);
      ln_column_kernel<scalar_t><<<columns, kLnThreads, 0, stream>>>(p, step, part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sum_partials(part, count, 2 * p.C,
                 ParamGradSlot<acc>{static_cast<acc*>(p.dweight), static_cast<acc*>(p.dbias), p.C}, stream);
  });
}

}  // namespace sola
