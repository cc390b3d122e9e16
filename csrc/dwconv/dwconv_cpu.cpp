// C++ CPU kernels of the depthwise 3x3 convolution (dwconv.h): the convolution, parallel over
// output rows (b, h), and the weight gradient, summed per fixed chunk of rows and then over the
// chunks in order (bitwise the same for any thread count). Input rows go through acc buffers with a
// zero column each side, converted once per task, so the loops over channels vectorise (compiled per
// ISA, SOLA_CPU_CLONES).
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

// The input rows h - 1, h, h + 1 of the output rows r0 .. r1 in turn, each row converted once: a row
// continuing the previous one in its image reuses two of the three buffers.
template <typename scalar_t, typename acc>
class RowWindow {
 public:
  RowWindow(const DwconvParams& p, int64_t width) : p_(p), buf_(3 * width), width_(width) {}

  // rows[dy] = input row h + dy - 1 of image b, zero-padded.
  void move_to(int64_t b, int64_t h, const acc* (&rows)[3]) {
    if (b == b_ && h == h_ + 1) {
      top_ = (top_ + 1) % 3;
      load_padded_row<scalar_t>(p_, p_.x, b, h + 1, slot(2));
    } else {
      for (int dy = 0; dy < 3; ++dy) load_padded_row<scalar_t>(p_, p_.x, b, h + dy - 1, slot(dy));
    }
    b_ = b, h_ = h;
    for (int dy = 0; dy < 3; ++dy) rows[dy] = slot(dy);
  }

 private:
  acc* slot(int dy) { return buf_.data() + (top_ + dy) % 3 * width_; }

  const DwconvParams& p_;
  std::vector<acc> buf_;
  int64_t width_, b_ = -1, h_ = -1;
  int top_ = 0;  // the buffer holding row h - 1
};

// out = the epilogue of bias + the 9 taps' products in tap order (the CUDA kernels' order), one pass
// per row.
template <typename scalar_t, DwEpilogue kEpi>
SOLA_CPU_CLONES void conv_rows(const DwconvParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<scalar_t>;
  const int64_t W = p.W, C = p.C;
  const acc* bias = static_cast<const acc*>(p.bias);
  std::vector<acc> taps(kDwTaps * C);  // tap-major, so the loop over channels reads them as vectors
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < kDwTaps; ++t) taps[t * C + c] = dw_tap<acc>(p, c, t);
  RowWindow<scalar_t, acc> window(p, (W + 2) * C);
  std::vector<acc> out(C), zeros(bias ? 0 : C, acc(0)), g(kEpi == DwEpilogue::SiluGrad ? C : 0);
  const acc* const start = bias ? bias : zeros.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    const acc* in[3];
    window.move_to(b, h, in);
    for (int64_t w = 0; w < W; ++w) {
      const acc* src[kDwTaps];
      for (int t = 0; t < kDwTaps; ++t) src[t] = in[t / 3] + (w + t % 3) * C;
#pragma GCC ivdep  // out, the taps and the input rows are separate buffers
      for (int64_t c = 0; c < C; ++c) {  // the 9 products of a channel in registers, channels in vectors
        acc o = start[c];
#pragma GCC unroll 9
        for (int t = 0; t < kDwTaps; ++t) o += taps[t * C + c] * src[t][c];
        out[c] = o;
      }
      if constexpr (kEpi == DwEpilogue::SiluGrad) load_row(p.grad.row<const scalar_t>(b, h, w), C, g.data());
      if constexpr (kEpi != DwEpilogue::Plain) {
        for (int64_t c = 0; c < C; ++c) out[c] = dw_epilogue<kEpi>(out[c], kEpi == DwEpilogue::SiluGrad ? g[c] : acc(0));
      }
      store_row(out.data(), C, p.out.row<scalar_t>(b, h, w));
    }
  }
}

// part (10, C) = the weight gradient's sums over output rows r0 .. r1.
template <typename scalar_t>
SOLA_CPU_CLONES void wgrad_rows(const DwconvParams& p, int64_t r0, int64_t r1, acc_t<scalar_t>* part) {
  using acc = acc_t<scalar_t>;
  const int64_t W = p.W, C = p.C;
  RowWindow<scalar_t, acc> window(p, (W + 2) * C);
  std::vector<acc> g(C);
  std::fill(part, part + kDwGradRows * C, acc(0));
  acc* bias_sum = part + kDwTaps * C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    const acc* in[3];
    window.move_to(b, h, in);
    for (int64_t w = 0; w < W; ++w) {
      load_row(p.grad.row<const scalar_t>(b, h, w), C, g.data());
      const acc* src[kDwTaps];
      for (int t = 0; t < kDwTaps; ++t) src[t] = in[t / 3] + (w + t % 3) * C;
#pragma GCC ivdep  // part, g and the input rows are separate buffers
      for (int64_t c = 0; c < C; ++c) {
        const acc gc = g[c];
#pragma GCC unroll 9
        for (int t = 0; t < kDwTaps; ++t) part[t * C + c] += gc * src[t][c];
        bias_sum[c] += gc;
      }
    }
  }
}

}  // namespace

void dwconv_cpu(const DwconvParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "dwconv_cpu", [&] {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(p.W * p.C, 1));
    SOLA_DW_EPILOGUE_SWITCH(p.epilogue, kEpi, [&] {
      at::parallel_for(0, p.B * p.H, grain, [&](int64_t r0, int64_t r1) { conv_rows<scalar_t, kEpi>(p, r0, r1); });
    });
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
    at::parallel_for(0, width, 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        acc s = acc(0);
        for (int64_t k = 0; k < chunks; ++k) s += partials[k * width + i];
        if (acc* slot = dw_grad_slot<acc>(p, i)) *slot = s;
      }
    });
  });
}

}  // namespace sola
