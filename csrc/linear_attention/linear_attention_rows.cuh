// Row products of linear attention: a tile of token rows times a small per-head matrix W
// (S or dS, fp32/fp64, read through L2), with a mode-specific epilogue (RowsMode):
//   Out        out_i = phi(q_i) S / (phi(qn_i) . z + eps)             W = S     (Dk x Dv)
//   QueryGrad  u_i = S g_i -> den_i, dd_i, dq_i, dqn_i                W = S^T   (Dv x Dk)
//   KeyGrad    dv_j = dS^T phi(k_j) / Nk                              W = dS    (Dk x Dv)
//              then dk_j = phi'(k_j) (dS v_j) / Nk (+ phi'(kn_j) dz / Nk)  W = dS^T  (Dv x Dk)
//              (one block does both for its rows, so k comes from DRAM once and from L2 again)
//
// Tiling. A block owns kRows rows and all kD (>= Dout) output columns, so the row-wise epilogues
// (the denominator, g . num) see whole rows. Its threads form kThreadRows x kThreadCols, each
// with a 4 x kTN register tile (kTN = 4 up to kD = 64, else 8): kD = 32/64/128/256 gives
// 128/64/64/32 rows per block. The reduction dimension Din streams through shared memory kK
// columns at a time: the x slice is loaded with 16-byte row loads (feature map applied on the
// way) and stored transposed, the W slice comes from L2 (the whole W is re-read per row tile, as
// much as the tile's own input at kD = kRows; the op is bound by memory at D = 32 and by FMA
// throughput above, where this L2 traffic stays well under the arithmetic time).
#pragma once

#include "linear_attention/linear_attention_device.cuh"
#include "linear_attention/linear_attention_plan.h"

namespace sola {
namespace la {

template <typename scalar_t, int kD>
struct RowsConfig {
  using acc = acc_t<scalar_t>;
  static constexpr int kTN = kD <= 64 ? 4 : 8;
  static constexpr int kTM = 4;
  static constexpr int kThreadCols = kD / kTN;  // 8, 16, 16, 32
  static constexpr int kThreadRows = kThreads / kThreadCols;
  static constexpr int kRows = kThreadRows * kTM;  // 128, 64, 64, 32
  static constexpr int kK = sizeof(acc) == 8 ? 16 : 32;  // reduction columns per stage
  // Shared rows padded by 4 values: still 16-byte aligned for the vector reads, and the
  // transposed W stores of 8 consecutive k x 4 columns per warp hit 32 distinct banks.
  static constexpr int kXPitch = kRows + 4;
  static constexpr int kWPitch = kD + 4;
  static constexpr int kVec = kVec16<scalar_t>;
  static constexpr int kVecsPerRow = kK / kVec;
  // Blocks per SM the register budget must allow: 3 (<= 85 registers) where the op streams memory
  // (kD <= 64), 2 (<= 128) where FMAs dominate; fp64 is left unconstrained (no spills).
  static constexpr int kMinBlocks = sizeof(acc) == 8 ? 1 : kD <= 64 ? 3 : 2;
  static_assert(kK % kVec == 0 && kK % 8 == 0, "stage width must split into vectors");
  static_assert(2 * kRows * kThreadCols <= kK * (kXPitch + kWPitch), "row partials must fit the operand space");
};

// QueryGrad at head dim 32 with fp32 accumulators (kRowsFoldDs) also sums dS = sum_i phi(q_i)
// (g_i / den_i)^T and dz = sum_i phi(qn_i) dd_i over the row tiles its block walks, one partial per
// block (DstateFold), so the backward does not read q and g again for a token reduction
// (18 -> 14 N D elements moved). After the product xt still holds g transposed (Dv <= kK: one
// stage); the epilogue writes phi(q_i) / den_i transposed into qs, and thread (tm, tn) adds
// dS[tm][tn + 8 j] over the tile's rows, 4 rows per 16-byte read (a quarter warp reads 8
// consecutive g columns at pitch 132: conflict-free; its qs row is a broadcast). dz stays per
// thread (its rows, its columns) until the block's last tile, then sums over thread rows in order.
template <typename scalar_t, int kD, RowsMode kMode>
constexpr bool kRowsFoldDs = kMode == RowsMode::QueryGrad && kD == 32 && sizeof(acc_t<scalar_t>) == 4;

// grid.x: any (grid-stride over heads * groups; a block walks every groups-th row tile of its
// head), block: kThreads. kRowsFoldDs: ds = the fold's dstate_reduce_args, one chunk per group.
template <typename scalar_t, int kD, RowsMode kMode>
__global__ void __launch_bounds__(kThreads, RowsConfig<scalar_t, kD>::kMinBlocks)
    rows_kernel(const LinearAttentionParams p, const BwdScratch s, int64_t groups, const TokenReduceArgs ds) {
  using Cfg = RowsConfig<scalar_t, kD>;
  using acc = typename Cfg::acc;
  constexpr int kTM = Cfg::kTM, kTN = Cfg::kTN, kK = Cfg::kK, kV = Cfg::kVec;
  constexpr int kXPitch = Cfg::kXPitch, kWPitch = Cfg::kWPitch, kThreadCols = Cfg::kThreadCols;
  constexpr bool kOut = kMode == RowsMode::Out;
  constexpr bool kQueries = kMode != RowsMode::KeyGrad;
  constexpr bool kFold = kRowsFoldDs<scalar_t, kD, kMode>;
  constexpr int kThreadRows = Cfg::kThreadRows;
  static_assert(!kFold || (kK == kD && kTN == 4 && kThreadCols == 8 && Cfg::kRows % 4 == 0),
                "the fold needs all of g in one stage and dS columns tn + 8 j");
  static_assert(!kFold || 2 * Cfg::kRows * kThreadCols <= kD * kXPitch, "the row partials must fit qs");
  // Out: x tile, W tile, phi(qn) tile, z slice; kFold: x tile, W tile, qs, fold sums. The row
  // partials of the epilogues reuse the x and W space once the reduction is done (qs with the
  // fold, which keeps g in xt).
  constexpr int kFoldSums = 8;  // per thread: dS[tm][tn + 8 j], dz[n0 + j], j < 4
  constexpr int kSmem = kK * kXPitch + kK * kWPitch + (kOut ? kK * kXPitch + kK : 0) +
                        (kFold ? kD * kXPitch + kFoldSums * kThreads : 0);
  __shared__ __align__(16) acc smem[kSmem];
  acc* const xt = smem;                // [kK][kXPitch]: f(x) transposed
  acc* const wt = xt + kK * kXPitch;   // [kK][kWPitch]
  acc* const st = wt + kK * kWPitch;   // [kK][kXPitch]: phi(qn) transposed (Out with q_norm)
  acc* const zs = st + kK * kXPitch;   // [kK]: z slice (Out)
  acc* const qs = st;                  // [kD][kXPitch] kFold: phi(q_i) / den_i transposed
  // [kFoldSums][kThreads] kFold: each thread's sums over the rows its block walks; in shared memory
  // rather than registers, which the product's register tile needs (80 at 3 blocks per SM).
  acc* const fold_sums = qs + kD * kXPitch;
  acc* const red = kFold ? qs : smem;  // [2][kRows][kThreadCols] after the reduction

  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const int64_t N = kQueries ? p.Nq : p.Nk;
  const acc* const w_all = static_cast<const acc*>(kQueries ? p.state : s.dstate);
  const acc* const z_all = static_cast<const acc*>(p.z);
  const bool side = kOut && p.normalize;         // the denominator's dot, summed with the product
  const bool own_side = side && p.has_qn;        // else phi(qn) = phi(q) is the x tile itself

  const int tid = threadIdx.x;
  const int tn = tid % kThreadCols, tm = tid / kThreadCols;
  const int m0 = tm * kTM, n0 = tn * kTN;
  const bool qn_aligned = rows_aligned<scalar_t>(p.qn, kV);
  const int64_t row_tiles = ceil_div(N, Cfg::kRows), items = p.B * p.H * groups;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform per block
    const int64_t bh = item / groups, b = bh / p.H, h = bh % p.H;
    const acc* const w = w_all + bh * Dk * Dv;
    if constexpr (kFold) {
#pragma unroll
      for (int j = 0; j < kFoldSums; ++j) fold_sums[j * kThreads + tid] = acc(0);
    }

    // Without the fold groups = row tiles: one tile per item, and no loop in the code.
    int64_t tile = item % groups;
    do {
      const int64_t r0 = tile * Cfg::kRows;
      RegTile<acc, kTM, kTN> c;
      acc side_acc[kTM];

      // c = f(x)[rows r0..] W (Din -> Dout columns), f = phi when x_phi; side_acc = phi(qn) . z (Out).
      // W[k][n] = M[k][n] (M Din x Dout) or M[n][k] when w_trans (M Dout x Din), M = S or dS.
      auto product = [&](const View4& x, bool x_phi, int Din, int Dout, bool w_trans) {
        c.zero();
#pragma unroll
        for (int i = 0; i < kTM; ++i) side_acc[i] = acc(0);
        const bool x_aligned = rows_aligned<scalar_t>(x, kV);
        for (int k0 = 0; k0 < Din; k0 += kK) {
          __syncthreads();  // the previous stage (or item's epilogue) is done with shared memory
          // x slice [kRows x kK], 16-byte loads along each row, stored transposed: xt[k][r].
          for (int idx = tid; idx < Cfg::kRows * Cfg::kVecsPerRow; idx += kThreads) {
            const int r = idx / Cfg::kVecsPerRow, kc = (idx % Cfg::kVecsPerRow) * kV;
            const int64_t row = r0 + r;
            acc xv[kV], sv[kV];
            if (row < N) {
              load_cols<kV>(x.row<const scalar_t>(b, h, row), k0 + kc, Din, x_aligned, xv);
              if (x_phi) phi_cols(p.feature_map, Din - (k0 + kc), xv);
              if (own_side) {
                load_cols<kV>(p.qn.row<const scalar_t>(b, h, row), k0 + kc, Din, qn_aligned, sv);
                phi_cols(p.feature_map, Din - (k0 + kc), sv);
              }
            } else {
#pragma unroll
              for (int e = 0; e < kV; ++e) xv[e] = sv[e] = acc(0);
            }
#pragma unroll
            for (int e = 0; e < kV; ++e) {
              xt[(kc + e) * kXPitch + r] = xv[e];
              if (own_side) st[(kc + e) * kXPitch + r] = sv[e];
            }
          }
          // W slice [kK x kD], 0 outside Din x Dout.
          if (w_trans) {
            // A warp reads 8 consecutive k of 4 rows of M (coalesced enough for L2, conflict-free stores).
            for (int idx = tid; idx < kK * kD; idx += kThreads) {
              const int k = (idx / (8 * kD)) * 8 + idx % 8, n = (idx / 8) % kD;
              wt[k * kWPitch + n] = k0 + k < Din && n < Dout ? w[int64_t(n) * Din + k0 + k] : acc(0);
            }
          } else {
            for (int idx = tid; idx < kK * kD; idx += kThreads) {
              const int k = idx / kD, n = idx % kD;
              wt[k * kWPitch + n] = k0 + k < Din && n < Dout ? w[int64_t(k0 + k) * Dout + n] : acc(0);
            }
          }
          if (side && tid < kK) zs[tid] = k0 + tid < Din ? z_all[bh * Dk + k0 + tid] : acc(0);
          __syncthreads();

#pragma unroll 8
          for (int k = 0; k < kK; ++k) c.fma(&xt[k * kXPitch + m0], &wt[k * kWPitch + n0]);
          if (side) {
            // phi(qn_i) . z: thread column tn takes k = tn, tn + kThreadCols, ... (balanced).
            const acc* const sx = own_side ? st : xt;
            for (int k = tn; k < kK; k += kThreadCols)
#pragma unroll
              for (int i = 0; i < kTM; ++i) side_acc[i] += sx[k * kXPitch + m0 + i] * zs[k];
          }
        }
      };

      // Row sums across the thread columns, each in a fixed order: red[slot][row][thread column].
      auto row_sums = [&](const acc (&part0)[kTM], const acc (&part1)[kTM], acc (&sum0)[kTM], acc (&sum1)[kTM]) {
        __syncthreads();  // red overlays the operands
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          red[(m0 + i) * kThreadCols + tn] = part0[i];
          red[(Cfg::kRows + m0 + i) * kThreadCols + tn] = part1[i];
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          sum0[i] = sum1[i] = acc(0);
          for (int t = 0; t < kThreadCols; ++t) {
            sum0[i] += red[(m0 + i) * kThreadCols + t];
            sum1[i] += red[(Cfg::kRows + m0 + i) * kThreadCols + t];
          }
        }
      };

      if constexpr (kMode == RowsMode::Out) {
        product(p.q, true, Dk, Dv, false);
        acc den[kTM];
#pragma unroll
        for (int i = 0; i < kTM; ++i) den[i] = acc(1);
        if (side) {
          acc unused[kTM];
          row_sums(side_acc, side_acc, den, unused);
#pragma unroll
          for (int i = 0; i < kTM; ++i) den[i] += static_cast<acc>(p.eps);
        }
        const bool out_aligned = rows_aligned<scalar_t>(p.out, kTN);
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          const int64_t row = r0 + m0 + i;
          if (row >= N) continue;
          const RowDivisor<acc> divisor(den[i]);
          acc o[kTN];
#pragma unroll
          for (int j = 0; j < kTN; ++j) o[j] = divisor.divide(c.c[i][j]);
          store_cols<kTN>(p.out.row<scalar_t>(b, h, row), n0, Dv, out_aligned, o);
        }
      } else if constexpr (kMode == RowsMode::QueryGrad) {
        // c = u = S g (columns a of Dk). g . num_i = phi(q_i) . u_i; den_i = phi(qn_i) . z + eps.
        product(p.grad_out, false, Dv, Dk, true);
        const bool q_aligned = rows_aligned<scalar_t>(p.q, kTN), qn4_aligned = rows_aligned<scalar_t>(p.qn, kTN);
        acc zv[kTN];
#pragma unroll
        for (int j = 0; j < kTN; ++j) zv[j] = n0 + j < Dk ? z_all[bh * Dk + n0 + j] : acc(0);
        acc g_num_part[kTM], den_part[kTM];
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          const int64_t row = r0 + m0 + i;
          g_num_part[i] = den_part[i] = acc(0);
          if (row >= N) continue;
          acc qv[kTN], qnv[kTN];
          load_cols<kTN>(p.q.row<const scalar_t>(b, h, row), n0, Dk, q_aligned, qv);
          load_cols<kTN>(p.qn.row<const scalar_t>(b, h, row), n0, Dk, qn4_aligned, qnv);
          phi_cols(p.feature_map, Dk - n0, qv);
          phi_cols(p.feature_map, Dk - n0, qnv);
#pragma unroll
          for (int j = 0; j < kTN; ++j) {
            if (n0 + j >= Dk) continue;  // u is not 0 there when g holds an Inf
            g_num_part[i] += qv[j] * c.c[i][j];
            den_part[i] += qnv[j] * zv[j];
          }
        }
        acc g_num[kTM], den[kTM];
        row_sums(g_num_part, den_part, g_num, den);
        acc* const inv_den_out = static_cast<acc*>(s.inv_den);
        acc* const dd_out = static_cast<acc*>(s.dd);
        const bool dq_aligned = rows_aligned<scalar_t>(p.dq, kTN), dqn_aligned = rows_aligned<scalar_t>(p.dqn, kTN);
        acc dz_tile[kTN];  // kFold: phi(qn_i) dd_i over this thread's rows of the tile
#pragma unroll
        for (int j = 0; j < kTN; ++j) dz_tile[j] = acc(0);
        if constexpr (kFold) __syncthreads();  // qs overlays red
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          const int64_t row = r0 + m0 + i;
          if (row >= N) {
            if constexpr (kFold) {  // rows past N add 0 to dS (g is 0 there in xt)
#pragma unroll
              for (int j = 0; j < kTN; ++j) qs[(n0 + j) * kXPitch + m0 + i] = acc(0);
            }
            continue;
          }
          const acc d = p.normalize ? den[i] + static_cast<acc>(p.eps) : acc(1);
          const acc inv = acc(1) / d;
          const acc dd = p.normalize ? -(g_num[i] / d) / d : acc(0);  // not / d^2: it overflows first
          if (!kFold && tn == 0) {
            inv_den_out[bh * N + row] = inv;
            dd_out[bh * N + row] = dd;
          }
          acc qv[kTN], qnv[kTN], dq[kTN], dqn[kTN];
          load_cols<kTN>(p.q.row<const scalar_t>(b, h, row), n0, Dk, q_aligned, qv);
          load_cols<kTN>(p.qn.row<const scalar_t>(b, h, row), n0, Dk, qn4_aligned, qnv);
          if constexpr (kFold) {  // qs = phi(q_i) / den_i, dz += phi(qn_i) dd_i (0 past Dk)
            acc fq[kTN], fqn[kTN];
#pragma unroll
            for (int j = 0; j < kTN; ++j) fq[j] = qv[j], fqn[j] = qnv[j];
            phi_cols(p.feature_map, Dk - n0, fq);
            phi_cols(p.feature_map, Dk - n0, fqn);
#pragma unroll
            for (int j = 0; j < kTN; ++j) {
              qs[(n0 + j) * kXPitch + m0 + i] = fq[j] * inv;
              dz_tile[j] += fqn[j] * dd;
            }
          }
          dphi_cols(p.feature_map, qv);
          dphi_cols(p.feature_map, qnv);
#pragma unroll
          for (int j = 0; j < kTN; ++j) {
            // dphi(q_i) = S da_i = u_i / den_i; the normaliser adds z dd_i through phi'(qn).
            dq[j] = through_phi(c.c[i][j] * inv, qv[j]);
            dqn[j] = p.normalize ? through_phi(zv[j] * dd, qnv[j]) : acc(0);
            if (!p.has_qn) dq[j] += dqn[j];
          }
          store_cols<kTN>(p.dq.row<scalar_t>(b, h, row), n0, Dk, dq_aligned, dq);
          if (p.has_qn) store_cols<kTN>(p.dqn.row<scalar_t>(b, h, row), n0, Dk, dqn_aligned, dqn);
        }
        if constexpr (kFold) {
          __syncthreads();  // qs is complete; xt still holds g^T (0 past N and Dv)
          // dS[tm][tn + 8 j] += sum_r qs[tm][r] g[r][tn + 8 j] over the tile's rows, 4 at a time.
          const int live = static_cast<int>(N - r0 < Cfg::kRows ? N - r0 : Cfg::kRows);
          acc ds_acc[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            ds_acc[j] = fold_sums[j * kThreads + tid];
            fold_sums[(4 + j) * kThreads + tid] += dz_tile[j];
          }
          for (int r = 0; r < live; r += 4) {
            acc qa[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) qa[e] = qs[tm * kXPitch + r + e];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) ds_acc[j] += qa[e] * xt[(tn + 8 * j) * kXPitch + r + e];
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) fold_sums[j * kThreads + tid] = ds_acc[j];
        }
      } else {  // KeyGrad
        const acc inv_nk = acc(1) / static_cast<acc>(p.Nk);
        product(p.k, true, Dk, Dv, false);  // c = dS^T phi(k_j)
        const bool dv_aligned = rows_aligned<scalar_t>(p.dv, kTN);
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          const int64_t row = r0 + m0 + i;
          if (row >= N) continue;
          acc dv[kTN];
#pragma unroll
          for (int j = 0; j < kTN; ++j) dv[j] = c.c[i][j] * inv_nk;
          store_cols<kTN>(p.dv.row<scalar_t>(b, h, row), n0, Dv, dv_aligned, dv);
        }
        product(p.v, false, Dv, Dk, true);  // c = dS v_j (columns a of Dk); k again, now from L2
        const acc* const dz_all = static_cast<const acc*>(s.dz);
        const bool k_aligned = rows_aligned<scalar_t>(p.k, kTN), kn_aligned = rows_aligned<scalar_t>(p.kn, kTN);
        const bool dk_aligned = rows_aligned<scalar_t>(p.dk, kTN), dkn_aligned = rows_aligned<scalar_t>(p.dkn, kTN);
        acc dzv[kTN];
#pragma unroll
        for (int j = 0; j < kTN; ++j) dzv[j] = p.normalize && n0 + j < Dk ? dz_all[bh * Dk + n0 + j] : acc(0);
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          const int64_t row = r0 + m0 + i;
          if (row >= N) continue;
          acc kv[kTN], knv[kTN], dk[kTN], dkn[kTN];
          load_cols<kTN>(p.k.row<const scalar_t>(b, h, row), n0, Dk, k_aligned, kv);
          load_cols<kTN>(p.kn.row<const scalar_t>(b, h, row), n0, Dk, kn_aligned, knv);
          dphi_cols(p.feature_map, kv);
          dphi_cols(p.feature_map, knv);
#pragma unroll
          for (int j = 0; j < kTN; ++j) {
            dk[j] = through_phi(c.c[i][j] * inv_nk, kv[j]);
            dkn[j] = p.normalize ? through_phi(dzv[j] * inv_nk, knv[j]) : acc(0);
            if (!p.has_kn) dk[j] += dkn[j];
          }
          store_cols<kTN>(p.dk.row<scalar_t>(b, h, row), n0, Dk, dk_aligned, dk);
          if (p.has_kn) store_cols<kTN>(p.dkn.row<scalar_t>(b, h, row), n0, Dk, dkn_aligned, dkn);
        }
      }
      tile += groups;
    } while (kFold && tile < row_tiles);
    if constexpr (kFold) {  // this block's dS, dz: the results (one group) or its group's partial
      ReduceItem it{};
      it.bh = bh, it.chunk = item % groups;
      const ReduceDst<acc> dst = reduce_dst<acc>(ds, it);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (tm < Dk && tn + 8 * j < Dv) dst.m[int64_t(tm) * Dv + tn + 8 * j] = fold_sums[j * kThreads + tid] * dst.scale;
      if (p.normalize) {  // uniform
        __syncthreads();  // every thread's dz sums are complete
        if (tid < Dk) {  // column tid: slot 4 + tid % 4 of the threads with tn = tid / 4
          acc sum = acc(0);
          for (int t = 0; t < kThreadRows; ++t) sum += fold_sums[(4 + tid % 4) * kThreads + t * kThreadCols + tid / 4];
          dst.side[tid] = sum * dst.scale;
        }
        __syncthreads();  // every sum is read before the block's next item zeroes them
      }
    }
  }
}

}  // namespace la
}  // namespace sola
