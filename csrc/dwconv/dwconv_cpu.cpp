// C++ CPU kernels of the depthwise 3x3 convolution (dwconv.h): the convolution, parallel over
// output rows (b, h), the transposed one (the input gradient at stride 2), and the weight gradient,
// summed per fixed chunk of rows and then over the chunks in order (bitwise the same for any thread
// count). The loops over channels vectorise (compiled per ISA, SOLA_CPU_CLONES). fp32 / fp64 tensors are
// read and written in place; fp16 / bf16 rows (and relu(x) for relu_input) go through acc buffers, the
// input's with a zero column each side, converted once per task.
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "dwconv/dwconv.h"

namespace sola {
namespace {

// Output rows per weight-gradient partial: fixed, so the summation order is too.
constexpr int64_t kRowsPerPartial = 8;

// Input row hh of image b of x as acc values (relu of them with relu_input) with a zero column at each
// end ((W + 2) * C); all zeros outside the image (the padding).
template <typename scalar_t, typename acc>
SOLA_CPU_INLINE void load_padded_row(const DwconvParams& p, int64_t b, int64_t hh, acc* dst) {
  const int64_t W = p.W, C = p.C;
  std::fill(dst, dst + C, acc(0));
  std::fill(dst + (W + 1) * C, dst + (W + 2) * C, acc(0));
  if (hh < 0 || hh >= p.H) return std::fill(dst + C, dst + (W + 1) * C, acc(0));
  for (int64_t w = 0; w < W; ++w) load_row(p.x.row<const scalar_t>(b, hh, w), C, dst + (w + 1) * C);
  if (p.relu_input) {
    for (int64_t i = C; i < (W + 1) * C; ++i) dst[i] = dw_relu(dst[i]);
  }
}

// Row (b, h, w) of v as acc values (cpu_math.h's acc_row: in place for fp32 / fp64).
template <typename scalar_t, typename acc>
SOLA_CPU_INLINE const acc* acc_row(const View4& v, int64_t b, int64_t h, int64_t w, int64_t C, acc* buf) {
  return sola::acc_row(v.row<const scalar_t>(b, h, w), C, buf);
}

// out (C) masked for the input gradient at (b, h, w) with relu_input (dw_relu_grad by the mask's row;
// m: a C-buffer for it); nothing without a mask.
template <typename scalar_t, typename acc>
SOLA_CPU_INLINE void mask_row(const DwconvParams& p, int64_t b, int64_t h, int64_t w, acc* out, acc* m) {
  if (!p.mask.ptr) return;
  const acc* mask = acc_row<scalar_t>(p.mask, b, h, w, p.C, m);
  for (int64_t c = 0; c < p.C; ++c) out[c] = dw_relu_grad(out[c], mask[c]);
}

// out (C) plus the addend's row at (b, h, w) (a: a C-buffer for it); nothing without an addend.
template <typename scalar_t, typename acc>
SOLA_CPU_INLINE void add_addend_row(const DwconvParams& p, int64_t b, int64_t h, int64_t w, acc* out, acc* a) {
  if (!p.addend.ptr) return;
  const acc* addend = acc_row<scalar_t>(p.addend, b, h, w, p.C, a);
  for (int64_t c = 0; c < p.C; ++c) out[c] += addend[c];
}

// The input rows s h - 1, s h, s h + 1 of output row h (stride s) for the output rows of a task in
// turn, each input row converted once: rows the previous output row of the image also read (two at
// stride 1, one at stride 2) stay in their buffers.
template <typename scalar_t, typename acc>
class RowWindow {
 public:
  RowWindow(const DwconvParams& p, int64_t width) : p_(p), buf_(3 * width), width_(width) {}

  // rows[dy] = input row s h + dy - 1 of image b, zero-padded.
  void move_to(int64_t b, int64_t h, const acc* (&rows)[3]) {
    const int64_t top = p_.stride * h - 1;
    bool kept[3] = {false, false, false};
    int slot_of[3] = {-1, -1, -1};
    for (int dy = 0; dy < 3; ++dy)
      for (int k = 0; k < 3; ++k)
        if (b_[k] == b && row_[k] == top + dy) slot_of[dy] = k, kept[k] = true;
    for (int dy = 0; dy < 3; ++dy) {
      if (slot_of[dy] >= 0) continue;
      int k = 0;
      while (kept[k]) ++k;
      load_padded_row<scalar_t>(p_, b, top + dy, buf_.data() + k * width_);
      b_[k] = b, row_[k] = top + dy, kept[k] = true, slot_of[dy] = k;
    }
    for (int dy = 0; dy < 3; ++dy) rows[dy] = buf_.data() + slot_of[dy] * width_;
  }

 private:
  const DwconvParams& p_;
  std::vector<acc> buf_;
  int64_t width_;
  int64_t b_[3] = {-1, -1, -1}, row_[3] = {0, 0, 0};  // what each buffer holds
};

// The input rows of an output row read in place, for fp32 / fp64 without relu_input (nothing to convert):
// sources() gives the taps' input vectors of a column, the zero vector where a tap falls in the padding.
template <typename acc>
class InPlaceRows {
 public:
  InPlaceRows(const DwconvParams& p, const acc* zeros) : p_(p), zeros_(zeros) {}

  void move_to(int64_t b, int64_t h) {
    for (int dy = 0; dy < 3; ++dy) {
      const int64_t hh = p_.stride * h + dy - 1;
      const bool inside = hh >= 0 && hh < p_.H;
      row_[dy] = inside ? p_.x.row<const acc>(b, hh, 0) : zeros_;
      step_[dy] = inside ? p_.x.sn : 0;  // a padding row reads the zero vector at every column
    }
  }

  // src[t] = the input vector of tap t for output column w.
  SOLA_CPU_INLINE void sources(int64_t w, const acc* (&src)[kDwTaps]) const {
    const int64_t w0 = p_.stride * w - 1;
    if (w0 >= 0 && w0 + 2 < p_.W) {  // an interior column: no tap in the side padding
      for (int t = 0; t < kDwTaps; ++t) src[t] = row_[t / 3] + (w0 + t % 3) * step_[t / 3];
      return;
    }
    for (int t = 0; t < kDwTaps; ++t) {
      const int64_t ww = w0 + t % 3;
      src[t] = ww < 0 || ww >= p_.W ? zeros_ : row_[t / 3] + ww * step_[t / 3];
    }
  }

 private:
  const DwconvParams& p_;
  const acc* zeros_;
  const acc* row_[3] = {nullptr, nullptr, nullptr};
  int64_t step_[3] = {0, 0, 0};
};

// The taps as the kernels convolve with them (dw_tap), tap-major ((9, C)): the loops over channels
// read them as vectors.
template <typename acc>
std::vector<acc> tap_major(const DwconvParams& p) {
  std::vector<acc> taps(kDwTaps * p.C);
  for (int64_t c = 0; c < p.C; ++c)
    for (int t = 0; t < kDwTaps; ++t) taps[t * p.C + c] = dw_tap<acc>(p, c, t);
  return taps;
}

// src[t] = the input vector of tap t for output column w: rows[dy] at padded column s w + dx.
template <typename acc>
SOLA_CPU_INLINE void tap_sources(const DwconvParams& p, const acc* const (&rows)[3], int64_t w, const acc* (&src)[kDwTaps]) {
  for (int t = 0; t < kDwTaps; ++t) src[t] = rows[t / 3] + (p.stride * w + t % 3) * p.C;
}

// out = the epilogue of bias + the 9 taps' products in tap order (the CUDA kernels' order), one pass
// per output row (r = b * OH + h), plus the addend where there is one (the forward's, or the backward's
// dx_addend); masked where there is a mask (the reversed convolution's input gradient).
// fp32 / fp64 (scalar_t is acc) read x and write out in place, but for relu_input (x's rows converted by
// the window then).
template <typename scalar_t, DwEpilogue kEpi>
SOLA_CPU_CLONES void conv_rows(const DwconvParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<scalar_t>;
  constexpr bool kAccTyped = std::is_same_v<scalar_t, acc>;
  const int64_t C = p.C;
  const bool in_place = kAccTyped && !p.relu_input;
  const acc* bias = static_cast<const acc*>(p.bias);
  const std::vector<acc> taps = tap_major<acc>(p);
  RowWindow<scalar_t, acc> window(p, in_place ? 0 : (p.W + 2) * C);
  std::vector<acc> out(kAccTyped ? 0 : C), zeros(C, acc(0)), g(!kAccTyped && kEpi == DwEpilogue::SiluGrad ? C : 0);
  std::vector<acc> m(!kAccTyped && p.mask.ptr ? C : 0), a(!kAccTyped && p.addend.ptr ? C : 0);
  InPlaceRows<acc> rows(p, zeros.data());
  const acc* const start = bias ? bias : zeros.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.OH, h = r % p.OH;
    const acc* in[3] = {nullptr, nullptr, nullptr};
    if (in_place) rows.move_to(b, h);
    else window.move_to(b, h, in);
    for (int64_t w = 0; w < p.OW; ++w) {
      const acc* src[kDwTaps];
      if (in_place) rows.sources(w, src);
      else tap_sources(p, in, w, src);
      acc* o;
      if constexpr (kAccTyped) o = p.out.row<acc>(b, h, w);
      else o = out.data();
#pragma GCC ivdep  // out, the taps and the input rows are separate buffers
      for (int64_t c = 0; c < C; ++c) {  // the 9 products of a channel in registers, channels in vectors
        acc s = start[c];
#pragma GCC unroll 9
        for (int t = 0; t < kDwTaps; ++t) s += taps[t * C + c] * src[t][c];
        o[c] = s;
      }
      if constexpr (kEpi == DwEpilogue::SiluGrad) {
        const acc* grad = acc_row<scalar_t>(p.grad, b, h, w, C, g.data());
        for (int64_t c = 0; c < C; ++c) o[c] = dw_epilogue<kEpi>(o[c], grad[c]);
      } else if constexpr (kEpi != DwEpilogue::Plain) {
        for (int64_t c = 0; c < C; ++c) o[c] = dw_epilogue<kEpi>(o[c], acc(0));
      }
      add_addend_row<scalar_t>(p, b, h, w, o, a.data());
      mask_row<scalar_t>(p, b, h, w, o, m.data());
      if constexpr (!kAccTyped) store_row(o, C, p.out.row<scalar_t>(b, h, w));
    }
  }
}

// The input gradient at stride 2 for input rows r0 .. r1 (r = b * H + i): input (i, j) sums tap
// (dy, dx) times g[(i + 1 - dy) / 2][(j + 1 - dx) / 2] over the taps where both are whole and inside
// the output, dy and dx descending (the CUDA kernel's order); masked where there is a mask.
template <typename scalar_t>
SOLA_CPU_CLONES void transposed_rows(const DwconvParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<scalar_t>;
  const int64_t C = p.C;
  constexpr bool kAccTyped = std::is_same_v<scalar_t, acc>;
  const std::vector<acc> taps = tap_major<acc>(p);
  std::vector<acc> out(kAccTyped ? 0 : C), g(kAccTyped ? 0 : C), m(!kAccTyped && p.mask.ptr ? C : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.H, i = r % p.H;
    for (int64_t j = 0; j < p.W; ++j) {
      acc* o;
      if constexpr (kAccTyped) o = p.out.row<acc>(b, i, j);
      else o = out.data();
      std::fill(o, o + C, acc(0));
      for (int dy = 2; dy >= 0; --dy) {
        const int64_t m2 = i + 1 - dy;
        if (m2 % 2 || m2 < 0 || m2 / 2 >= p.OH) continue;
        for (int dx = 2; dx >= 0; --dx) {
          const int64_t n2 = j + 1 - dx;
          if (n2 % 2 || n2 < 0 || n2 / 2 >= p.OW) continue;
          const acc* grad = acc_row<scalar_t>(p.grad, b, m2 / 2, n2 / 2, C, g.data());
          const acc* tap = taps.data() + (3 * dy + dx) * C;
#pragma GCC ivdep
          for (int64_t c = 0; c < C; ++c) o[c] += tap[c] * grad[c];
        }
      }
      mask_row<scalar_t>(p, b, i, j, o, m.data());
      if constexpr (!kAccTyped) store_row(o, C, p.out.row<scalar_t>(b, i, j));
    }
  }
}

// part (10, C) = the weight gradient's sums over output rows r0 .. r1.
template <typename scalar_t>
SOLA_CPU_CLONES void wgrad_rows(const DwconvParams& p, int64_t r0, int64_t r1, acc_t<scalar_t>* part) {
  using acc = acc_t<scalar_t>;
  constexpr bool kAccTyped = std::is_same_v<scalar_t, acc>;
  const int64_t C = p.C;
  const bool in_place = kAccTyped && !p.relu_input;
  RowWindow<scalar_t, acc> window(p, in_place ? 0 : (p.W + 2) * C);
  std::vector<acc> g(kAccTyped ? 0 : C), zeros(in_place ? C : 0, acc(0));
  InPlaceRows<acc> rows(p, zeros.data());
  std::fill(part, part + kDwGradRows * C, acc(0));
  acc* bias_sum = part + kDwTaps * C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.OH, h = r % p.OH;
    const acc* in[3] = {nullptr, nullptr, nullptr};
    if (in_place) rows.move_to(b, h);
    else window.move_to(b, h, in);
    for (int64_t w = 0; w < p.OW; ++w) {
      const acc* grad = acc_row<scalar_t>(p.grad, b, h, w, C, g.data());
      const acc* src[kDwTaps];
      if (in_place) rows.sources(w, src);
      else tap_sources(p, in, w, src);
#pragma GCC ivdep  // part, grad and the input rows are separate buffers
      for (int64_t c = 0; c < C; ++c) {
        const acc gc = grad[c];
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
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(p.OW * p.C, 1));
    SOLA_DW_EPILOGUE_SWITCH(p.epilogue, kEpi, [&] {
      at::parallel_for(0, p.B * p.OH, grain, [&](int64_t r0, int64_t r1) { conv_rows<scalar_t, kEpi>(p, r0, r1); });
    });
  });
}

void dwconv_transposed_cpu(const DwconvParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "dwconv_transposed_cpu", [&] {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(p.W * p.C, 1));
    at::parallel_for(0, p.B * p.H, grain, [&](int64_t r0, int64_t r1) { transposed_rows<scalar_t>(p, r0, r1); });
  });
}

void dwconv_wgrad_cpu(const DwconvParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "dwconv_wgrad_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const int64_t rows = p.B * p.OH, chunks = ceil_div(rows, kRowsPerPartial), width = kDwGradRows * p.C;
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
