// C++ CPU kernels of LayerNorm (layer_norm.h): the forward and the input gradient parallel over rows,
// each row converted to acc once; the weight and bias gradients summed per fixed chunk of rows, then
// over the chunks in order (bitwise the same for any thread count).
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "layer_norm/layer_norm.h"

namespace sola {
namespace {

// Rows per parameter-gradient partial: at least 64, and at most 256 partials; set by the shape alone,
// so the summation order is too.
int64_t rows_per_partial(int64_t rows) { return std::max<int64_t>(64, ceil_div(rows, 256)); }

// Running sums per lane (lane_sum, backward_rows): a row's element c goes to lane c % kLanes, a tail
// shorter than kLanes from lane 0.
constexpr int kLanes = 16;

// The lanes' total, added pairwise.
template <typename acc>
SOLA_CPU_INLINE acc add_lanes(acc (&part)[kLanes]) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

// sum_{c < n} f(c) in kLanes running sums, added pairwise at the end: the loop vectorises, and the
// rounding error grows with n / kLanes rather than n (one running sum lost 10x torch's accuracy at n = 1000).
template <typename acc, typename F>
SOLA_CPU_INLINE acc lane_sum(int64_t n, F f) {
  acc part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += f(c + l);
  for (int l = 0; c < n; ++c, ++l) part[l] += f(c);
  return add_lanes(part);
}

// mean and rstd of a row (C values), two passes over it: the sum of x - x[0] (a shift, so a large mean
// costs no accuracy), then the squared deviations from the mean.
template <typename acc>
SOLA_CPU_INLINE void row_stats(const acc* x, int64_t C, double eps, acc& mean, acc& rstd) {
  const acc shift = x[0];
  mean = shift + lane_sum<acc>(C, [&](int64_t c) { return x[c] - shift; }) / acc(C);
  const acc m = mean;
  const acc v = lane_sum<acc>(C, [&](int64_t c) { return (x[c] - m) * (x[c] - m); });
  rstd = row_rstd(v, C, eps);
}

// Row r of a (rows, C) tensor as acc values (cpu_math.h's acc_row: in place for fp32 / fp64).
template <typename scalar_t, typename acc>
SOLA_CPU_INLINE const acc* acc_row(const void* t, int64_t r, int64_t C, acc* buf) {
  return sola::acc_row(static_cast<const scalar_t*>(t) + r * C, C, buf);
}

template <typename scalar_t>
SOLA_CPU_CLONES void forward_rows(const LayerNormParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<scalar_t>;
  const int64_t C = p.C;
  const acc* w = static_cast<const acc*>(p.weight);
  const acc* b = static_cast<const acc*>(p.bias);
  constexpr bool kAccTyped = std::is_same_v<scalar_t, acc>;
  std::vector<acc> x_buf(kAccTyped ? 0 : C), out_buf(kAccTyped ? 0 : C);
  for (int64_t r = r0; r < r1; ++r) {
    const acc* x = acc_row<scalar_t>(p.x, r, C, x_buf.data());
    acc mean, rstd;
    row_stats(x, C, p.eps, mean, rstd);
    static_cast<acc*>(p.mean)[r] = mean;
    static_cast<acc*>(p.rstd)[r] = rstd;
    acc* out = out_buf.data();
    if constexpr (kAccTyped) out = static_cast<acc*>(p.out) + r * C;
#pragma GCC ivdep  // out and the rows are separate buffers
    for (int64_t c = 0; c < C; ++c) {
      const acc y = (x[c] - mean) * rstd;
      out[c] = (w ? y * w[c] : y) + (b ? b[c] : acc(0));
    }
    if constexpr (!kAccTyped) store_row(out, C, static_cast<scalar_t*>(p.out) + r * C);
  }
}

// dx of rows r0 .. r1; part (2, C): their sums of grad * xhat and of grad (the weight and bias
// gradients' partials), when not null. One pass over a row makes g = grad * weight (kept: the second
// pass must take the same rounded values), the two row sums (lane_sum's lanes and order) and the
// partials; a second writes dx. Both compute xhat from x, which fp32 / fp64 read in place, as grad
// (copying both rows and keeping xhat was a third of the time at C = 64).
template <typename scalar_t>
SOLA_CPU_CLONES void backward_rows(const LayerNormParams& p, int64_t r0, int64_t r1, acc_t<scalar_t>* part) {
  using acc = acc_t<scalar_t>;
  constexpr bool kAccTyped = std::is_same_v<scalar_t, acc>;
  const int64_t C = p.C;
  const acc* w = static_cast<const acc*>(p.weight);
  std::vector<acc> x_buf(kAccTyped ? 0 : C), dy_buf(kAccTyped ? 0 : C), out_buf(kAccTyped ? 0 : C), g(C);
  std::vector<acc> addend_buf(!kAccTyped && p.addend ? C : 0);
  if (part) std::fill(part, part + 2 * C, acc(0));
  for (int64_t r = r0; r < r1; ++r) {
    const acc* x = acc_row<scalar_t>(p.x, r, C, x_buf.data());
    const acc* dy = acc_row<scalar_t>(p.grad, r, C, dy_buf.data());
    const acc mean = static_cast<const acc*>(p.mean)[r], rstd = static_cast<const acc*>(p.rstd)[r];
    acc sum_g[kLanes] = {}, sum_gx[kLanes] = {};
    const auto step = [&](int64_t c, int l) {
      const acc xh = (x[c] - mean) * rstd;
      const acc gc = w ? dy[c] * w[c] : dy[c];
      g[c] = gc;
      sum_g[l] += gc;
      sum_gx[l] += gc * xh;
      if (part) {
        part[c] += dy[c] * xh;
        part[C + c] += dy[c];
      }
    };
    int64_t c = 0;  // lane_sum's lanes and order
    for (; c + kLanes <= C; c += kLanes)
#pragma GCC ivdep  // part, g and the rows are separate buffers
      for (int l = 0; l < kLanes; ++l) step(c + l, l);
    for (int l = 0; c < C; ++c, ++l) step(c, l);
    const acc mean_g = add_lanes(sum_g) / acc(C), mean_gx = add_lanes(sum_gx) / acc(C);
    const auto dx = [&](int64_t e) { return rstd * (g[e] - mean_g - ((x[e] - mean) * rstd) * mean_gx); };
    acc* out = out_buf.data();
    if constexpr (kAccTyped) out = static_cast<acc*>(p.out) + r * C;
    if (p.addend) {
      const acc* addend = acc_row<scalar_t>(p.addend, r, C, addend_buf.data());
#pragma GCC ivdep  // out and the rows are separate buffers
      for (int64_t e = 0; e < C; ++e) out[e] = dx(e) + addend[e];
    } else {
#pragma GCC ivdep
      for (int64_t e = 0; e < C; ++e) out[e] = dx(e);
    }
    if constexpr (!kAccTyped) store_row(out, C, static_cast<scalar_t*>(p.out) + r * C);
  }
}

}  // namespace

void layer_norm_fwd_cpu(const LayerNormParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "layer_norm_fwd_cpu", [&] {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / p.C);
    at::parallel_for(0, p.rows, grain, [&](int64_t r0, int64_t r1) { forward_rows<scalar_t>(p, r0, r1); });
  });
}

void layer_norm_bwd_cpu(const LayerNormParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "layer_norm_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const bool params = p.dweight || p.dbias;
    const int64_t step = rows_per_partial(p.rows), chunks = ceil_div(p.rows, step), C = p.C;
    std::vector<acc> partials(params ? chunks * 2 * C : 0);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        backward_rows<scalar_t>(p, k * step, std::min(p.rows, (k + 1) * step),
                                params ? partials.data() + k * 2 * C : nullptr);
    });
    if (!params) return;
    at::parallel_for(0, 2 * C, 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        acc s = acc(0);
        for (int64_t k = 0; k < chunks; ++k) s += partials[k * 2 * C + i];
        acc* dst = static_cast<acc*>(i < C ? p.dweight : p.dbias);
        if (dst) dst[i % C] = s;
      }
    });
  });
}

}  // namespace sola
