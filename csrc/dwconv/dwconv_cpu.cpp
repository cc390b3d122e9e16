// C++ CPU kernels of the depthwise 3x3 convolution (dwconv.h): the convolution, parallel over
// output rows (b, h), and the weight gradient, summed per fixed chunk of rows and then over the
// chunks in order (bitwise the same for any thread count). Rows go through acc buffers with a zero
// column each side, so the loops over channels vectorise (compiled per ISA, SOLA_CPU_CLONES).
#include <ATen/Parallel.h>

#include <vector>

#include "dwconv/dwconv.h"

namespace sola {
namespace {

// Output rows per weight-gradient partial: fixed, so the summation order is too.
constexpr int64_t kRowsPerPartial = 8;

// Input row hh of image b as acc values with a zero column at each end ((W + 2) * C); all zeros
// outside the image (the padding).
template <typename scalar_t, typename acc>
SOLA_CPU_INLINE void load_padded_row(const DwconvParams& p, const View4& t, int64_t b, int64_t hh, acc* dst) {
  const int64_t W = p.W, C = p.C;
  std::fill(dst, dst + C, acc(0));
  std::fill(dst + (W + 1) * C, dst + (W + 2) * C, acc(0));
  if (hh < 0 || hh >= p.H) return std::fill(dst + C, dst + (W + 1) * C, acc(0));
  for (int64_t w = 0; w < W; ++w) load_row(t.row<const scalar_t>(b, hh, w), C, dst + (w + 1) * C);
}

template <typename scalar_t>
SOLA_CPU_CLONES void conv_rows(const DwconvParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<scalar_t>;
  const int64_t W = p.W, C = p.C;
  const acc* taps = static_cast<const acc*>(p.taps);
  const acc* bias = static_cast<const acc*>(p.bias);
  std::vector<acc> in((W + 2) * C), out(W * C);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    for (int64_t w = 0; w < W; ++w)
      for (int64_t c = 0; c < C; ++c) out[w * C + c] = bias ? bias[c] : acc(0);
    for (int dy = 0; dy < 3; ++dy) {
      load_padded_row<scalar_t>(p, p.x, b, h + dy - 1, in.data());
      for (int dx = 0; dx < 3; ++dx) {
        const acc* tap = taps + (3 * dy + dx) * C;
        for (int64_t w = 0; w < W; ++w) {
          const acc* src = in.data() + (w + dx) * C;
          acc* o = out.data() + w * C;
          for (int64_t c = 0; c < C; ++c) o[c] += tap[c] * src[c];
        }
      }
    }
    for (int64_t w = 0; w < W; ++w) store_row(out.data() + w * C, C, p.out.row<scalar_t>(b, h, w));
  }
}

// part (10, C) = the weight gradient's sums over output rows r0 .. r1.
template <typename scalar_t>
SOLA_CPU_CLONES void wgrad_rows(const DwconvParams& p, int64_t r0, int64_t r1, acc_t<scalar_t>* part) {
  using acc = acc_t<scalar_t>;
  const int64_t W = p.W, C = p.C;
  std::vector<acc> in((W + 2) * C), g(W * C);
  std::fill(part, part + kDwGradRows * C, acc(0));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    for (int64_t w = 0; w < W; ++w) load_row(p.grad.row<const scalar_t>(b, h, w), C, g.data() + w * C);
    for (int dy = 0; dy < 3; ++dy) {
      load_padded_row<scalar_t>(p, p.x, b, h + dy - 1, in.data());
      for (int dx = 0; dx < 3; ++dx) {
        acc* sum = part + (3 * dy + dx) * C;
        for (int64_t w = 0; w < W; ++w) {
          const acc* src = in.data() + (w + dx) * C;
          const acc* gw = g.data() + w * C;
          for (int64_t c = 0; c < C; ++c) sum[c] += gw[c] * src[c];
        }
      }
    }
    acc* bias_sum = part + kDwTaps * C;
    for (int64_t w = 0; w < W; ++w)
      for (int64_t c = 0; c < C; ++c) bias_sum[c] += g[w * C + c];
  }
}

}  // namespace

void dwconv_cpu(const DwconvParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "dwconv_cpu", [&] {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(p.W * p.C, 1));
    at::parallel_for(0, p.B * p.H, grain, [&](int64_t r0, int64_t r1) { conv_rows<scalar_t>(p, r0, r1); });
  });
}

void dwconv_wgrad_cpu(const DwconvParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "dwconv_wgrad_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const int64_t rows = p.B * p.H, chunks = ceil_div(rows, kRowsPerPartial), width = kDwGradRows * p.C;
    std::vector<acc> partials(chunks * width);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        wgrad_rows<scalar_t>(p, k * kRowsPerPartial, std::min(rows, (k + 1) * kRowsPerPartial),
                             partials.data() + k * width);
    });
    acc* out = static_cast<acc*>(p.wgrad);
    at::parallel_for(0, width, 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        acc s = acc(0);
        for (int64_t k = 0; k < chunks; ++k) s += partials[k * width + i];
        out[i] = s;
      }
    });
  });
}

}  // namespace sola
