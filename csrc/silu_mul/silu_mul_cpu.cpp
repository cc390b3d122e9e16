// C++ CPU kernels of silu_mul (silu_mul.h): parallel over chunks of rows (of elements when every input is
// contiguous: narrow rows then cost no per-row overhead), one loop per span that the compiler vectorises
// (cpu_exp is branch-free; the dtype conversions are too).
#include <ATen/Parallel.h>

#include "silu_mul/silu_mul.h"

namespace sola {
namespace {

// Elements per task, about: a task outweighs its scheduling.
constexpr int64_t kGrain = int64_t{1} << 14;

template <typename scalar_t>
SOLA_CPU_CLONES void forward_span(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                  scalar_t* __restrict__ out, int64_t n) {
  using acc = acc_t<scalar_t>;
  for (int64_t c = 0; c < n; ++c)
    out[c] = static_cast<scalar_t>(silu_mul_value(static_cast<acc>(x[c]), static_cast<acc>(g[c])));
}

template <typename scalar_t>
SOLA_CPU_CLONES void backward_span(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                                   scalar_t* __restrict__ dgate, int64_t n) {
  using acc = acc_t<scalar_t>;
  for (int64_t c = 0; c < n; ++c) {
    acc dxv, dgv;
    silu_mul_grads(static_cast<acc>(grad[c]), static_cast<acc>(x[c]), static_cast<acc>(g[c]), dxv, dgv);
    dx[c] = static_cast<scalar_t>(dxv);
    dgate[c] = static_cast<scalar_t>(dgv);
  }
}

// Elements offset within the inputs (x, gate, grad) and within the outputs (row-major (rows, C)).
struct Span {
  int64_t x, gate, grad, out, n;
};

// Calls f(span) over the whole (rows, C) range, in parallel: chunks of elements when every input is
// contiguous (its row stride C), else chunks of whole rows, a span per row.
template <typename F>
void for_spans(const SiluMulParams& p, const F& f) {
  const int64_t C = p.C;
  if (p.x_stride == C && p.gate_stride == C && (!p.grad || p.grad_stride == C)) {
    at::parallel_for(0, p.rows * C, kGrain, [&](int64_t i0, int64_t i1) { f(Span{i0, i0, i0, i0, i1 - i0}); });
    return;
  }
  at::parallel_for(0, p.rows, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(Span{r * p.x_stride, r * p.gate_stride, r * p.grad_stride, r * C, C});
  });
}

}  // namespace

void silu_mul_fwd_cpu(const SiluMulParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "silu_mul_fwd_cpu", [&] {
    const auto* x = static_cast<const scalar_t*>(p.x);
    const auto* gate = static_cast<const scalar_t*>(p.gate);
    auto* out = static_cast<scalar_t*>(p.out);
    for_spans(p, [&](const Span& s) { forward_span(x + s.x, gate + s.gate, out + s.out, s.n); });
  });
}

void silu_mul_bwd_cpu(const SiluMulParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "silu_mul_bwd_cpu", [&] {
    const auto* grad = static_cast<const scalar_t*>(p.grad);
    const auto* x = static_cast<const scalar_t*>(p.x);
    const auto* gate = static_cast<const scalar_t*>(p.gate);
    auto* dx = static_cast<scalar_t*>(p.out);
    auto* dgate = static_cast<scalar_t*>(p.dgate);
    for_spans(p, [&](const Span& s) {
      backward_span(grad + s.grad, x + s.x, gate + s.gate, dx + s.out, dgate + s.out, s.n);
    });
  });
}

}  // namespace sola
