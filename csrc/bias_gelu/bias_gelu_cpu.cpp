// C++ CPU kernels of bias_gelu (bias_gelu.h). The forward, and the backward without dbias, run parallel
// over chunks of elements cut into row pieces (narrow rows cost no per-row task). The backward with
// dbias sums each column's dx values per fixed chunk of rows (a partial per chunk and column block), then
// over the chunks in order: the order is set by the shape alone, so dbias is bitwise the same for any
// thread count. The loops vectorise for fp32 math (cpu_erf_tanh.h's GELU erf form and tanh); fp64 calls
// libm's erf and tanh.
#include <ATen/Parallel.h>

#include <vector>

#include "bias_gelu/bias_gelu.h"

namespace sola {
namespace {

// Elements per task, about: a task outweighs its scheduling.
constexpr int64_t kGrain = int64_t{1} << 14;
// The backward's columns per task when it sums dbias (a partial row of this many acc values stays in cache).
constexpr int64_t kSumColumns = 4096;

// Rows per dbias partial: at least 64, and at most 256 partials; set by the shape alone, so the
// summation order is too.
int64_t rows_per_partial(int64_t rows) { return std::max<int64_t>(64, ceil_div(rows, 256)); }

template <bool kTanh, typename scalar_t>
SOLA_CPU_CLONES void forward_span(const scalar_t* __restrict__ x, const acc_t<scalar_t>* __restrict__ bias,
                                  scalar_t* __restrict__ out, int64_t n) {
  using acc = acc_t<scalar_t>;
  if (bias) {
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(gelu_value<kTanh>(static_cast<acc>(x[c]) + bias[c]));
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(gelu_value<kTanh>(static_cast<acc>(x[c])));
  }
}

// dx of n elements; with kSum, part += each dx value in acc, before its rounding. bias: null for none.
template <bool kTanh, bool kSum, typename scalar_t>
SOLA_CPU_CLONES void backward_span(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                   const acc_t<scalar_t>* __restrict__ bias, scalar_t* __restrict__ dx,
                                   acc_t<scalar_t>* __restrict__ part, int64_t n) {
  using acc = acc_t<scalar_t>;
  if (bias) {
    for (int64_t c = 0; c < n; ++c) {
      const acc d = gelu_grad<kTanh>(static_cast<acc>(grad[c]), static_cast<acc>(x[c]) + bias[c]);
      dx[c] = static_cast<scalar_t>(d);
      if constexpr (kSum) part[c] += d;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const acc d = gelu_grad<kTanh>(static_cast<acc>(grad[c]), static_cast<acc>(x[c]));
      dx[c] = static_cast<scalar_t>(d);
      if constexpr (kSum) part[c] += d;
    }
  }
}

// Calls f(r, c0, c1) on pieces of rows that cover (rows, C), in parallel chunks of about kGrain elements.
template <typename F>
void for_row_pieces(int64_t rows, int64_t C, const F& f) {
  at::parallel_for(0, rows * C, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t r = i0 / C, c0 = i0 % C; i0 < i1; ++r, c0 = 0) {
      const int64_t n = std::min(C - c0, i1 - i0);
      f(r, c0, c0 + n);
      i0 += n;
    }
  });
}

}  // namespace

void bias_gelu_fwd_cpu(const BiasGeluParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "bias_gelu_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const auto* x = static_cast<const scalar_t*>(p.x);
    const auto* bias = static_cast<const acc*>(p.bias);
    auto* out = static_cast<scalar_t*>(p.out);
    SOLA_GELU_SWITCH(p.tanh, kTanh, [&] {
      for_row_pieces(p.rows, p.C, [&](int64_t r, int64_t c0, int64_t c1) {
        forward_span<kTanh>(x + r * p.x_stride + c0, bias ? bias + c0 : nullptr, out + r * p.C + c0, c1 - c0);
      });
    });
  });
}

void bias_gelu_bwd_cpu(const BiasGeluParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "bias_gelu_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const auto* grad = static_cast<const scalar_t*>(p.grad);
    const auto* x = static_cast<const scalar_t*>(p.x);
    const auto* bias = static_cast<const acc*>(p.bias);
    auto* dx = static_cast<scalar_t*>(p.out);
    const int64_t C = p.C;
    SOLA_GELU_SWITCH(p.tanh, kTanh, [&] {
      if (!p.dbias) {
        for_row_pieces(p.rows, C, [&](int64_t r, int64_t c0, int64_t c1) {
          backward_span<kTanh, false>(grad + r * p.grad_stride + c0, x + r * p.x_stride + c0,
                                      bias ? bias + c0 : nullptr, dx + r * C + c0, nullptr, c1 - c0);
        });
        return;
      }
      // Partial k, columns of block b: the sum over rows k * step .. (k + 1) * step, row by row.
      const int64_t step = rows_per_partial(p.rows), chunks = ceil_div(p.rows, step);
      const int64_t blocks = ceil_div(C, kSumColumns);
      std::vector<acc> partials(chunks * C, acc(0));
      at::parallel_for(0, chunks * blocks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t k = t / blocks, c0 = t % blocks * kSumColumns, c1 = std::min(C, c0 + kSumColumns);
          for (int64_t r = k * step; r < std::min(p.rows, (k + 1) * step); ++r)
            backward_span<kTanh, true>(grad + r * p.grad_stride + c0, x + r * p.x_stride + c0,
                                       bias ? bias + c0 : nullptr, dx + r * C + c0, partials.data() + k * C + c0,
                                       c1 - c0);
        }
      });
      auto* dbias = static_cast<acc*>(p.dbias);
      at::parallel_for(0, C, 1024, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          acc s = acc(0);
          for (int64_t k = 0; k < chunks; ++k) s += partials[k * C + c];
          dbias[c] = s;
        }
      });
    });
  });
}

}  // namespace sola
