// C++ CPU kernels of non-causal softmax attention, forward and backward.
// Tiled with an online softmax: the only score buffers are kFwdBlockN x kBlockM (forward, transposed)
// or kBlockM x kBlockN (backward) tiles per task, never Nq x Nk. The tile products run through cpu::gemm
// (register-blocked, one build per ISA), the softmax steps through SOLA_CPU_CLONES functions. The
// backward recomputes the scores from q, k and the saved lse; every gradient entry is summed over the
// same tiles in the same order whichever way the tasks are split (per head, or per key tile and per
// query tile), so gradients are bitwise reproducible.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_math.h"
#include "softmax_attention/softmax_attention.h"

namespace sola {
namespace {

constexpr int64_t kBlockM = 64;      // query rows per tile
constexpr int64_t kBlockN = 64;      // the backward's key rows per tile: its score tiles' row pitch
constexpr int64_t kFwdBlockN = 256;  // the forward's: a query's rescale amortised over more keys

// Copies rows [n0, n1) of one head into a dense acc-typed buffer of row pitch ld >= d (columns from d
// on are left as they are: the callers' zero padding).
template <typename scalar_t, typename acc>
void load_tile(const View4& x, int64_t b, int64_t h, int64_t n0, int64_t n1, int64_t d, acc* dst, int64_t ld) {
  for (int64_t n = n0; n < n1; ++n) load_row(x.row<const scalar_t>(b, h, n), d, dst + (n - n0) * ld);
}

// The same rows transposed, d x (n1 - n0) with row pitch ld; the columns past n1 - n0 zero. Blocks of
// kRows rows go over together, so each destination row is written a cache line at a time: a row at a
// time wrote one element per destination row, whose lines (ld apart, ld a power of two) fell into a
// few L1 sets and were evicted between writes (~15% of the forward's time at Nq = 196, Dk = 64).
template <typename scalar_t, typename acc>
void load_tile_transposed(const View4& x, int64_t b, int64_t h, int64_t n0, int64_t n1, int64_t d, acc* dst,
                          int64_t ld) {
  constexpr int64_t kRows = 64 / sizeof(acc);
  if (n1 - n0 < ld)
    for (int64_t e = 0; e < d; ++e) std::fill(dst + e * ld + (n1 - n0), dst + (e + 1) * ld, acc(0));
  const scalar_t* rows[kRows];
  for (int64_t nb = n0; nb < n1; nb += kRows) {
    const int64_t count = std::min(kRows, n1 - nb);
    for (int64_t r = 0; r < count; ++r) rows[r] = x.row<const scalar_t>(b, h, nb + r);
    for (int64_t e = 0; e < d; ++e) {
      acc* out = dst + e * ld + (nb - n0);
      for (int64_t r = 0; r < count; ++r) out[r] = static_cast<acc>(rows[r][e]);
    }
  }
}

// One online-softmax step over a transposed score tile st (K Q^T: keys rows of `queries` columns padded
// to whole vectors, row pitch kBlockM), so the max and the sums run down the columns, a lane per query,
// with no reduction across lanes. st becomes the probabilities exp(scale s - m_new); o's rows (pitch
// ldo) are rescaled by exp(m_old - m_new) where the max moved; the running max m and sum l move on.
template <typename acc>
SOLA_CPU_CLONES void online_softmax_step(acc* st, int64_t keys, int64_t queries, acc scale, acc* m, acc* l,
                                         acc* o, int64_t ldo) {
  constexpr acc kNegInf = -std::numeric_limits<acc>::infinity();
  const int64_t qp = cpu::padded_cols<acc>(queries);
  acc m_new[kBlockM];
  for (int64_t c = 0; c < qp; ++c) m_new[c] = kNegInf;
  for (int64_t j = 0; j < keys; ++j) {
    acc* row = st + j * kBlockM;
    for (int64_t c = 0; c < qp; ++c) {
      const acc x = row[c] * scale;
      row[c] = x;
      m_new[c] = x > m_new[c] ? x : m_new[c];  // a NaN score never wins the max
    }
  }
  for (int64_t c = 0; c < qp; ++c) m_new[c] = m[c] > m_new[c] ? m[c] : m_new[c];
  // The tile's sums come with the exps (in key order) and join l after its rescale.
  acc tile_sum[kBlockM];
  for (int64_t c = 0; c < qp; ++c) tile_sum[c] = acc(0);
  // While every score so far is -inf nothing is accumulated (a row of only -inf ends as 0/0 = NaN,
  // like torch): such a column subtracts 0, so its -inf scores give exp(-inf) = 0 and its NaNs stay
  // NaN; exp(-inf - m_new) = 0 drops the empty start otherwise. The scaled scores are <= m_new
  // exactly (stored rounded above, no fused multiply-add).
  acc m_sub[kBlockM];
  for (int64_t c = 0; c < qp; ++c) m_sub[c] = m_new[c] == kNegInf ? acc(0) : m_new[c];
  for (int64_t j = 0; j < keys; ++j) {
    acc* row = st + j * kBlockM;
    for (int64_t c = 0; c < qp; ++c) {
      row[c] = cpu_exp_nonpositive(row[c] - m_sub[c]);
      tile_sum[c] += row[c];
    }
  }
  for (int64_t c = 0; c < queries; ++c) {
    if (m_new[c] == m[c]) continue;
    const acc alpha = m[c] == kNegInf ? acc(0) : cpu_exp_nonpositive(m[c] - m_new[c]);
    l[c] *= alpha;
    for (int64_t e = 0; e < ldo; ++e) o[c * ldo + e] *= alpha;
    m[c] = m_new[c];
  }
  for (int64_t c = 0; c < qp; ++c) l[c] += tile_sum[c];
}

// dst[i] += src[i], i < n: a tile's product joins its running sum. Summing each tile apart first keeps
// an entry's rounding a chain of (tile length + tiles) additions rather than one of every key (query):
// in fp32 a chain of Nk = 16k products erred 25-40x more than torch's matmuls and SDPA (error ~ sqrt(chain)).
template <typename acc>
SOLA_CPU_CLONES void add_into(acc* dst, const acc* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// The backward's tile step: s (q k^T) becomes P = exp(scale s - lse_i), dp (dO v^T) becomes
// dS * scale = P (dp - delta_i) scale.
template <typename acc>
SOLA_CPU_CLONES void probs_and_dscores(acc* s, acc* dp, int64_t rows, int64_t cols, acc scale, const acc* lse,
                                       const acc* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    acc* s_row = s + r * kBlockN;
    acc* dp_row = dp + r * kBlockN;
    const acc lse_r = backward_lse(lse[r]);
    for (int64_t c = 0; c < cols; ++c) {
      const acc prob = cpu_exp(scale * s_row[c] - lse_r);
      s_row[c] = prob;
      dp_row[c] = prob * (dp_row[c] - delta[r]) * scale;
    }
  }
}

template <typename scalar_t>
void fwd(const SoftmaxAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  const int64_t Dk = p.Dk, Dv = p.Dv, Dv_p = cpu::padded_cols<acc>(Dv);
  // Query rows per task: up to 4 tiles, so each k / v tile loaded serves more rows, while there are
  // still two tasks a thread. Every row's sums run the same way for any block. The task's queries are
  // transposed once (q^T), so the scores come out transposed (K q^T) with no key tile transposed.
  int64_t block_m = 4 * kBlockM;
  while (block_m > kBlockM && p.B * p.H * ceil_div(p.Nq, block_m) < 2 * at::get_num_threads()) block_m /= 2;
  const int64_t q_tiles = ceil_div(p.Nq, block_m);
  const acc scale = static_cast<acc>(p.scale);
  acc* lse_all = static_cast<acc*>(p.lse);

  at::parallel_for(0, p.B * p.H * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> qt(Dk * block_m), k(kFwdBlockN * Dk), v(kFwdBlockN * Dv_p), o(block_m * Dv_p), pv(kBlockM * Dv_p);
    std::vector<acc> st(kFwdBlockN * kBlockM), m(block_m), l(block_m);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_tiles, b = bh / p.H, h = bh % p.H;
      const int64_t i0 = (task % q_tiles) * block_m, i1 = std::min(p.Nq, i0 + block_m), rows = i1 - i0;
      // q^T a kBlockM-query tile at a time, each Dk x kBlockM dense: the score product streams one
      // tile per row block of keys, and with a row pitch of block_m (up to 1 KB) its rows fell into a
      // few L1 sets and came from L2 every time.
      for (int64_t r0 = 0; r0 < rows; r0 += kBlockM)
        load_tile_transposed<scalar_t>(p.q, b, h, i0 + r0, std::min(i1, i0 + r0 + kBlockM), Dk, qt.data() + r0 * Dk,
                                       kBlockM);
      std::fill(o.begin(), o.end(), acc(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc>::infinity());
      std::fill(l.begin(), l.end(), acc(0));
      for (int64_t j0 = 0; j0 < p.Nk; j0 += kFwdBlockN) {
        const int64_t j1 = std::min(p.Nk, j0 + kFwdBlockN), keys = j1 - j0;
        load_tile<scalar_t>(p.k, b, h, j0, j1, Dk, k.data(), Dk);
        load_tile<scalar_t>(p.v, b, h, j0, j1, Dv, v.data(), Dv_p);
        for (int64_t r0 = 0; r0 < rows; r0 += kBlockM) {
          const int64_t sub = std::min(kBlockM, rows - r0);
          cpu::gemm(keys, cpu::padded_cols<acc>(sub), Dk, k.data(), Dk, qt.data() + r0 * Dk, kBlockM, st.data(),
                    kBlockM, false);  // K Q^T
          online_softmax_step(st.data(), keys, sub, scale, m.data() + r0, l.data() + r0, o.data() + r0 * Dv_p, Dv_p);
          // o += P v: the tile's P v first (add_into), kBlockN keys at a time: their rows of v stay in
          // L1 while the row block streams them (the whole tile, up to 256 x 256 floats, is L2's).
          for (int64_t c0 = 0; c0 < keys; c0 += kBlockN)
            cpu::gemm_at(sub, Dv_p, std::min(kBlockN, keys - c0), st.data() + c0 * kBlockM, kBlockM,
                         v.data() + c0 * Dv_p, Dv_p, pv.data(), Dv_p, c0 > 0);
          add_into(o.data() + r0 * Dv_p, pv.data(), sub * Dv_p);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* out = p.out.row<scalar_t>(b, h, i0 + r);
        const acc inv_l = acc(1) / l[r];
        for (int64_t e = 0; e < Dv; ++e) out[e] = static_cast<scalar_t>(o[r * Dv_p + e] * inv_l);
        lse_all[bh * p.Nq + i0 + r] = row_lse(m[r], l[r]);
      }
    }
  });
}

// One backward task's tiles: a key tile (k; k^T, v^T for the scores) and a query tile (q, dO), and
// their P / dS tile. Row pitches padded to whole vectors (cpu::gemm's column step); the padding stays 0.
template <typename scalar_t>
struct BwdTiles {
  using acc = acc_t<scalar_t>;
  const SoftmaxAttentionParams& p;
  int64_t b, h, Dk_p, Dv_p;
  std::vector<acc> q, g, k, kt, vt, s, dp, part;  // part: one tile's gradient product (add_into)

  explicit BwdTiles(const SoftmaxAttentionParams& params)
      : p(params), b(0), h(0), Dk_p(cpu::padded_cols<acc>(p.Dk)), Dv_p(cpu::padded_cols<acc>(p.Dv)),
        q(kBlockM * Dk_p), g(kBlockM * Dv_p), k(kBlockN * Dk_p), kt(p.Dk * kBlockN), vt(p.Dv * kBlockN),
        s(kBlockM * kBlockN), dp(kBlockM * kBlockN), part(std::max(kBlockN, kBlockM) * std::max(Dk_p, Dv_p)) {}

  void set_head(int64_t bh) {
    b = bh / p.H;
    h = bh % p.H;
  }
  void load_keys(int64_t j0, int64_t j1) {
    load_tile<scalar_t>(p.k, b, h, j0, j1, p.Dk, k.data(), Dk_p);
    load_tile_transposed<scalar_t>(p.k, b, h, j0, j1, p.Dk, kt.data(), kBlockN);
    load_tile_transposed<scalar_t>(p.v, b, h, j0, j1, p.Dv, vt.data(), kBlockN);
  }
  void load_queries(int64_t i0, int64_t i1) {
    load_tile<scalar_t>(p.q, b, h, i0, i1, p.Dk, q.data(), Dk_p);
    load_tile<scalar_t>(p.grad_out, b, h, i0, i1, p.Dv, g.data(), Dv_p);
  }
  // s = P, dp = dS * scale of the loaded tiles (rows x cols); lse, delta: the query tile's. Only the
  // key columns the tile has, padded to whole vectors: the last tile of Nk = 196 has 4 keys, not 64.
  void probs(int64_t rows, int64_t cols, const acc* lse, const acc* delta) {
    const int64_t n = cpu::padded_cols<acc>(cols);
    cpu::gemm(rows, n, p.Dk, q.data(), Dk_p, kt.data(), kBlockN, s.data(), kBlockN, false);   // q k^T
    cpu::gemm(rows, n, p.Dv, g.data(), Dv_p, vt.data(), kBlockN, dp.data(), kBlockN, false);  // dO v^T
    probs_and_dscores(s.data(), dp.data(), rows, cols, static_cast<acc>(p.scale), lse, delta);
  }
  // Each tile's product goes through `part` (add_into).
  void add_key_grads(int64_t rows, int64_t cols, acc* dk, acc* dv) {
    cpu::gemm_at(cols, Dv_p, rows, s.data(), kBlockN, g.data(), Dv_p, part.data(), Dv_p, false);  // dv += P^T dO
    add_into(dv, part.data(), cols * Dv_p);
    cpu::gemm_at(cols, Dk_p, rows, dp.data(), kBlockN, q.data(), Dk_p, part.data(), Dk_p, false);  // dk += dS^T q
    add_into(dk, part.data(), cols * Dk_p);
  }
  void add_query_grads(int64_t rows, int64_t cols, acc* dq) {
    cpu::gemm(rows, Dk_p, cols, dp.data(), kBlockN, k.data(), Dk_p, part.data(), Dk_p, false);  // dq += dS k
    add_into(dq, part.data(), rows * Dk_p);
  }
  // Rows [n0, n1) of a gradient buffer (pitch ld) into x's rows.
  void store(const acc* src, int64_t ld, int64_t n0, int64_t n1, int64_t d, const View4& x) {
    for (int64_t n = n0; n < n1; ++n) store_row(src + (n - n0) * ld, d, x.row<scalar_t>(b, h, n));
  }
};

// delta_i = rowsum(dO_i * O_i) - grad_lse_i: the softmax Jacobian's correction term.
template <typename scalar_t>
void row_deltas(const SoftmaxAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  acc* delta_all = static_cast<acc*>(p.delta);
  const acc* grad_lse = static_cast<const acc*>(p.grad_lse);
  at::parallel_for(0, p.B * p.H * p.Nq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / p.Nq, i = t % p.Nq, b = bh / p.H, h = bh % p.H;
      const scalar_t* go = p.grad_out.row<const scalar_t>(b, h, i);
      const scalar_t* o = p.out.row<const scalar_t>(b, h, i);
      acc d = acc(0);
      for (int64_t e = 0; e < p.Dv; ++e) d += static_cast<acc>(go[e]) * static_cast<acc>(o[e]);
      delta_all[t] = grad_lse ? d - grad_lse[t] : d;
    }
  });
}

// With at least a head per thread, one task per head walks its key tiles once, summing dk, dv per
// key tile and dq over all of them. With fewer heads than threads, one task per key tile (dk, dv)
// and then one per query tile (dq), recomputing the scores a second time. Both sum every gradient
// entry over the same tiles in the same order through the same gemm calls, so both give the same bits.
template <typename scalar_t>
void bwd(const SoftmaxAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  const acc* lse_all = static_cast<const acc*>(p.lse);
  const acc* delta_all = static_cast<const acc*>(p.delta);
  const int64_t heads = p.B * p.H, q_tiles = (p.Nq + kBlockM - 1) / kBlockM, k_tiles = (p.Nk + kBlockN - 1) / kBlockN;
  const int64_t Dk_p = cpu::padded_cols<acc>(p.Dk), Dv_p = cpu::padded_cols<acc>(p.Dv);
  row_deltas<scalar_t>(p);

  // dk, dv of key rows [j0, j1) of head bh; with dq (all Nq rows) also dq += dS k.
  auto key_tile = [&](BwdTiles<scalar_t>& t, int64_t bh, int64_t j0, acc* dk, acc* dv, acc* dq) {
    const int64_t j1 = std::min(p.Nk, j0 + kBlockN), cols = j1 - j0;
    t.set_head(bh);
    t.load_keys(j0, j1);
    std::fill(dk, dk + kBlockN * Dk_p, acc(0));
    std::fill(dv, dv + kBlockN * Dv_p, acc(0));
    for (int64_t i0 = 0; i0 < p.Nq; i0 += kBlockM) {
      const int64_t i1 = std::min(p.Nq, i0 + kBlockM), rows = i1 - i0;
      t.load_queries(i0, i1);
      t.probs(rows, cols, lse_all + bh * p.Nq + i0, delta_all + bh * p.Nq + i0);
      t.add_key_grads(rows, cols, dk, dv);
      if (dq) t.add_query_grads(rows, cols, dq + i0 * Dk_p);
    }
    t.store(dk, Dk_p, j0, j1, p.Dk, p.dk);
    t.store(dv, Dv_p, j0, j1, p.Dv, p.dv);
  };

  if (heads >= at::get_num_threads()) {
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      BwdTiles<scalar_t> t(p);
      std::vector<acc> dk(kBlockN * Dk_p), dv(kBlockN * Dv_p), dq(p.Nq * Dk_p);
      for (int64_t bh = begin; bh < end; ++bh) {
        std::fill(dq.begin(), dq.end(), acc(0));
        for (int64_t j0 = 0; j0 < p.Nk; j0 += kBlockN) key_tile(t, bh, j0, dk.data(), dv.data(), dq.data());
        t.store(dq.data(), Dk_p, 0, p.Nq, p.Dk, p.dq);
      }
    });
    return;
  }
  at::parallel_for(0, heads * k_tiles, 1, [&](int64_t begin, int64_t end) {
    BwdTiles<scalar_t> t(p);
    std::vector<acc> dk(kBlockN * Dk_p), dv(kBlockN * Dv_p);
    for (int64_t task = begin; task < end; ++task)
      key_tile(t, task / k_tiles, task % k_tiles * kBlockN, dk.data(), dv.data(), nullptr);
  });
  at::parallel_for(0, heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    BwdTiles<scalar_t> t(p);
    std::vector<acc> dq(kBlockM * Dk_p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_tiles, i0 = task % q_tiles * kBlockM, i1 = std::min(p.Nq, i0 + kBlockM);
      t.set_head(bh);
      t.load_queries(i0, i1);
      std::fill(dq.begin(), dq.end(), acc(0));
      for (int64_t j0 = 0; j0 < p.Nk; j0 += kBlockN) {
        const int64_t j1 = std::min(p.Nk, j0 + kBlockN);
        t.load_keys(j0, j1);
        t.probs(i1 - i0, j1 - j0, lse_all + bh * p.Nq + i0, delta_all + bh * p.Nq + i0);
        t.add_query_grads(i1 - i0, j1 - j0, dq.data());
      }
      t.store(dq.data(), Dk_p, i0, i1, p.Dk, p.dq);
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
