// C++ CPU kernels of the fused feature map + rotary embedding (rope.h), forward and backward.
// Parallel over rows (B * H * N); each row in acc_t (fp32, fp64 for fp64 inputs), compiled per ISA
// (SOLA_CPU_CLONES) so the loops over a row vectorise.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_math.h"
#include "rope/rope.h"

namespace sola {
namespace {

// Rows per parallel task: about 16 K elements, so small problems stay on one thread.
int64_t row_grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(D, 1)); }

// A row's work goes through acc buffers in passes that each vectorise: the element-wise ones
// (conversion, phi, phi') over contiguous columns, the pair rotation over interleaved ones.
template <typename scalar_t, FeatureMap FM>
SOLA_CPU_CLONES void fwd_rows(const RopeParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<scalar_t>;
  const int64_t D = p.D, half = D / 2;
  std::vector<acc> f(D), rot(D);
  for (int64_t r = r0; r < r1; ++r) {
    const auto [b, h, n] = rope_row(p, r);
    const acc* c = static_cast<const acc*>(p.cos) + n * half;
    const acc* s = static_cast<const acc*>(p.sin) + n * half;
    load_row(p.x.row<const scalar_t>(b, h, n), D, f.data());
    for (int64_t e = 0; e < D; ++e) f[e] = Phi<FM>::f(f[e]);
    rotate_row(f.data(), c, s, D, rot.data());
    store_row(rot.data(), D, p.rot.row<scalar_t>(b, h, n));
    if (p.feat.ptr) store_row(f.data(), D, p.feat.row<scalar_t>(b, h, n));
  }
}

template <typename scalar_t, FeatureMap FM>
SOLA_CPU_CLONES void bwd_rows(const RopeParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<scalar_t>;
  const int64_t D = p.D, half = D / 2;
  std::vector<acc> x(D), g(D), gf(D, acc(0)), d(D);
  for (int64_t r = r0; r < r1; ++r) {
    const auto [b, h, n] = rope_row(p, r);
    const acc* c = static_cast<const acc*>(p.cos) + n * half;
    const acc* s = static_cast<const acc*>(p.sin) + n * half;
    load_row(p.x.row<const scalar_t>(b, h, n), D, x.data());
    load_row(p.grad_rot.row<const scalar_t>(b, h, n), D, g.data());
    if (p.grad_feat.ptr) load_row(p.grad_feat.row<const scalar_t>(b, h, n), D, gf.data());
    for (int64_t i = 0; i < half; ++i)
      unrotate_pair(g[2 * i], g[2 * i + 1], gf[2 * i], gf[2 * i + 1], c[i], s[i], d[2 * i], d[2 * i + 1]);
    for (int64_t e = 0; e < D; ++e) d[e] = through_phi(d[e], Phi<FM>::df(x[e]));
    store_row(d.data(), D, p.dx.row<scalar_t>(b, h, n));
  }
}

template <bool kBackward>
void run_rows(const RopeParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "rope_cpu", [&] {
    SOLA_FEATURE_MAP_SWITCH(p.feature_map, kFM, [&] {
      at::parallel_for(0, p.B * p.H * p.N, row_grain(p.D), [&](int64_t r0, int64_t r1) {
        if constexpr (kBackward) bwd_rows<scalar_t, kFM>(p, r0, r1);
        else fwd_rows<scalar_t, kFM>(p, r0, r1);
      });
    });
  });
}

}  // namespace

void rope_fwd_cpu(const RopeParams& p) { run_rows<false>(p); }
void rope_bwd_cpu(const RopeParams& p) { run_rows<true>(p); }

}  // namespace sola
