// C++ CPU kernels of non-causal softmax attention, forward and backward.
// Tiled with an online softmax: the only score buffer is one kBlockM x kBlockN tile per task,
// never Nq x Nk. The backward recomputes the scores from q, k and the saved lse; each head is
// one task summing in a fixed order, so gradients are bitwise reproducible.
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "softmax_attention/softmax_attention.h"

namespace sola {
namespace {

constexpr int64_t kBlockM = 32;  // query rows per tile
constexpr int64_t kBlockN = 64;  // key rows per tile

// Copies rows [n0, n1) of one head into a dense acc-typed (n1 - n0) x d buffer.
template <typename scalar_t, typename acc>
void load_tile(const View4& x, int64_t b, int64_t h, int64_t n0, int64_t n1, int64_t d, acc* dst) {
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* row = x.row<const scalar_t>(b, h, n);
    for (int64_t e = 0; e < d; ++e) dst[(n - n0) * d + e] = static_cast<acc>(row[e]);
  }
}

// The same rows stored transposed, d x (n1 - n0), so products over keys become contiguous axpys.
template <typename scalar_t, typename acc>
void load_tile_transposed(const View4& x, int64_t b, int64_t h, int64_t n0, int64_t n1, int64_t d, acc* dst) {
  const int64_t cols = n1 - n0;
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* row = x.row<const scalar_t>(b, h, n);
    for (int64_t e = 0; e < d; ++e) dst[e * cols + (n - n0)] = static_cast<acc>(row[e]);
  }
}

// y[0, n) += alpha * x[0, n)
template <typename acc>
void axpy(acc alpha, const acc* x, int64_t n, acc* y) {
  for (int64_t e = 0; e < n; ++e) y[e] += alpha * x[e];
}

// x[0, n) = exp(x - shift), a loop of its own so that it vectorises.
template <typename acc>
void exp_shifted(acc* x, int64_t n, acc shift) {
  for (int64_t c = 0; c < n; ++c) x[c] = cpu_exp(x[c] - shift);
}

// y[c] += sum_e x[e] * mt[e][c] for c < cols: row-vector times a transposed tile, vectorisable.
template <typename acc>
void row_times_tile(const acc* x, const acc* mt, int64_t d, int64_t cols, acc* y) {
  for (int64_t e = 0; e < d; ++e) {
    const acc xe = x[e];
    const acc* m_row = mt + e * cols;
    for (int64_t c = 0; c < cols; ++c) y[c] += xe * m_row[c];
  }
}


template <typename scalar_t>
void fwd(const SoftmaxAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  const int64_t Dk = p.Dk, Dv = p.Dv;
  const int64_t q_tiles = (p.Nq + kBlockM - 1) / kBlockM;
  const acc scale = static_cast<acc>(p.scale);
  acc* lse_all = static_cast<acc*>(p.lse);

  at::parallel_for(0, p.B * p.H * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> q(kBlockM * Dk), kt(Dk * kBlockN), v(kBlockN * Dv), o(kBlockM * Dv);
    std::vector<acc> s(kBlockN), m(kBlockM), l(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_tiles, b = bh / p.H, h = bh % p.H;
      const int64_t i0 = (task % q_tiles) * kBlockM, i1 = std::min(p.Nq, i0 + kBlockM), rows = i1 - i0;
      load_tile<scalar_t>(p.q, b, h, i0, i1, Dk, q.data());
      std::fill(o.begin(), o.end(), acc(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc>::infinity());
      std::fill(l.begin(), l.end(), acc(0));
      for (int64_t j0 = 0; j0 < p.Nk; j0 += kBlockN) {
        const int64_t j1 = std::min(p.Nk, j0 + kBlockN), cols = j1 - j0;
        load_tile_transposed<scalar_t>(p.k, b, h, j0, j1, Dk, kt.data());
        load_tile<scalar_t>(p.v, b, h, j0, j1, Dv, v.data());
        for (int64_t r = 0; r < rows; ++r) {
          std::fill(s.begin(), s.end(), acc(0));
          row_times_tile(&q[r * Dk], kt.data(), Dk, cols, s.data());
          acc tile_max = -std::numeric_limits<acc>::infinity();
          for (int64_t c = 0; c < cols; ++c) {
            s[c] *= scale;
            tile_max = std::max(tile_max, s[c]);
          }
          const acc m_new = std::max(m[r], tile_max);
          // While every score so far is -inf nothing is accumulated (a row of only -inf ends as
          // 0/0 = NaN, like torch); exp(-inf - m_new) = 0 drops the empty start otherwise.
          const bool none_yet = m_new == -std::numeric_limits<acc>::infinity();
          const acc alpha = none_yet ? acc(0) : cpu_exp(m[r] - m_new);
          // Probabilities in place of the scores.
          // A NaN score never wins the max; it still makes the row (and lse) NaN, like torch.
          if (none_yet) {
            for (int64_t c = 0; c < cols; ++c) s[c] = std::isnan(s[c]) ? s[c] : acc(0);
          } else {
            exp_shifted(s.data(), cols, m_new);
          }
          acc* o_row = &o[r * Dv];
          for (int64_t e = 0; e < Dv; ++e) o_row[e] *= alpha;
          acc p_sum = acc(0);
          for (int64_t c = 0; c < cols; ++c) {
            p_sum += s[c];
            axpy(s[c], &v[c * Dv], Dv, o_row);
          }
          l[r] = l[r] * alpha + p_sum;
          m[r] = m_new;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* out = p.out.row<scalar_t>(b, h, i0 + r);
        const acc inv_l = acc(1) / l[r];
        for (int64_t e = 0; e < Dv; ++e) out[e] = static_cast<scalar_t>(o[r * Dv + e] * inv_l);
        lse_all[bh * p.Nq + i0 + r] = row_lse(m[r], l[r]);
      }
    }
  });
}

template <typename scalar_t>
void bwd(const SoftmaxAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  const int64_t Dk = p.Dk, Dv = p.Dv;
  const acc scale = static_cast<acc>(p.scale);
  const acc* lse_all = static_cast<const acc*>(p.lse);
  acc* delta_all = static_cast<acc*>(p.delta);

  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> q(kBlockM * Dk), g(kBlockM * Dv), k(kBlockN * Dk), kt(Dk * kBlockN), vt(Dv * kBlockN);
    std::vector<acc> s(kBlockN), dp(kBlockN), dk(kBlockN * Dk), dv(kBlockN * Dv), dq(p.Nq * Dk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const acc* lse = lse_all + bh * p.Nq;
      acc* delta = delta_all + bh * p.Nq;
      // delta_i = rowsum(dO_i * O_i) - grad_lse_i: the softmax Jacobian's correction term.
      const acc* grad_lse = p.grad_lse ? static_cast<const acc*>(p.grad_lse) + bh * p.Nq : nullptr;
      for (int64_t i = 0; i < p.Nq; ++i) {
        const scalar_t* go = p.grad_out.row<const scalar_t>(b, h, i);
        const scalar_t* o = p.out.row<const scalar_t>(b, h, i);
        acc d = acc(0);
        for (int64_t e = 0; e < Dv; ++e) d += static_cast<acc>(go[e]) * static_cast<acc>(o[e]);
        delta[i] = grad_lse ? d - grad_lse[i] : d;
      }
      std::fill(dq.begin(), dq.end(), acc(0));
      for (int64_t j0 = 0; j0 < p.Nk; j0 += kBlockN) {
        const int64_t j1 = std::min(p.Nk, j0 + kBlockN), cols = j1 - j0;
        load_tile<scalar_t>(p.k, b, h, j0, j1, Dk, k.data());
        load_tile_transposed<scalar_t>(p.k, b, h, j0, j1, Dk, kt.data());
        load_tile_transposed<scalar_t>(p.v, b, h, j0, j1, Dv, vt.data());
        std::fill(dk.begin(), dk.end(), acc(0));
        std::fill(dv.begin(), dv.end(), acc(0));
        for (int64_t i0 = 0; i0 < p.Nq; i0 += kBlockM) {
          const int64_t i1 = std::min(p.Nq, i0 + kBlockM), rows = i1 - i0;
          load_tile<scalar_t>(p.q, b, h, i0, i1, Dk, q.data());
          load_tile<scalar_t>(p.grad_out, b, h, i0, i1, Dv, g.data());
          for (int64_t r = 0; r < rows; ++r) {
            const acc* q_row = &q[r * Dk];
            const acc* g_row = &g[r * Dv];
            acc* dq_row = &dq[(i0 + r) * Dk];
            std::fill(s.begin(), s.end(), acc(0));
            std::fill(dp.begin(), dp.end(), acc(0));
            row_times_tile(q_row, kt.data(), Dk, cols, s.data());   // scores / scale
            row_times_tile(g_row, vt.data(), Dv, cols, dp.data());  // dO_i . v_j
            // prob and dS for the whole tile row first (vectorised exp), then the three products.
            const acc lse_i = lse[i0 + r], delta_i = delta[i0 + r];
            for (int64_t c = 0; c < cols; ++c) {
              const acc prob = cpu_exp(scale * s[c] - lse_i);
              s[c] = prob;
              dp[c] = prob * (dp[c] - delta_i) * scale;
            }
            for (int64_t c = 0; c < cols; ++c) {
              axpy(s[c], g_row, Dv, &dv[c * Dv]);    // dv_j += p_ij dO_i
              axpy(dp[c], q_row, Dk, &dk[c * Dk]);   // dk_j += dS_ij q_i
              axpy(dp[c], &k[c * Dk], Dk, dq_row);   // dq_i += dS_ij k_j
            }
          }
        }
        for (int64_t j = j0; j < j1; ++j) {
          scalar_t* dk_out = p.dk.row<scalar_t>(b, h, j);
          scalar_t* dv_out = p.dv.row<scalar_t>(b, h, j);
          for (int64_t e = 0; e < Dk; ++e) dk_out[e] = static_cast<scalar_t>(dk[(j - j0) * Dk + e]);
          for (int64_t e = 0; e < Dv; ++e) dv_out[e] = static_cast<scalar_t>(dv[(j - j0) * Dv + e]);
        }
      }
      for (int64_t i = 0; i < p.Nq; ++i) {
        scalar_t* dq_out = p.dq.row<scalar_t>(b, h, i);
        for (int64_t e = 0; e < Dk; ++e) dq_out[e] = static_cast<scalar_t>(dq[i * Dk + e]);
      }
    }
  });
}

}  // namespace

void softmax_attention_fwd_cpu(const SoftmaxAttentionParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "softmax_attention_fwd_cpu", [&] { fwd<scalar_t>(p); });
}

void softmax_attention_bwd_cpu(const SoftmaxAttentionParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "softmax_attention_bwd_cpu", [&] { bwd<scalar_t>(p); });
}

}  // namespace sola
