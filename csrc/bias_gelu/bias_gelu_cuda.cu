// CUDA kernels of bias_gelu (bias_gelu.h). Memory-bound; fp32 math (fp64 for fp64), 16-byte vector
// loads and stores when every row start is 16-byte aligned and C a multiple of the vector (kV elements),
// else the same kernels on elements (kV = 1). Indices are 64-bit; grids are capped (grid_x) and walked.
//
// Forward: silu_mul's grid-stride loop over (row, vector) items; the bias vector comes from the cache.
// Backward: a 2-D split so that dbias needs no atomics. A block is kThreads threads as tr rows x tc
// column vectors (tc = min(vectors per row, 32): a warp reads up to 512 contiguous bytes of a row). The
// rows are cut into slabs of `step` rows, the vectors into groups of tc; for each (slab, group) it owns,
// a block writes dx of its rows and columns, each thread summing its column vector's dx values over the
// rows it takes (r0 + ty, r0 + ty + tr, ...) in registers; the block then sums its tr row threads in order
// through shared memory into one partial row per slab, and sum_partials sums the slabs' partials in order.
// The slab count is set by the shape alone (kMaxSlabs, kMinSlabRows), not by the GPU or the grid cap, so
// dbias is bitwise the same on every run and GPU.
#include "bias_gelu/bias_gelu.h"
#include "cuda_utils.cuh"
#include "row_views.cuh"
#include "vec_acc.cuh"

namespace sola {
namespace {

constexpr int kThreads = 256;
// The backward's slabs (dbias partials) at most: about one wave of 256-thread blocks on an H100 / H200
// (132 / 132 SMs x 8) for the model's 4C-wide tokens; each slab adds a C-wide acc row to write and read
// again (1024 x 256 fp32 = 1 MB against 600 MB of gradient, x and dx at the first stage's batch 128).
constexpr int64_t kMaxSlabs = 1024;
// Rows per slab, at least: enough rows per thread that the block's reduction is a small part of its work.
constexpr int64_t kMinSlabRows = 64;

template <typename scalar_t, int kV, bool kTanh>
__global__ void __launch_bounds__(kThreads) bias_gelu_fwd_kernel(const BiasGeluParams p) {
  using acc = acc_t<scalar_t>;
  const acc* bias = static_cast<const acc*>(p.bias);
  const int64_t nv = p.C / kV, items = p.rows * nv;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items; i += int64_t(gridDim.x) * kThreads) {
    const RowItem it(i, nv, kV);
    acc x[kV];
    load_acc<kV>(static_cast<const scalar_t*>(p.x) + it.at(p.x_stride), x);
    acc b[kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) b[e] = acc(-0.0);  // no bias: x + -0 is x, -0 included
    if (bias) load_acc<kV>(bias + it.c, b);
#pragma unroll
    for (int e = 0; e < kV; ++e) x[e] = gelu_value<kTanh>(x[e] + b[e]);
    store_acc<kV>(x, static_cast<scalar_t*>(p.out) + it.out(p.C));
  }
}

// The backward's split of (rows, C) into slabs of rows and groups of column vectors (see the top).
struct BwdSplit {
  int tc, tr;                  // threads per block along the column vectors and along the rows
  int64_t nv, groups;          // column vectors per row, groups of tc of them
  int64_t step, slabs;         // rows per slab, slabs (dbias partials)
};

BwdSplit bwd_split(int64_t rows, int64_t C, int kV) {
  BwdSplit s;
  s.nv = C / kV;
  s.tc = static_cast<int>(std::min<int64_t>(s.nv, kWarpSize));
  s.tr = kThreads / s.tc;
  s.groups = ceil_div(s.nv, s.tc);
  s.step = std::max(kMinSlabRows, ceil_div(rows, kMaxSlabs));
  s.slabs = ceil_div(rows, s.step);
  return s;
}

// A thread's kV column sums into red at dst = red + threadIdx.x * kV: whole 16-byte stores (8 floats:
// two, ordered by store_row8 as rows of 4 vectors), where per element a warp's lanes kV floats apart
// took kV-way bank conflicts (4-8).
template <int kV, typename acc>
__device__ __forceinline__ void store_sums(acc* dst, const acc (&sum)[kV]) {
  if constexpr (kV * sizeof(acc) == 32 && sizeof(acc) == 4) {
    store_row8<4 * kV, 4>(dst, sum, threadIdx.x);
  } else if constexpr (kV * sizeof(acc) == 16) {
    store_vec16(dst, sum);
  } else {
#pragma unroll
    for (int e = 0; e < kV; ++e) dst[e] = sum[e];
  }
}

// dx, and with kSum the dbias partials (slabs, C) of the slabs this block owns.
template <typename scalar_t, int kV, bool kTanh, bool kSum>
__global__ void __launch_bounds__(kThreads) bias_gelu_bwd_kernel(const BiasGeluParams p, const BwdSplit s,
                                                                 acc_t<scalar_t>* partials) {
  using acc = acc_t<scalar_t>;
  const acc* bias = static_cast<const acc*>(p.bias);
  const int tx = threadIdx.x % s.tc, ty = threadIdx.x / s.tc;  // ty >= s.tr: a spare thread (tc not a power of 2)
  const int width = s.tc * kV;                                 // columns of a group (<= kThreads)
  // Loop bounds are the same for the whole block: every thread reaches every barrier.
  for (int64_t group = blockIdx.y; group < s.groups; group += gridDim.y) {
    const int64_t j = group * s.tc + tx;  // this thread's column vector
    const bool mine = ty < s.tr && j < s.nv;
    const int64_t c = j * kV;
    acc b[kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) b[e] = acc(-0.0);  // no bias: x + -0 is x, -0 included
    if (mine && bias) load_acc<kV>(bias + c, b);
    for (int64_t slab = blockIdx.x; slab < s.slabs; slab += gridDim.x) {
      acc sum[kV];
#pragma unroll
      for (int e = 0; e < kV; ++e) sum[e] = acc(0);
      const int64_t r1 = std::min(p.rows, (slab + 1) * s.step);
      for (int64_t r = slab * s.step + ty; mine && r < r1; r += s.tr) {
        acc g[kV], x[kV];
        load_acc<kV>(static_cast<const scalar_t*>(p.grad) + r * p.grad_stride + c, g);
        load_acc<kV>(static_cast<const scalar_t*>(p.x) + r * p.x_stride + c, x);
#pragma unroll
        for (int e = 0; e < kV; ++e) {
          g[e] = gelu_grad<kTanh>(g[e], x[e] + b[e]);
          if constexpr (kSum) sum[e] += g[e];
        }
        store_acc<kV>(g, static_cast<scalar_t*>(p.out) + r * p.C + c);
      }
      if constexpr (kSum) {
        // Column t of the group: the sum of its row threads' sums in row-thread order, into the slab's partial.
        __shared__ __align__(16) acc red[kThreads * kV];
        __syncthreads();  // the previous (slab, group)'s reads of red are done
        store_sums(red + threadIdx.x * kV, sum);  // = red[ty * width + tx * kV + e]
        __syncthreads();
        const int64_t col = group * width + threadIdx.x;
        if (int(threadIdx.x) < width && col < p.C) {
          acc t = acc(0);
          for (int k = 0; k < s.tr; ++k) t += red[k * width + threadIdx.x];
          partials[slab * p.C + col] = t;
        }
      }
    }
  }
}

// Where element i of the summed partials goes: dbias[i] (sum_partials' slot).
template <typename acc>
struct DbiasSlot {
  acc* dbias;
  __device__ acc* operator()(int64_t i) const { return dbias + i; }
};

// Whether the 16-byte vector kernels may run: C a multiple of the vector, every row of x, grad and the
// output starting on a 16-byte boundary, and the bias on a boundary of its kV acc values.
template <typename scalar_t>
bool vector_ok(const BiasGeluParams& p) {
  constexpr int kV = kVec16<scalar_t>;
  const auto bias_at = reinterpret_cast<uintptr_t>(p.bias);
  return p.C % kV == 0 && rows_aligned16<scalar_t>(p.x, p.x_stride) && rows_aligned16<scalar_t>(p.grad, p.grad_stride) &&
         rows_aligned16<scalar_t>(p.out, p.C) && bias_at % (kV * sizeof(acc_t<scalar_t>)) == 0;
}

}  // namespace

void bias_gelu_fwd_cuda(const BiasGeluParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "bias_gelu_fwd_cuda", [&] {
    SOLA_VEC16_SWITCH(vector_ok<scalar_t>(p), scalar_t, kVec, [&] {
      SOLA_GELU_SWITCH(p.tanh, kTanh, [&] {
        bias_gelu_fwd_kernel<scalar_t, kVec, kTanh><<<grid_x(p.rows * (p.C / kVec), kThreads), kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void bias_gelu_bwd_cuda(const BiasGeluParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "bias_gelu_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    SOLA_VEC16_SWITCH(vector_ok<scalar_t>(p), scalar_t, kVec, [&] {
      const BwdSplit s = bwd_split(p.rows, p.C, kVec);
      const dim3 grid(grid_x(s.slabs, 1), grid_x(s.groups, 1));
      if (!p.dbias) {
        SOLA_GELU_SWITCH(p.tanh, kTanh, [&] {
          bias_gelu_bwd_kernel<scalar_t, kVec, kTanh, false><<<grid, kThreads, 0, stream>>>(p, s, nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
      // Partials on the current stream: the caching allocator keeps them until the kernels are done.
      at::Tensor partials = at::empty({s.slabs * p.C}, at::TensorOptions().dtype(acc_dtype(p.dtype))
                                                           .device(at::Device(at::kCUDA, p.device_index)));
      acc* part = partials.data_ptr<acc>();
      SOLA_GELU_SWITCH(p.tanh, kTanh, [&] {
        bias_gelu_bwd_kernel<scalar_t, kVec, kTanh, true><<<grid, kThreads, 0, stream>>>(p, s, part);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      sum_partials(part, static_cast<unsigned>(s.slabs), p.C, DbiasSlot<acc>{static_cast<acc*>(p.dbias)}, stream);
    });
  });
}

}  // namespace sola
