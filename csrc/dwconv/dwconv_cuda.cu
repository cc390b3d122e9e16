// CUDA kernels of the depthwise 3x3 convolution (dwconv.h). Memory-bound: each thread takes a
// vector of channels (4 fp16 / bf16 / fp32, 2 fp64: an 8- or 16-byte access) at one output column w
// and walks kDwRows output rows down it, keeping its taps and a 3 x 3 window of input vectors in
// registers: each step loads the stride's new input rows (3 loads per output at stride 1, 6 at
// stride 2, not 9). Adjacent threads take adjacent channel vectors, so a warp reads contiguous bytes
// of a row. The input gradient at stride 2 is the transposed kernel: a thread per 2 x 2 input cell
// column, g's rows in registers. The weight gradient sums over every output position in a fixed
// order (deterministic): blocks of kTx channel vectors x lanes reduce their lanes by a tree into one
// partial per block row, and a second kernel sums the partials in order. C not a multiple of the
// vector, or misaligned views, take the one-channel (scalar) kernels. The convolution kernel ends in
// an epilogue (dwconv.h): the sum, silu or relu of it, or the output's gradient times silu' of it,
// plus the addend where there is one (added as the vector is stored).
// input_activation "relu": the kernels that read x read relu of it as they load it (relu_input), the
// input gradient's kernels mask what they store by x (mask): branches uniform per launch, except the
// weight gradient's relu, a template parameter (as a branch, ptxas spilled 8 bytes in three of its
// one-channel kernels; templated, the kernels without it are the same code as before it).
#include <type_traits>

#include "cuda_utils.cuh"
#include "dwconv/dwconv.h"

namespace sola {
namespace {

constexpr int kDwThreads = 256;
// Output rows per thread: the 2 extra input rows a strip loads cost 12.5%, and the taps' loads and
// the index math are paid once per 16 outputs.
constexpr int kDwRows = 16;
constexpr int64_t kWgradBlocks = 512;  // fills an H100 / H200 at 2-4 blocks per SM

template <typename scalar_t>
constexpr int kDwVec = sizeof(scalar_t) == 8 ? 2 : 4;  // registers: 9 taps + 9 window vectors

// dst = t[b, h, w, c .. c + kV) as acc, 0 outside its rows x cols image (the zero padding).
template <int kV, typename scalar_t, typename acc>
SOLA_DEVICE void load_vec(const View4& t, int64_t rows, int64_t cols, int64_t b, int64_t h, int64_t w, int64_t c,
                          acc (&dst)[kV]) {
  if (h < 0 || h >= rows || w < 0 || w >= cols) {
#pragma unroll
    for (int e = 0; e < kV; ++e) dst[e] = acc(0);
    return;
  }
  const Vec<scalar_t, kV> v = *reinterpret_cast<const Vec<scalar_t, kV>*>(t.row<const scalar_t>(b, h, w) + c);
#pragma unroll
  for (int e = 0; e < kV; ++e) dst[e] = static_cast<acc>(v.v[e]);
}

// The 9 taps of channels c .. c + kV as the kernels convolve with them (dw_tap). The weight is (C, 9)
// and 16-byte aligned (kernel_weight): a vector kernel's channels have kV * 9 consecutive taps, 144
// bytes at a multiple of 144, loaded as 16-byte vectors (per tap and channel, a warp's 36 loads had
// touched 16 sectors each: emulator MEMSTAT).
template <int kV, typename acc>
SOLA_DEVICE void load_taps(const DwconvParams& p, int64_t c, acc (&tap)[kDwTaps][kV]) {
  constexpr int kN = kDwTaps * kV, kW = 16 / int(sizeof(acc));
  const acc* const w = static_cast<const acc*>(p.weight) + c * kDwTaps;
  if constexpr (kN % kW == 0) {
#pragma unroll
    for (int q = 0; q < kN; q += kW) {  // value i is tap i % 9 of channel c + i / 9, as stored
      const Vec<acc, kW> v = *reinterpret_cast<const Vec<acc, kW>*>(w + q);
#pragma unroll
      for (int j = 0; j < kW; ++j) tap[(q + j) % kDwTaps][(q + j) / kDwTaps] = v.v[j];
    }
#pragma unroll
    for (int t = 0; t < kDwTaps / 2; ++t)
#pragma unroll
      for (int e = 0; e < kV; ++e) {  // reversed: taps t and 8 - t trade places (selects, in registers)
        const acc a = tap[t][e], b = tap[kDwTaps - 1 - t][e];
        tap[t][e] = p.reversed ? b : a;
        tap[kDwTaps - 1 - t][e] = p.reversed ? a : b;
      }
#pragma unroll
    for (int e = 0; e < kV; ++e) tap[kDwTaps / 2][e] = dw_tap_with_residual(p, tap[kDwTaps / 2][e], kDwTaps / 2);
  } else {  // one channel a thread (C off the vector)
#pragma unroll
    for (int t = 0; t < kDwTaps; ++t)
#pragma unroll
      for (int e = 0; e < kV; ++e) tap[t][e] = dw_tap<acc>(p, c + e, t);
  }
}

template <int kV, typename scalar_t>
SOLA_DEVICE void store_vec(const View4& t, int64_t b, int64_t h, int64_t w, int64_t c,
                           const acc_t<scalar_t> (&src)[kV]) {
  Vec<scalar_t, kV> o;
#pragma unroll
  for (int e = 0; e < kV; ++e) o.v[e] = static_cast<scalar_t>(src[e]);
  *reinterpret_cast<Vec<scalar_t, kV>*>(t.row<scalar_t>(b, h, w) + c) = o;
}

// src into out at (b, h, w) (inside out's image), masked by the mask there if there is one (the input
// gradient of relu_input: dw_relu_grad).
template <int kV, typename scalar_t>
SOLA_DEVICE void store_out(const DwconvParams& p, int64_t b, int64_t h, int64_t w, int64_t c,
                           acc_t<scalar_t> (&src)[kV]) {
  if (p.mask.ptr) {
    const Vec<scalar_t, kV> m = *reinterpret_cast<const Vec<scalar_t, kV>*>(p.mask.row<const scalar_t>(b, h, w) + c);
#pragma unroll
    for (int e = 0; e < kV; ++e) src[e] = dw_relu_grad(src[e], static_cast<acc_t<scalar_t>>(m.v[e]));
  }
  store_vec<kV, scalar_t>(p.out, b, h, w, c, src);
}

// src plus the addend at (b, h, w), if there is one (the convolution's only: the transposed kernel
// does not carry the branch).
template <int kV, typename scalar_t>
SOLA_DEVICE void add_addend(const DwconvParams& p, int64_t b, int64_t h, int64_t w, int64_t c,
                            acc_t<scalar_t> (&src)[kV]) {
  if (!p.addend.ptr) return;
  const Vec<scalar_t, kV> a = *reinterpret_cast<const Vec<scalar_t, kV>*>(p.addend.row<const scalar_t>(b, h, w) + c);
#pragma unroll
  for (int e = 0; e < kV; ++e) src[e] += static_cast<acc_t<scalar_t>>(a.v[e]);
}

// Columns w - 1, w, w + 1 of input row h of x (relu of them with relu: p.relu_input).
template <int kV, typename scalar_t, typename acc>
SOLA_DEVICE void load_window_row(const DwconvParams& p, bool relu, int64_t b, int64_t h, int64_t w, int64_t c,
                                 acc (&dst)[3][kV]) {
#pragma unroll
  for (int dx = 0; dx < 3; ++dx) {
    load_vec<kV, scalar_t>(p.x, p.H, p.W, b, h, w + dx - 1, c, dst[dx]);
    if (relu) {
#pragma unroll
      for (int e = 0; e < kV; ++e) dst[dx][e] = dw_relu(dst[dx][e]);
    }
  }
}

// The window of output rows h0 .. h0 + kDwRows at stride kS, input rows in rotation: input row
// kS * h0 - 1 + r sits in win[r % 3]. Output row h0 + j reads rows kS * j + dy, dy = 0, 1, 2; each
// step loads the kS rows it has not seen (3 - kS rows are loaded before the first).
template <int kS, int kV, typename scalar_t, typename acc>
SOLA_DEVICE void load_first_rows(const DwconvParams& p, bool relu, int64_t b, int64_t h0, int64_t w, int64_t c,
                                 acc (&win)[3][3][kV]) {
#pragma unroll
  for (int r = 0; r < 3 - kS; ++r) load_window_row<kV, scalar_t>(p, relu, b, kS * h0 - 1 + r, kS * w, c, win[r]);
}

template <int kS, int kV, typename scalar_t, typename acc>
SOLA_DEVICE void load_next_rows(const DwconvParams& p, bool relu, int64_t b, int64_t h0, int j, int64_t w, int64_t c,
                                acc (&win)[3][3][kV]) {
#pragma unroll
  for (int r = kS * j + 3 - kS; r <= kS * j + 2; ++r)
    load_window_row<kV, scalar_t>(p, relu, b, kS * h0 - 1 + r, kS * w, c, win[r % 3]);
}

// i = ((b * strips + s) * cols + w) * n0 + r0 split into (b, first row of strip s, w) and r0 (the
// channel vector; n0 = 1 for the weight gradient's tasks), over an image of rows x cols (the output's,
// or the transposed kernel's cells). With every count below 2^32 (the usual case: `narrow`, uniform
// per launch) in 32-bit arithmetic: a 64-bit division is ~2x the instructions, and at memory speed a
// thread has a few hundred per strip.
struct DwItem {
  int64_t b, h0, w, r0;
};

SOLA_DEVICE DwItem dw_item(int64_t rows, int64_t cols, int64_t i, int64_t n0, bool narrow) {
  const int64_t strips = ceil_div(rows, kDwRows);
  DwItem it;
  if (narrow) {
    uint32_t u = static_cast<uint32_t>(i);
    const uint32_t v = static_cast<uint32_t>(n0), W = static_cast<uint32_t>(cols), S = static_cast<uint32_t>(strips);
    it.r0 = u % v, u /= v;
    it.w = u % W, u /= W;
    it.h0 = int64_t(u % S) * kDwRows, it.b = u / S;
  } else {
    it.r0 = i % n0, i /= n0;
    it.w = i % cols, i /= cols;
    it.h0 = i % strips * kDwRows, it.b = i / strips;
  }
  return it;
}

SOLA_HD int64_t dw_items(int64_t B, int64_t rows, int64_t cols, int64_t n0) {
  return B * ceil_div(rows, kDwRows) * cols * n0;
}

template <typename scalar_t, int kV, int kS, DwEpilogue kEpi>
__global__ void __launch_bounds__(kDwThreads) dwconv_kernel(const DwconvParams p) {
  using acc = acc_t<scalar_t>;
  const int64_t total = dw_items(p.B, p.OH, p.OW, p.C / kV);
  const bool narrow = total <= int64_t(UINT32_MAX);
  const acc* bias = static_cast<const acc*>(p.bias);
  for (int64_t i = int64_t(blockIdx.x) * kDwThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kDwThreads) {
    const DwItem it = dw_item(p.OH, p.OW, i, p.C / kV, narrow);
    const int64_t c = it.r0 * kV;  // the vector's first channel
    acc tap[kDwTaps][kV], b0[kV];
    load_taps(p, c, tap);
#pragma unroll
    for (int e = 0; e < kV; ++e) b0[e] = bias ? bias[c + e] : acc(0);
    acc win[3][3][kV];
    load_first_rows<kS, kV, scalar_t>(p, p.relu_input, it.b, it.h0, it.w, c, win);
#pragma unroll
    for (int j = 0; j < kDwRows; ++j) {
      const int64_t h = it.h0 + j;
      if (h >= p.OH) break;
      load_next_rows<kS, kV, scalar_t>(p, p.relu_input, it.b, it.h0, j, it.w, c, win);
      acc g[kV];  // the output's gradient here (SiluGrad)
      if constexpr (kEpi == DwEpilogue::SiluGrad) load_vec<kV, scalar_t>(p.grad, p.OH, p.OW, it.b, h, it.w, c, g);
      acc o[kV];
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        acc s = b0[e];
#pragma unroll
        for (int dy = 0; dy < 3; ++dy)
#pragma unroll
          for (int dx = 0; dx < 3; ++dx) s += tap[3 * dy + dx][e] * win[(kS * j + dy) % 3][dx][e];
        o[e] = dw_epilogue<kEpi>(s, kEpi == DwEpilogue::SiluGrad ? g[e] : acc(0));
      }
      add_addend<kV, scalar_t>(p, it.b, h, it.w, c, o);
      store_out<kV, scalar_t>(p, it.b, h, it.w, c, o);
    }
  }
}

// The input gradient at stride 2 (the transposed convolution): out (B, H, W, C) from grad
// (B, OH, OW, C). Output cell (m, n) feeds the 2 x 2 inputs (2m + a, 2n + e), a, e < 2, with
//   dx[2m][2n]         = t11 g[m][n]
//   dx[2m][2n + 1]     = t12 g[m][n] + t10 g[m][n + 1]
//   dx[2m + 1][2n]     = t21 g[m][n] + t01 g[m + 1][n]
//   dx[2m + 1][2n + 1] = t22 g[m][n] + t20 g[m][n + 1] + t02 g[m + 1][n] + t00 g[m + 1][n + 1]
// (t_{dy dx} = tap 3 dy + dx; g = 0 past the output's edge). A thread takes a channel vector of
// kDwRows cells down a column, keeping g's rows m and m + 1 in registers: one new g row per cell.
template <typename scalar_t, int kV>
__global__ void __launch_bounds__(kDwThreads) dwconv_transposed_kernel(const DwconvParams p) {
  using acc = acc_t<scalar_t>;
  const int64_t total = dw_items(p.B, p.OH, p.OW, p.C / kV);
  const bool narrow = total <= int64_t(UINT32_MAX);
  for (int64_t i = int64_t(blockIdx.x) * kDwThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kDwThreads) {
    const DwItem it = dw_item(p.OH, p.OW, i, p.C / kV, narrow);
    const int64_t c = it.r0 * kV, n = it.w, b = it.b;
    acc t[kDwTaps][kV];
    load_taps(p, c, t);
    acc g[2][2][kV];  // g[m + r % 2][n + col], rows in rotation
    load_vec<kV, scalar_t>(p.grad, p.OH, p.OW, b, it.h0, n, c, g[0][0]);
    load_vec<kV, scalar_t>(p.grad, p.OH, p.OW, b, it.h0, n + 1, c, g[0][1]);
    const bool right = 2 * n + 1 < p.W;
#pragma unroll
    for (int j = 0; j < kDwRows; ++j) {
      const int64_t m = it.h0 + j;
      if (m >= p.OH) break;
      const auto& g0 = g[j % 2];
      auto& g1 = g[(j + 1) % 2];
      load_vec<kV, scalar_t>(p.grad, p.OH, p.OW, b, m + 1, n, c, g1[0]);
      load_vec<kV, scalar_t>(p.grad, p.OH, p.OW, b, m + 1, n + 1, c, g1[1]);
      acc d00[kV], d01[kV], d10[kV], d11[kV];
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        d00[e] = t[4][e] * g0[0][e];
        d01[e] = t[5][e] * g0[0][e] + t[3][e] * g0[1][e];
        d10[e] = t[7][e] * g0[0][e] + t[1][e] * g1[0][e];
        d11[e] = t[8][e] * g0[0][e] + t[6][e] * g0[1][e] + t[2][e] * g1[0][e] + t[0][e] * g1[1][e];
      }
      store_out<kV, scalar_t>(p, b, 2 * m, 2 * n, c, d00);
      if (right) store_out<kV, scalar_t>(p, b, 2 * m, 2 * n + 1, c, d01);
      if (2 * m + 1 < p.H) {
        store_out<kV, scalar_t>(p, b, 2 * m + 1, 2 * n, c, d10);
        if (right) store_out<kV, scalar_t>(p, b, 2 * m + 1, 2 * n + 1, c, d11);
      }
    }
  }
}

// Block layout of the weight gradient: tx channel vectors (a power of two up to 32) x lanes
// position lanes, lanes = kDwThreads / tx (a power of two, for the tree).
struct WgradLayout {
  int tx;
  int64_t tasks;  // (b, strip, w) per channel vector
  unsigned partials;
};

// Lanes walk the tasks blockIdx.y * lanes + ty + k * gridDim.y * lanes; each block writes its
// sums, tree-reduced over its lanes, as partial row blockIdx.y (10, C).
template <typename scalar_t, int kV, int kS, bool kRelu>
__global__ void __launch_bounds__(kDwThreads) dwconv_wgrad_kernel(const DwconvParams p, const WgradLayout l,
                                                                  acc_t<scalar_t>* partials) {
  using acc = acc_t<scalar_t>;
  __shared__ acc red[kDwThreads * kV];
  const int tx = threadIdx.x % l.tx, ty = threadIdx.x / l.tx, lanes = kDwThreads / l.tx;
  const int64_t c = (int64_t(blockIdx.x) * l.tx + tx) * kV;
  const bool active = c < p.C;
  const bool narrow = l.tasks <= int64_t(UINT32_MAX);
  acc sum[kDwGradRows][kV];
#pragma unroll
  for (int k = 0; k < kDwGradRows; ++k)
#pragma unroll
    for (int e = 0; e < kV; ++e) sum[k][e] = acc(0);
  for (int64_t task = int64_t(blockIdx.y) * lanes + ty; active && task < l.tasks;
       task += int64_t(gridDim.y) * lanes) {
    const DwItem t = dw_item(p.OH, p.OW, task, 1, narrow);
    const int64_t w = t.w, h0 = t.h0, b = t.b;
    acc win[3][3][kV];
    load_first_rows<kS, kV, scalar_t>(p, kRelu, b, h0, w, c, win);
#pragma unroll
    for (int j = 0; j < kDwRows; ++j) {
      const int64_t h = h0 + j;
      if (h >= p.OH) break;
      load_next_rows<kS, kV, scalar_t>(p, kRelu, b, h0, j, w, c, win);
      acc g[kV];
      load_vec<kV, scalar_t>(p.grad, p.OH, p.OW, b, h, w, c, g);
#pragma unroll
      for (int e = 0; e < kV; ++e) {
#pragma unroll
        for (int dy = 0; dy < 3; ++dy)
#pragma unroll
          for (int dx = 0; dx < 3; ++dx) sum[3 * dy + dx][e] += g[e] * win[(kS * j + dy) % 3][dx][e];
        sum[kDwTaps][e] += g[e];
      }
    }
  }
  acc* part = partials + int64_t(blockIdx.y) * kDwGradRows * p.C;
#pragma unroll
  for (int k = 0; k < kDwGradRows; ++k) {
#pragma unroll
    for (int e = 0; e < kV; ++e) red[threadIdx.x * kV + e] = sum[k][e];
    __syncthreads();
    for (int s = lanes / 2; s > 0; s /= 2) {
      if (ty < s) {
#pragma unroll
        for (int e = 0; e < kV; ++e) red[threadIdx.x * kV + e] += red[(threadIdx.x + s * l.tx) * kV + e];
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int e = 0; e < kV; ++e) part[k * p.C + c + e] = red[threadIdx.x * kV + e];
    }
    __syncthreads();  // red is refilled for the next k
  }
}

// Where element i of the weight gradient's (10, C) sums goes (sum_partials' slot).
template <typename acc>
struct WgradSlot {
  DwconvParams p;
  __device__ acc* operator()(int64_t i) const { return dw_grad_slot<acc>(p, i); }
};

WgradLayout wgrad_layout(const DwconvParams& p, int64_t vectors) {
  WgradLayout l;
  l.tx = 1;
  while (l.tx < 32 && l.tx < vectors) l.tx *= 2;
  l.tasks = dw_items(p.B, p.OH, p.OW, 1);
  // About kWgradBlocks blocks, at most one per lane's task: a fixed count for a shape, whatever
  // the GPU (it sets the sums' order).
  const int64_t lanes = kDwThreads / l.tx, column_blocks = ceil_div(vectors, l.tx);
  l.partials = static_cast<unsigned>(
      std::clamp<int64_t>(ceil_div(kWgradBlocks, column_blocks), 1, std::max<int64_t>(1, ceil_div(l.tasks, lanes))));
  return l;
}

}  // namespace

void dwconv_cuda(const DwconvParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "dwconv_cuda", [&] {
    constexpr int kV = kDwVec<scalar_t>;
    const bool vec = p.C % kV == 0 && rows_aligned<scalar_t>(p.x, kV) && rows_aligned<scalar_t>(p.out, kV) &&
                     (p.epilogue != DwEpilogue::SiluGrad || rows_aligned<scalar_t>(p.grad, kV)) &&
                     (!p.mask.ptr || rows_aligned<scalar_t>(p.mask, kV)) &&
                     (!p.addend.ptr || rows_aligned<scalar_t>(p.addend, kV));
    const unsigned grid = grid_x(dw_items(p.B, p.OH, p.OW, vec ? p.C / kV : p.C), kDwThreads);
    SOLA_DW_STRIDE_SWITCH(p.stride, kS, [&] {
      SOLA_DW_EPILOGUE_SWITCH(p.epilogue, kEpi, [&] {
        if (vec) dwconv_kernel<scalar_t, kV, kS, kEpi><<<grid, kDwThreads, 0, stream>>>(p);
        else dwconv_kernel<scalar_t, 1, kS, kEpi><<<grid, kDwThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void dwconv_transposed_cuda(const DwconvParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "dwconv_transposed_cuda", [&] {
    constexpr int kV = kDwVec<scalar_t>;
    const bool vec = p.C % kV == 0 && rows_aligned<scalar_t>(p.grad, kV) && rows_aligned<scalar_t>(p.out, kV) &&
                     (!p.mask.ptr || rows_aligned<scalar_t>(p.mask, kV));
    const unsigned grid = grid_x(dw_items(p.B, p.OH, p.OW, vec ? p.C / kV : p.C), kDwThreads);
    if (vec) dwconv_transposed_kernel<scalar_t, kV><<<grid, kDwThreads, 0, stream>>>(p);
    else dwconv_transposed_kernel<scalar_t, 1><<<grid, kDwThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dwconv_wgrad_cuda(const DwconvParams& p) {
  c10::cuda::CUDAGuard guard(p.device_index);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SOLA_DISPATCH_FLOATING(p.dtype, "dwconv_wgrad_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int kV = kDwVec<scalar_t>;
    const bool vec = p.C % kV == 0 && rows_aligned<scalar_t>(p.x, kV) && rows_aligned<scalar_t>(p.grad, kV);
    const int64_t vectors = vec ? p.C / kV : p.C, width = kDwGradRows * p.C;
    const WgradLayout l = wgrad_layout(p, vectors);
    // Partials on the current stream: the caching allocator keeps them until the kernels are done.
    const at::Tensor partials = at::empty({int64_t(l.partials) * width},
                                          at::TensorOptions().dtype(acc_dtype(p.dtype)).device(at::Device(at::kCUDA, p.device_index)));
    const dim3 grid(static_cast<unsigned>(ceil_div(vectors, l.tx)), l.partials);
    SOLA_DW_STRIDE_SWITCH(p.stride, kS, [&] {
      const auto launch = [&](auto relu) {  // kRelu = p.relu_input
        constexpr bool kRelu = decltype(relu)::value;
        acc* const part = partials.data_ptr<acc>();
        if (vec) dwconv_wgrad_kernel<scalar_t, kV, kS, kRelu><<<grid, kDwThreads, 0, stream>>>(p, l, part);
        else dwconv_wgrad_kernel<scalar_t, 1, kS, kRelu><<<grid, kDwThreads, 0, stream>>>(p, l, part);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (p.relu_input) launch(std::true_type{});
      else launch(std::false_type{});
    });
    sum_partials(partials.data_ptr<acc>(), l.partials, width, WgradSlot<acc>{p}, stream);
  });
}

}  // namespace sola
