// C++ CPU kernels of non-causal linear attention, forward and backward.
// Parallel over batch*heads (and query/key chunks); each state entry is summed in a fixed order,
// so results are deterministic. Accumulation in acc_t (fp32, fp64 for fp64 inputs).
#include <ATen/Parallel.h>

#include <vector>

#include "linear_attention/linear_attention.h"

namespace sola {
namespace {

constexpr int64_t kRowChunk = 64;  // query / key rows per parallel task

template <typename scalar_t, typename acc, FeatureMap FM>
void load_phi(const scalar_t* x, int64_t d, acc* dst) {
  for (int64_t a = 0; a < d; ++a) dst[a] = Phi<FM>::f(static_cast<acc>(x[a]));
}

template <typename scalar_t, typename acc>
void load(const scalar_t* x, int64_t d, acc* dst) {
  for (int64_t a = 0; a < d; ++a) dst[a] = static_cast<acc>(x[a]);
}

// y[0, n) += alpha * x[0, n): the building block of every product here (vectorises).
template <typename acc>
void axpy(acc alpha, const acc* x, int64_t n, acc* y) {
  for (int64_t e = 0; e < n; ++e) y[e] += alpha * x[e];
}

// dst (cols x rows) = src (rows x cols)^T
template <typename acc>
void transpose(const acc* src, int64_t rows, int64_t cols, acc* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// Runs fn(b, h, row_begin, row_end) over all heads and chunks of n rows, in parallel.
template <typename Fn>
void for_each_row_chunk(const LinearAttentionParams& p, int64_t n, const Fn& fn) {
  const int64_t chunks = (n + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, p.B * p.H * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / chunks, c = t % chunks;
      fn(bh / p.H, bh % p.H, c * kRowChunk, std::min(n, (c + 1) * kRowChunk));
    }
  });
}

template <typename scalar_t, FeatureMap FM>
void fwd(const LinearAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  const int64_t Dk = p.Dk, Dv = p.Dv;
  acc* state_all = static_cast<acc*>(p.state);
  acc* z_all = static_cast<acc*>(p.z);
  const acc inv_nk = acc(1) / acc(p.Nk);

  // Pass 1: S = mean_j phi(k_j) v_j^T and z = mean_j phi(kn_j), one task per head.
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> fk(Dk), fkn(Dk), fv(Dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      acc* S = state_all + bh * Dk * Dv;
      acc* z = z_all + bh * Dk;
      std::fill(S, S + Dk * Dv, acc(0));
      std::fill(z, z + Dk, acc(0));
      for (int64_t j = 0; j < p.Nk; ++j) {
        load_phi<scalar_t, acc, FM>(p.k.row<const scalar_t>(b, h, j), Dk, fk.data());
        load(p.v.row<const scalar_t>(b, h, j), Dv, fv.data());
        for (int64_t a = 0; a < Dk; ++a) axpy(fk[a], fv.data(), Dv, S + a * Dv);
        if (p.has_kn) load_phi<scalar_t, acc, FM>(p.kn.row<const scalar_t>(b, h, j), Dk, fkn.data());
        const acc* phi_kn = p.has_kn ? fkn.data() : fk.data();
        for (int64_t a = 0; a < Dk; ++a) z[a] += phi_kn[a];
      }
      for (int64_t e = 0; e < Dk * Dv; ++e) S[e] *= inv_nk;
      for (int64_t a = 0; a < Dk; ++a) z[a] *= inv_nk;
    }
  });

  // Pass 2: out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps).
  for_each_row_chunk(p, p.Nq, [&](int64_t b, int64_t h, int64_t i0, int64_t i1) {
    const acc* S = state_all + (b * p.H + h) * Dk * Dv;
    const acc* z = z_all + (b * p.H + h) * Dk;
    std::vector<acc> fq(Dk), fqn(Dk), num(Dv);
    for (int64_t i = i0; i < i1; ++i) {
      load_phi<scalar_t, acc, FM>(p.q.row<const scalar_t>(b, h, i), Dk, fq.data());
      std::fill(num.begin(), num.end(), acc(0));
      for (int64_t a = 0; a < Dk; ++a) axpy(fq[a], S + a * Dv, Dv, num.data());
      acc inv_den = acc(1);
      if (p.normalize) {
        if (p.has_qn) load_phi<scalar_t, acc, FM>(p.qn.row<const scalar_t>(b, h, i), Dk, fqn.data());
        const acc* phi_qn = p.has_qn ? fqn.data() : fq.data();
        acc den = acc(0);
        for (int64_t a = 0; a < Dk; ++a) den += phi_qn[a] * z[a];
        inv_den = acc(1) / (den + static_cast<acc>(p.eps));
      }
      scalar_t* out = p.out.row<scalar_t>(b, h, i);
      for (int64_t c = 0; c < Dv; ++c) out[c] = static_cast<scalar_t>(num[c] * inv_den);
    }
  });
}

template <typename scalar_t, FeatureMap FM>
void bwd(const LinearAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  const int64_t Dk = p.Dk, Dv = p.Dv;
  const acc* state_all = static_cast<const acc*>(p.state);
  const acc* z_all = static_cast<const acc*>(p.z);
  const acc inv_nk = acc(1) / acc(p.Nk);
  // dS = sum_i phi(q_i) da_i^T and dz = sum_i phi(qn_i) dd_i per head; dS also transposed
  // (Dv x Dk) so the key pass's products over Dv are contiguous axpys.
  std::vector<acc> dstate_all(p.B * p.H * Dk * Dv), dstate_t_all(p.B * p.H * Dv * Dk), dz_all(p.B * p.H * Dk);

  // Pass 1 over queries, one task per head (dS, dz summed in query order): dq, dqn, dS, dz.
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> fq(Dk), fqn(Dk), num(Dv), da(Dv), dfq(Dk), St(Dv * Dk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const acc* S = state_all + bh * Dk * Dv;
      transpose(S, Dk, Dv, St.data());
      const acc* z = z_all + bh * Dk;
      acc* dS = dstate_all.data() + bh * Dk * Dv;
      acc* dz = dz_all.data() + bh * Dk;
      for (int64_t i = 0; i < p.Nq; ++i) {
        const scalar_t* q = p.q.row<const scalar_t>(b, h, i);
        const scalar_t* qn = p.qn.row<const scalar_t>(b, h, i);
        const scalar_t* g = p.grad_out.row<const scalar_t>(b, h, i);
        load_phi<scalar_t, acc, FM>(q, Dk, fq.data());
        std::fill(num.begin(), num.end(), acc(0));
        for (int64_t a = 0; a < Dk; ++a) axpy(fq[a], S + a * Dv, Dv, num.data());
        acc den = acc(1), dd = acc(0);
        if (p.normalize) {
          if (p.has_qn) load_phi<scalar_t, acc, FM>(qn, Dk, fqn.data());
          else std::copy(fq.begin(), fq.end(), fqn.begin());
          den = static_cast<acc>(p.eps);
          for (int64_t a = 0; a < Dk; ++a) den += fqn[a] * z[a];
          acc g_dot_num = acc(0);
          for (int64_t c = 0; c < Dv; ++c) g_dot_num += static_cast<acc>(g[c]) * num[c];
          dd = -g_dot_num / (den * den);
        }
        for (int64_t c = 0; c < Dv; ++c) da[c] = static_cast<acc>(g[c]) / den;
        scalar_t* dq = p.dq.row<scalar_t>(b, h, i);
        scalar_t* dqn = p.has_qn ? p.dqn.row<scalar_t>(b, h, i) : nullptr;
        // dphi(q_i) = S da_i, and dS += phi(q_i) da_i^T.
        std::fill(dfq.begin(), dfq.end(), acc(0));
        for (int64_t c = 0; c < Dv; ++c) axpy(da[c], St.data() + c * Dk, Dk, dfq.data());
        for (int64_t a = 0; a < Dk; ++a) axpy(fq[a], da.data(), Dv, dS + a * Dv);
        for (int64_t a = 0; a < Dk; ++a) {
          acc dq_a = through_phi(dfq[a], Phi<FM>::df(static_cast<acc>(q[a])));
          if (p.normalize) {
            const acc dqn_a = through_phi(z[a] * dd, Phi<FM>::df(static_cast<acc>(qn[a])));
            dz[a] += fqn[a] * dd;
            if (p.has_qn) dqn[a] = static_cast<scalar_t>(dqn_a);
            else dq_a += dqn_a;
          }
          dq[a] = static_cast<scalar_t>(dq_a);
        }
      }
      transpose(dS, Dk, Dv, dstate_t_all.data() + bh * Dv * Dk);
    }
  });

  // Pass 2 over keys: dv_j = dS^T phi(k_j) / Nk, dk_j = phi'(k_j) (dS v_j) / Nk (+ normaliser part).
  for_each_row_chunk(p, p.Nk, [&](int64_t b, int64_t h, int64_t j0, int64_t j1) {
    const acc* dS = dstate_all.data() + (b * p.H + h) * Dk * Dv;
    const acc* dSt = dstate_t_all.data() + (b * p.H + h) * Dv * Dk;
    const acc* dz = dz_all.data() + (b * p.H + h) * Dk;
    std::vector<acc> fk(Dk), fv(Dv), dfk(Dk), dv(Dv);
    for (int64_t j = j0; j < j1; ++j) {
      const scalar_t* k = p.k.row<const scalar_t>(b, h, j);
      const scalar_t* kn = p.kn.row<const scalar_t>(b, h, j);
      load_phi<scalar_t, acc, FM>(k, Dk, fk.data());
      load(p.v.row<const scalar_t>(b, h, j), Dv, fv.data());
      // dv_j = dS^T phi(k_j), dphi(k_j) = dS v_j (both still to be divided by Nk).
      std::fill(dv.begin(), dv.end(), acc(0));
      std::fill(dfk.begin(), dfk.end(), acc(0));
      for (int64_t a = 0; a < Dk; ++a) axpy(fk[a], dS + a * Dv, Dv, dv.data());
      for (int64_t c = 0; c < Dv; ++c) axpy(fv[c], dSt + c * Dk, Dk, dfk.data());
      scalar_t* dk = p.dk.row<scalar_t>(b, h, j);
      scalar_t* dkn = p.has_kn ? p.dkn.row<scalar_t>(b, h, j) : nullptr;
      for (int64_t a = 0; a < Dk; ++a) {
        acc dk_a = through_phi(dfk[a] * inv_nk, Phi<FM>::df(static_cast<acc>(k[a])));
        const acc dkn_a = p.normalize ? through_phi(dz[a] * inv_nk, Phi<FM>::df(static_cast<acc>(kn[a]))) : acc(0);
        if (p.has_kn) dkn[a] = static_cast<scalar_t>(dkn_a);
        else dk_a += dkn_a;
        dk[a] = static_cast<scalar_t>(dk_a);
      }
      scalar_t* dv_out = p.dv.row<scalar_t>(b, h, j);
      for (int64_t c = 0; c < Dv; ++c) dv_out[c] = static_cast<scalar_t>(dv[c] * inv_nk);
    }
  });
}

}  // namespace

void linear_attention_fwd_cpu(const LinearAttentionParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "linear_attention_fwd_cpu", [&] {
    SOLA_FEATURE_MAP_SWITCH(p.feature_map, kFM, [&] { fwd<scalar_t, kFM>(p); });
  });
}

void linear_attention_bwd_cpu(const LinearAttentionParams& p) {
  SOLA_DISPATCH_FLOATING(p.dtype, "linear_attention_bwd_cpu", [&] {
    SOLA_FEATURE_MAP_SWITCH(p.feature_map, kFM, [&] { bwd<scalar_t, kFM>(p); });
  });
}

}  // namespace sola
