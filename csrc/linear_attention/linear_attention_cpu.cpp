// C++ CPU kernels of non-causal linear attention, forward and backward.
// Parallel over batch*heads and token segments (the sums over tokens: S, z, dS, dz) or row chunks of
// kRowChunk rows (out, dk, dv). The products run through cpu::gemm on chunk tiles; each task's
// element-wise work (feature maps, normaliser, epilogues) is compiled per ISA (SOLA_CPU_CLONES). Each
// state entry is summed in token order within a segment and the segments in order, with segments set
// by the shapes alone, so results are deterministic on any machine and thread count. Accumulation in
// acc_t (fp32, fp64 for fp64 inputs). RoPE (rope_cos set) is applied to each chunk's phi(q), phi(k) as
// they are loaded: q and k are read once, with no rotated copies in memory (composing the rope kernels
// wrote four tensors and read them back: 1.2-2.1x the time of this on SoLA-Vision's shapes).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_math.h"
#include "linear_attention/linear_attention.h"
#include "rope/rope.h"

namespace sola {
namespace {

constexpr int64_t kRowChunk = 64;  // query / key rows per tile (and per parallel task)

// The tokens of a head split into segments, each summed by its own task, when there are too few heads
// to fill a many-core CPU; no segment shorter than kMinSegmentRows. A function of the shapes only.
struct TokenSegments {
  static constexpr int64_t kTargetTasks = 64, kMinSegmentRows = 1024;
  int64_t rows, count;  // rows per segment (whole chunks), segments per head
  TokenSegments(int64_t heads, int64_t n) {
    const int64_t wanted = std::min(ceil_div(kTargetTasks, heads), std::max<int64_t>(1, n / kMinSegmentRows));
    rows = std::max<int64_t>(kRowChunk, ceil_div(ceil_div(n, wanted), kRowChunk) * kRowChunk);
    count = std::max<int64_t>(1, ceil_div(n, rows));
  }
};

// Rows [n0, n1) of one head as acc, through phi when kPhi, into dst with row pitch ld (the columns
// from d on are left as they are: the callers' zero padding).
template <bool kPhi, FeatureMap FM, typename scalar_t, typename acc>
SOLA_CPU_INLINE void load_rows(const View4& x, int64_t b, int64_t h, int64_t n0, int64_t n1, int64_t d, acc* dst,
                               int64_t ld) {
  for (int64_t n = n0; n < n1; ++n) {
    acc* out = dst + (n - n0) * ld;
    load_row(x.row<const scalar_t>(b, h, n), d, out);
    if constexpr (kPhi)
      for (int64_t e = 0; e < d; ++e) out[e] = Phi<FM>::f(out[e]);
  }
}

// The RoPE angle tables' rows for token n (p.rope_cos, p.rope_sin: (N, Dk / 2), acc-typed).
template <typename acc>
struct RopeAngles {
  const acc *cos, *sin;
  RopeAngles(const LinearAttentionParams& p, int64_t n)
      : cos(static_cast<const acc*>(p.rope_cos) + n * (p.Dk / 2)),
        sin(static_cast<const acc*>(p.rope_sin) + n * (p.Dk / 2)) {}
};

// Rows [n0, n1) of x through phi for the two products: num feeds the numerator's (S, dS), den the
// normaliser's (z, dz). With RoPE num is phi(x) rotated by each row's angles and den phi(x) unrotated (the
// op layer allows no xn with RoPE, so phi' of x may be taken from den); with xn given (has_xn) num is
// phi(x) and den phi(xn); else both are phi(x). f, f2: (n1 - n0) x d buffers (f2 used with RoPE or xn).
template <FeatureMap FM, typename scalar_t, typename acc>
SOLA_CPU_INLINE void load_features(const LinearAttentionParams& p, const View4& x, const View4& xn, bool has_xn,
                                   int64_t b, int64_t h, int64_t n0, int64_t n1, acc* f, acc* f2, const acc*& num,
                                   const acc*& den) {
  const int64_t d = p.Dk;
  load_rows<true, FM, scalar_t>(x, b, h, n0, n1, d, f, d);
  num = den = f;
  if (p.rope_cos) {
    for (int64_t n = n0; n < n1; ++n) {
      const RopeAngles<acc> angle(p, n);
      rotate_row(f + (n - n0) * d, angle.cos, angle.sin, d, f2 + (n - n0) * d);
    }
    num = f2;
  } else if (has_xn) {
    load_rows<true, FM, scalar_t>(xn, b, h, n0, n1, d, f2, d);
    den = f2;
  }
}

// Whether load_features needs its second buffer.
bool second_features(const LinearAttentionParams& p, bool has_xn) { return p.rope_cos || has_xn; }

// a[0, d) . b[0, d): per-lane sums over whole vectors, then the lanes by halves. Summed in order
// (one running sum) the loop compiled to a chain of scalar adds, slower than the row's gemm.
template <typename acc>
SOLA_CPU_INLINE acc dot(const acc* a, const acc* b, int64_t d) {
  constexpr int64_t L = kCpuVecLen<acc>;
  acc lanes[L] = {};
  const int64_t whole = d / L * L;
  for (int64_t e0 = 0; e0 < whole; e0 += L)
    for (int64_t e = 0; e < L; ++e) lanes[e] += a[e0 + e] * b[e0 + e];
  for (int64_t e = whole; e < d; ++e) lanes[e - whole] += a[e] * b[e];
#pragma GCC unroll 8
  for (int64_t w = L / 2; w > 0; w /= 2)
    for (int64_t e = 0; e < w; ++e) lanes[e] += lanes[e + w];
  return lanes[0];
}

// phi'(x) given phi(x), which the caller has loaded: elu's is phi(x) itself where x <= 0 (NaN
// included), so it costs no second exp.
template <FeatureMap FM, typename acc>
SOLA_CPU_INLINE acc dphi_given_phi(acc x, acc phi_x) {
  if constexpr (FM == FeatureMap::Elu) return x > acc(0) ? acc(1) : phi_x;
  else return Phi<FM>::df(x);
}

// out = grad * scale * phi'(x) (exactly 0 where phi is flat) over one row of d columns; phi_x: phi(x).
template <FeatureMap FM, typename scalar_t, typename acc>
SOLA_CPU_INLINE void through_phi_row(const scalar_t* x, const acc* phi_x, const acc* grad, acc scale, int64_t d,
                                     acc* out) {
  for (int64_t e = 0; e < d; ++e)
    out[e] = through_phi(grad[e] * scale, dphi_given_phi<FM>(static_cast<acc>(x[e]), phi_x[e]));
}

// With RoPE: out = phi'(x) (the rotation transposed applied to grad_num * scale, plus grad_den * den_scale),
// over one row of d columns; grad_den: the normaliser's gradient of phi(x), unrotated (null: none). In the
// order of rope.h's backward after linear attention's: the composition's fp32 results up to contraction.
template <FeatureMap FM, typename scalar_t, typename acc>
SOLA_CPU_INLINE void unrotate_through_phi_row(const RopeAngles<acc>& angle, const scalar_t* x, const acc* phi_x,
                                              const acc* grad_num, acc scale, const acc* grad_den, acc den_scale,
                                              int64_t d, acc* out) {
  for (int64_t i = 0; i < d / 2; ++i) {
    const acc h0 = grad_den ? grad_den[2 * i] * den_scale : acc(0);
    const acc h1 = grad_den ? grad_den[2 * i + 1] * den_scale : acc(0);
    unrotate_pair(grad_num[2 * i] * scale, grad_num[2 * i + 1] * scale, h0, h1, angle.cos[i], angle.sin[i], out[2 * i],
                  out[2 * i + 1]);
  }
  through_phi_row<FM>(x, phi_x, out, acc(1), d, out);
}

// m (rows x cols, pitch ld), or its transpose, into out with pitch ld_out (out's padding untouched).
template <typename acc>
void copy_padded(const acc* m, int64_t rows, int64_t cols, int64_t ld, bool transpose, acc* out, int64_t ld_out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) (transpose ? out[c * ld_out + r] : out[r * ld_out + c]) = m[r * ld + c];
}

// Forward pass 1, key rows [j0, j1) of one head: S += phi(k_j) v_j^T (Dk x Dv_p), z += phi(kn_j)
// (load_features: phi(k_j) rotated there with RoPE).
template <typename scalar_t, FeatureMap FM>
SOLA_CPU_CLONES void state_of_rows(const LinearAttentionParams& p, int64_t bh, int64_t j0, int64_t j1,
                                   acc_t<scalar_t>* S, acc_t<scalar_t>* z) {
  using acc = acc_t<scalar_t>;
  const int64_t b = bh / p.H, h = bh % p.H, Dk = p.Dk, Dv = p.Dv, Dv_p = cpu::padded_cols<acc>(Dv);
  const int64_t chunk = std::min(j1 - j0, kRowChunk);  // buffers sized for what is there (tiny N: few rows)
  std::vector<acc> fk(chunk * Dk), fk2(second_features(p, p.has_kn) ? chunk * Dk : 0), v(chunk * Dv_p, acc(0));
  for (int64_t c0 = j0; c0 < j1; c0 += kRowChunk) {
    const int64_t c1 = std::min(j1, c0 + kRowChunk), rows = c1 - c0;
    const acc *phi_k, *phi_kn;
    load_features<FM, scalar_t>(p, p.k, p.kn, p.has_kn, b, h, c0, c1, fk.data(), fk2.data(), phi_k, phi_kn);
    load_rows<false, FM, scalar_t>(p.v, b, h, c0, c1, Dv, v.data(), Dv_p);
    cpu::gemm_at(Dk, Dv_p, rows, phi_k, Dk, v.data(), Dv_p, S, Dv_p, true);  // S += phi(k)^T v
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t a = 0; a < Dk; ++a) z[a] += phi_kn[j * Dk + a];
  }
}

// Per-(head, segment) sums of a Dk x Dv_p matrix and a Dk vector (S and z; dS and dz), zeroed.
template <typename acc>
struct SegmentSums {
  int64_t Dk, Dv_p, segments;
  std::vector<acc> m, v;
  SegmentSums(int64_t heads, int64_t segments_per_head, int64_t dk, int64_t dv_p)
      : Dk(dk), Dv_p(dv_p), segments(segments_per_head), m(heads * segments * dk * dv_p, acc(0)),
        v(heads * segments * dk, acc(0)) {}
  acc* matrix(int64_t bh, int64_t seg) { return m.data() + (bh * segments + seg) * Dk * Dv_p; }
  acc* vector(int64_t bh, int64_t seg) { return v.data() + (bh * segments + seg) * Dk; }
  void zero() {
    std::fill(m.begin(), m.end(), acc(0));
    std::fill(v.begin(), v.end(), acc(0));
  }
  // Head entry `head`'s sums over its segments, in segment order, times scale: the matrix's first dv
  // columns into out (row pitch ld) and, when out_t is given, transposed into out_t (row pitch ld_t);
  // the vector into out_v.
  void total(int64_t head, int64_t dv, acc scale, acc* out, int64_t ld, acc* out_t, int64_t ld_t, acc* out_v) {
    for (int64_t a = 0; a < Dk; ++a) {
      for (int64_t c = 0; c < dv; ++c) {
        acc sum = acc(0);
        for (int64_t seg = 0; seg < segments; ++seg) sum += matrix(head, seg)[a * Dv_p + c];
        out[a * ld + c] = sum * scale;
        if (out_t) out_t[c * ld_t + a] = sum * scale;
      }
      acc sum_v = acc(0);
      for (int64_t seg = 0; seg < segments; ++seg) sum_v += vector(head, seg)[a];
      out_v[a] = sum_v * scale;
    }
  }
};

// sum_rows(bh, n0, n1, matrix, vector) adds rows [n0, n1) of head bh into that segment's sums, over
// every (head, segment) of n tokens in parallel; finish(sums, index, bh) then takes head bh's total
// (segments added in order). A head of one segment is summed and finished in one task, keeping no sums.
template <typename acc, typename SumRows, typename Finish>
void sum_over_segments(int64_t heads, int64_t n, int64_t Dk, int64_t Dv_p, const SumRows& sum_rows,
                       const Finish& finish) {
  const TokenSegments seg(heads, n);
  SegmentSums<acc> sums(seg.count > 1 ? heads : 0, seg.count, Dk, Dv_p);
  at::parallel_for(0, heads * seg.count, 1, [&](int64_t begin, int64_t end) {
    SegmentSums<acc> own(1, 1, Dk, Dv_p);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / seg.count, s = t % seg.count, n0 = s * seg.rows, n1 = std::min(n, n0 + seg.rows);
      if (seg.count > 1) {
        sum_rows(bh, n0, n1, sums.matrix(bh, s), sums.vector(bh, s));
        continue;
      }
      own.zero();
      sum_rows(bh, n0, n1, own.matrix(0, 0), own.vector(0, 0));
      finish(own, 0, bh);
    }
  });
  if (seg.count > 1)
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) finish(sums, bh, bh);
    });
}

// Forward pass 2, query rows [i0, i1) of one head: out_i = phi(q_i)^T S / (phi(qn_i)^T z + eps)
// (phi(q_i) rotated with RoPE).
template <typename scalar_t, FeatureMap FM>
SOLA_CPU_CLONES void out_rows(const LinearAttentionParams& p, int64_t bh, int64_t i0, int64_t i1) {
  using acc = acc_t<scalar_t>;
  const int64_t b = bh / p.H, h = bh % p.H, Dk = p.Dk, Dv = p.Dv, Dv_p = cpu::padded_cols<acc>(Dv), rows = i1 - i0;
  const acc* z = static_cast<const acc*>(p.z) + bh * Dk;
  const acc* state = static_cast<const acc*>(p.state) + bh * Dk * Dv;
  // S as gemm's B: padded to whole vectors unless Dv already is.
  std::vector<acc> S_padded(Dv == Dv_p ? 0 : Dk * Dv_p, acc(0));
  if (Dv != Dv_p) copy_padded(state, Dk, Dv, Dv, false, S_padded.data(), Dv_p);
  const acc* S = Dv == Dv_p ? state : S_padded.data();
  std::vector<acc> fq(rows * Dk), fq2(second_features(p, p.has_qn) ? rows * Dk : 0), num(rows * Dv_p);
  const acc *phi_q, *phi_qn;
  load_features<FM, scalar_t>(p, p.q, p.qn, p.has_qn, b, h, i0, i1, fq.data(), fq2.data(), phi_q, phi_qn);
  cpu::gemm(rows, Dv_p, Dk, phi_q, Dk, S, Dv_p, num.data(), Dv_p, false);  // phi(q) S
  for (int64_t r = 0; r < rows; ++r) {
    const RowDivisor<acc> den(p.normalize ? dot(phi_qn + r * Dk, z, Dk) + static_cast<acc>(p.eps) : acc(1));
    scalar_t* out = p.out.row<scalar_t>(b, h, i0 + r);
    for (int64_t c = 0; c < Dv; ++c) out[c] = static_cast<scalar_t>(den.divide(num[r * Dv_p + c]));
  }
}

template <typename scalar_t, FeatureMap FM>
void fwd(const LinearAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  const int64_t heads = p.B * p.H;
  const acc inv_nk = acc(1) / acc(p.Nk);
  sum_over_segments<acc>(
      heads, p.Nk, p.Dk, cpu::padded_cols<acc>(p.Dv),
      [&](int64_t bh, int64_t j0, int64_t j1, acc* S, acc* z) { state_of_rows<scalar_t, FM>(p, bh, j0, j1, S, z); },
      [&](SegmentSums<acc>& sums, int64_t index, int64_t bh) {  // S = sum / Nk, z = sum / Nk
        sums.total(index, p.Dv, inv_nk, static_cast<acc*>(p.state) + bh * p.Dk * p.Dv, p.Dv, nullptr, 0,
                   static_cast<acc*>(p.z) + bh * p.Dk);
      });
  const int64_t chunks = (p.Nq + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = t % chunks * kRowChunk;
      out_rows<scalar_t, FM>(p, t / chunks, i0, std::min(p.Nq, i0 + kRowChunk));
    }
  });
}

// The backward's per-head sums dS = sum_i phi(q_i) da_i^T (Dk x Dv_p) and its transpose
// (Dv x Dk_p, for the key pass's dS v_j), dz = sum_i phi(qn_i) dd_i.
template <typename acc>
struct StateGrads {
  int64_t Dk_p, Dv_p;
  std::vector<acc> dS, dSt, dz;
  explicit StateGrads(const LinearAttentionParams& p)
      : Dk_p(cpu::padded_cols<acc>(p.Dk)), Dv_p(cpu::padded_cols<acc>(p.Dv)),
        dS(p.B * p.H * p.Dk * Dv_p), dSt(p.B * p.H * p.Dv * Dk_p), dz(p.B * p.H * p.Dk) {}
};

// Backward pass 1, query rows [i0, i1) of one head: dq, dqn, and their sums dS += phi(q_i) da_i^T
// (Dk x Dv_p), dz += phi(qn_i) dd_i, in query order.
//   num_i = S^T phi(q_i), den_i = phi(qn_i) . z + eps, da_i = g_i / den_i, dd_i = -g_i . num_i / den_i^2
//   dphi(q_i) = S da_i,  dphi(qn_i) = z dd_i
// With RoPE phi(q_i) in num_i and dS is rotated by R_i and dphi(q_i) = R_i^T S da_i + z dd_i (qn = q).
template <typename scalar_t, FeatureMap FM>
SOLA_CPU_CLONES void query_grads_of_rows(const LinearAttentionParams& p, int64_t bh, int64_t i0, int64_t i1,
                                         acc_t<scalar_t>* dS, acc_t<scalar_t>* dz) {
  using acc = acc_t<scalar_t>;
  const int64_t b = bh / p.H, h = bh % p.H, Dk = p.Dk, Dv = p.Dv;
  const int64_t Dk_p = cpu::padded_cols<acc>(Dk), Dv_p = cpu::padded_cols<acc>(Dv);
  const acc* state = static_cast<const acc*>(p.state) + bh * Dk * Dv;
  std::vector<acc> S(Dk * Dv_p, acc(0)), St(Dv * Dk_p, acc(0));
  copy_padded(state, Dk, Dv, Dv, false, S.data(), Dv_p);
  copy_padded(state, Dk, Dv, Dv, true, St.data(), Dk_p);
  const acc* z = static_cast<const acc*>(p.z) + bh * Dk;
  const int64_t chunk = std::min(i1 - i0, kRowChunk);
  std::vector<acc> fq(chunk * Dk), fq2(second_features(p, p.has_qn) ? chunk * Dk : 0), g(chunk * Dv_p, acc(0));
  std::vector<acc> num(chunk * Dv_p);
  std::vector<acc> da(chunk * Dv_p), dfq(chunk * Dk_p), dd(chunk), dx(Dk), dxn(Dk);
  for (int64_t c0 = i0; c0 < i1; c0 += kRowChunk) {
    const int64_t c1 = std::min(i1, c0 + kRowChunk), rows = c1 - c0;
    const acc *phi_q, *phi_qn;
    load_features<FM, scalar_t>(p, p.q, p.qn, p.has_qn, b, h, c0, c1, fq.data(), fq2.data(), phi_q, phi_qn);
    load_rows<false, FM, scalar_t>(p.grad_out, b, h, c0, c1, Dv, g.data(), Dv_p);
    cpu::gemm(rows, Dv_p, Dk, phi_q, Dk, S.data(), Dv_p, num.data(), Dv_p, false);  // num = phi(q) S
    for (int64_t r = 0; r < rows; ++r) {
      const acc* g_row = g.data() + r * Dv_p;
      acc den = acc(1);
      dd[r] = acc(0);
      if (p.normalize) {
        den = dot(phi_qn + r * Dk, z, Dk) + static_cast<acc>(p.eps);
        dd[r] = -(dot(g_row, num.data() + r * Dv_p, Dv) / den) / den;  // not / den^2: it overflows first
      }
      for (int64_t c = 0; c < Dv_p; ++c) da[r * Dv_p + c] = g_row[c] / den;  // padding: 0 / den
    }
    cpu::gemm(rows, Dk_p, Dv, da.data(), Dv_p, St.data(), Dk_p, dfq.data(), Dk_p, false);  // dphi(q) = da S^T
    cpu::gemm_at(Dk, Dv_p, rows, phi_q, Dk, da.data(), Dv_p, dS, Dv_p, true);            // dS += phi(q)^T da
    for (int64_t r = 0; r < rows; ++r) {  // dq, dqn of row c0 + r (each loop vectorises)
      if (p.rope_cos) {  // phi_qn: phi(q) unrotated (load_features)
        if (p.normalize)
          for (int64_t a = 0; a < Dk; ++a) dz[a] += phi_qn[r * Dk + a] * dd[r];
        unrotate_through_phi_row<FM>(RopeAngles<acc>(p, c0 + r), p.q.row<const scalar_t>(b, h, c0 + r),
                                     phi_qn + r * Dk, dfq.data() + r * Dk_p, acc(1), p.normalize ? z : nullptr, dd[r],
                                     Dk, dx.data());
        store_row(dx.data(), Dk, p.dq.row<scalar_t>(b, h, c0 + r));
        continue;
      }
      through_phi_row<FM>(p.q.row<const scalar_t>(b, h, c0 + r), phi_q + r * Dk, dfq.data() + r * Dk_p, acc(1),
                          Dk, dx.data());
      if (p.normalize) {  // (has_qn only with normalize)
        through_phi_row<FM>(p.qn.row<const scalar_t>(b, h, c0 + r), phi_qn + r * Dk, z, dd[r], Dk, dxn.data());
        for (int64_t a = 0; a < Dk; ++a) dz[a] += phi_qn[r * Dk + a] * dd[r];
        if (p.has_qn) store_row(dxn.data(), Dk, p.dqn.row<scalar_t>(b, h, c0 + r));
        else
          for (int64_t a = 0; a < Dk; ++a) dx[a] += dxn[a];
      }
      store_row(dx.data(), Dk, p.dq.row<scalar_t>(b, h, c0 + r));
    }
  }
}

// Backward pass 2, key rows [j0, j1) of one head:
//   dv_j = dS^T phi(k_j) / Nk,  dphi(k_j) = dS v_j / Nk,  dphi(kn_j) = dz / Nk
// With RoPE phi(k_j) in dv_j is rotated by R_j and dphi(k_j) = (R_j^T dS v_j + dz) / Nk (kn = k).
template <typename scalar_t, FeatureMap FM>
SOLA_CPU_CLONES void key_grads_rows(const LinearAttentionParams& p, int64_t bh, int64_t j0, int64_t j1,
                                    const StateGrads<acc_t<scalar_t>>& sg) {
  using acc = acc_t<scalar_t>;
  const int64_t b = bh / p.H, h = bh % p.H, Dk = p.Dk, Dv = p.Dv, Dk_p = sg.Dk_p, Dv_p = sg.Dv_p, rows = j1 - j0;
  const acc* dS = sg.dS.data() + bh * Dk * Dv_p;
  const acc* dSt = sg.dSt.data() + bh * Dv * Dk_p;
  const acc* dz = sg.dz.data() + bh * Dk;
  const acc inv_nk = acc(1) / acc(p.Nk);
  std::vector<acc> fk(rows * Dk), fk2(second_features(p, p.has_kn) ? rows * Dk : 0), v(rows * Dv), dv(rows * Dv_p);
  std::vector<acc> dfk(rows * Dk_p);
  const acc *phi_k, *phi_kn;
  load_features<FM, scalar_t>(p, p.k, p.kn, p.has_kn, b, h, j0, j1, fk.data(), fk2.data(), phi_k, phi_kn);
  load_rows<false, FM, scalar_t>(p.v, b, h, j0, j1, Dv, v.data(), Dv);
  cpu::gemm(rows, Dv_p, Dk, phi_k, Dk, dS, Dv_p, dv.data(), Dv_p, false);       // phi(k) dS
  cpu::gemm(rows, Dk_p, Dv, v.data(), Dv, dSt, Dk_p, dfk.data(), Dk_p, false);  // v dS^T
  std::vector<acc> dx(Dk), dxn(Dk), dv_row(Dv);
  for (int64_t r = 0; r < rows; ++r) {  // dk, dkn, dv of row j0 + r (each loop vectorises)
    if (p.rope_cos) {  // phi_kn: phi(k) unrotated (load_features)
      unrotate_through_phi_row<FM>(RopeAngles<acc>(p, j0 + r), p.k.row<const scalar_t>(b, h, j0 + r), phi_kn + r * Dk,
                                   dfk.data() + r * Dk_p, inv_nk, p.normalize ? dz : nullptr, inv_nk, Dk, dx.data());
    } else {
      through_phi_row<FM>(p.k.row<const scalar_t>(b, h, j0 + r), phi_k + r * Dk, dfk.data() + r * Dk_p, inv_nk, Dk,
                          dx.data());
      if (p.normalize) {  // (has_kn only with normalize)
        through_phi_row<FM>(p.kn.row<const scalar_t>(b, h, j0 + r), phi_kn + r * Dk, dz, inv_nk, Dk, dxn.data());
        if (p.has_kn) store_row(dxn.data(), Dk, p.dkn.row<scalar_t>(b, h, j0 + r));
        else
          for (int64_t a = 0; a < Dk; ++a) dx[a] += dxn[a];
      }
    }
    store_row(dx.data(), Dk, p.dk.row<scalar_t>(b, h, j0 + r));
    for (int64_t c = 0; c < Dv; ++c) dv_row[c] = dv[r * Dv_p + c] * inv_nk;
    store_row(dv_row.data(), Dv, p.dv.row<scalar_t>(b, h, j0 + r));
  }
}

template <typename scalar_t, FeatureMap FM>
void bwd(const LinearAttentionParams& p) {
  using acc = acc_t<scalar_t>;
  const int64_t heads = p.B * p.H;
  StateGrads<acc> sg(p);
  sum_over_segments<acc>(
      heads, p.Nq, p.Dk, sg.Dv_p,
      [&](int64_t bh, int64_t i0, int64_t i1, acc* dS, acc* dz) {
        query_grads_of_rows<scalar_t, FM>(p, bh, i0, i1, dS, dz);
      },
      [&](SegmentSums<acc>& sums, int64_t index, int64_t bh) {  // dS, dS^T (padding stays 0), dz
        sums.total(index, p.Dv, acc(1), sg.dS.data() + bh * p.Dk * sg.Dv_p, sg.Dv_p,
                   sg.dSt.data() + bh * p.Dv * sg.Dk_p, sg.Dk_p, sg.dz.data() + bh * p.Dk);
      });
  const int64_t chunks = (p.Nk + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = t % chunks * kRowChunk;
      key_grads_rows<scalar_t, FM>(p, t / chunks, j0, std::min(p.Nk, j0 + kRowChunk), sg);
    }
  });
}

// The kernels take phi(x) unrotated as the normaliser's with RoPE: the op layer allows no q_norm / k_norm then.
void check_rope_without_norms(const LinearAttentionParams& p) {
  TORCH_INTERNAL_ASSERT(!p.rope_cos || !(p.has_qn || p.has_kn), "linear attention: RoPE with q_norm / k_norm");
}

}  // namespace

void linear_attention_fwd_cpu(const LinearAttentionParams& p) {
  check_rope_without_norms(p);
  SOLA_DISPATCH_FLOATING(p.dtype, "linear_attention_fwd_cpu", [&] {
    SOLA_FEATURE_MAP_SWITCH(p.feature_map, kFM, [&] { fwd<scalar_t, kFM>(p); });
  });
}

void linear_attention_bwd_cpu(const LinearAttentionParams& p) {
  check_rope_without_norms(p);
  SOLA_DISPATCH_FLOATING(p.dtype, "linear_attention_bwd_cpu", [&] {
    SOLA_FEATURE_MAP_SWITCH(p.feature_map, kFM, [&] { bwd<scalar_t, kFM>(p); });
  });
}

}  // namespace sola
