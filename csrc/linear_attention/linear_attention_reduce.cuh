// The token reduction shared by the forward (S, z) and the backward (dS, dz):
//   M = sum_t phi(x_t) (y_t s_t)^T  (Dm x Dn),   side = sum_t phi(xs_t) r_t  (Dm)
// See TokenReduceArgs. Deterministic: every sum runs in a fixed order, no atomics.
//
// Tiling. A block owns one (head, token chunk, kTile x kTile tile of M); each thread holds a 4 x 4
// register tile of M, so the 64 tile runs 256 threads and the 32 tile (Dm, Dn <= 32) 64 threads.
// (A 2 x 2 tile on 256 threads would need 4x the shared-memory reads per FMA, and at D = 32 the
// shared-memory pipe would then be slower than DRAM.) Tokens stream through shared memory kStage
// rows at a time: phi(x) and y are loaded with 16-byte loads (a warp reads whole row segments),
// converted to acc, and each thread then does 16 FMAs per token from two 16-byte shared reads
// (fp32; a warp's reads are broadcasts or contiguous, so no bank conflicts). Splitting the
// tokens into chunks keeps the GPU full when heads are few (plan_token_reduce); the chunk partials
// go to a workspace and combine_chunks_kernel sums them in chunk order.
#pragma once

#include "linear_attention/linear_attention_device.cuh"
#include "linear_attention/linear_attention_plan.h"
#include "vec_acc.cuh"

namespace sola {
namespace la {

// Which of a reduction's inputs allow kV-element vector loads (rows_aligned).
struct ReduceAlignment {
  bool x, y, xs;
};

template <typename scalar_t>
SOLA_HD ReduceAlignment reduce_alignment(const TokenReduceArgs& a, int kV) {
  return {rows_aligned<scalar_t>(a.x, kV), rows_aligned<scalar_t>(a.y, kV), rows_aligned<scalar_t>(a.xs, kV)};
}

// Row `t` of a reduction item's inputs: pointers into x, y and xs and the index into the
// per-(head, token) scales. A kernel whose threads load every kStep-th token steps them by whole
// rows: recomputing the 64-bit b * sb + h * sh + t * sn per token and input cost ~13 instructions.
template <typename scalar_t>
struct TokenRow {
  const scalar_t *x, *y, *xs;  // xs only with own_side (load_token), else null
  int64_t t, scale_idx;
  SOLA_HD TokenRow(const TokenReduceArgs& a, const ReduceItem& it, int64_t t0, bool own_side)
      : x(a.x.row<const scalar_t>(it.b, it.h, t0)),
        y(a.y.row<const scalar_t>(it.b, it.h, t0)),
        xs(own_side ? a.xs.row<const scalar_t>(it.b, it.h, t0) : nullptr),
        t(t0),
        scale_idx(it.bh * a.N + t0) {}
  SOLA_HD void step(const TokenReduceArgs& a, int rows) {
    x += rows * a.x.sn, y += rows * a.y.sn;
    if (xs) xs += rows * a.xs.sn;
    t += rows, scale_idx += rows;
  }
};

// The load stage's vectors of token row.t at tile columns col .. col + kV - 1, as acc: phi(x),
// y * y_scale and, with own_side, phi(xs) * s_scale; 0 past Dm / Dn and past the item's tokens.
template <int kV, typename scalar_t, bool kFast = false, typename acc>
SOLA_HD void load_token(const TokenReduceArgs& a, const ReduceItem& it, const TokenRow<scalar_t>& row, int col,
                        bool own_side, const ReduceAlignment& al, acc (&xv)[kV], acc (&yv)[kV], acc (&sv)[kV]) {
  if (row.t >= it.t_end) {
#pragma unroll
    for (int e = 0; e < kV; ++e) xv[e] = yv[e] = sv[e] = acc(0);
    return;
  }
  const int mc = it.mb + col, nc = it.nb + col;
  load_cols<kV>(row.x, mc, a.Dm, al.x, xv);
  load_cols<kV>(row.y, nc, a.Dn, al.y, yv);
  phi_cols<kFast>(a.fm, a.Dm - mc, xv);
  const acc ys = a.y_scale ? static_cast<const acc*>(a.y_scale)[row.scale_idx] : acc(1);
#pragma unroll
  for (int e = 0; e < kV; ++e) yv[e] *= ys;
  if (own_side) {
    load_cols<kV>(row.xs, mc, a.Dm, al.xs, sv);
    phi_cols<kFast>(a.fm, a.Dm - mc, sv);
    const acc ss = a.s_scale ? static_cast<const acc*>(a.s_scale)[row.scale_idx] : acc(1);
#pragma unroll
    for (int e = 0; e < kV; ++e) sv[e] *= ss;
  }
}

template <typename scalar_t, int kTile>
struct ReduceConfig {
  using acc = acc_t<scalar_t>;
  static constexpr int kTM = 4, kTN = 4;
  static constexpr int kThreadCols = kTile / kTN;  // as many thread rows
  static constexpr int kBlockThreads = kThreadCols * (kTile / kTM);  // 256 or 64
  // At least 768 threads per SM (<= 85 registers): enough loads in flight to stream tokens.
  static constexpr int kMinBlocks = sizeof(acc) == 4 ? 768 / kBlockThreads : 1;
  static constexpr int kStage = reduce_stage_rows(sizeof(acc) == 8);
  static constexpr int kVec = kVec16<scalar_t>;
  static constexpr int kVecsPerRow = kTile / kVec;
  // The stage tiles' rows are padded by 16 bytes: the side sums read one column of 8 consecutive rows
  // a quarter warp, conflict-free only when consecutive rows start in different bank groups (at
  // kTile they took 8-way conflicts: scripts/cuda_emulator MEMSTAT=1).
  static constexpr int kPitch = kTile + 16 / int(sizeof(acc));
  static_assert(kTile % kVec == 0 && kTile % kTM == 0, "tile must split evenly");
};

// grid.x: any (grid-stride over heads * chunks * tiles_m * tiles_n), block: kBlockThreads.
template <typename scalar_t, int kTile>
__global__ void __launch_bounds__(ReduceConfig<scalar_t, kTile>::kBlockThreads, ReduceConfig<scalar_t, kTile>::kMinBlocks)
    token_reduce_kernel(const TokenReduceArgs a) {
  using Cfg = ReduceConfig<scalar_t, kTile>;
  using acc = typename Cfg::acc;
  constexpr int kStage = Cfg::kStage, kTM = Cfg::kTM, kTN = Cfg::kTN, kV = Cfg::kVec;
  constexpr int kThreadCols = Cfg::kThreadCols, kBlockThreads = Cfg::kBlockThreads;
  constexpr int kPitch = Cfg::kPitch;
  __shared__ __align__(16) acc x_tile[kStage][kPitch];  // phi(x), 0 past Dm or the chunk
  __shared__ __align__(16) acc y_tile[kStage][kPitch];  // y * y_scale
  __shared__ __align__(16) acc s_tile[kStage][kPitch];  // phi(xs) * s_scale, unless side_is_x
  __shared__ acc side_red[kTile][kThreadCols];         // side partials of the thread columns

  const int tid = threadIdx.x;
  const int tn = tid % kThreadCols, tm = tid / kThreadCols;
  const int m0 = tm * kTM, n0 = tn * kTN;
  const ReduceAlignment al = reduce_alignment<scalar_t>(a, kV);
  const int64_t items = a.heads * a.chunks * a.tiles_m * a.tiles_n;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform per block
    const ReduceItem it = reduce_item(a, item);
    const int64_t t_begin = it.t_begin, t_end = it.t_end;
    const int mb = it.mb;
    const bool side = it.side;
    const bool own_side_tile = side && !a.side_is_x;

    RegTile<acc, kTM, kTN> m_acc;
    m_acc.zero();
    acc side_acc[kTM];
#pragma unroll
    for (int i = 0; i < kTM; ++i) side_acc[i] = acc(0);

    for (int64_t t0 = t_begin; t0 < t_end; t0 += kStage) {
      __syncthreads();  // the previous stage has been consumed
      for (int idx = tid; idx < kStage * Cfg::kVecsPerRow; idx += kBlockThreads) {
        const int r = idx / Cfg::kVecsPerRow, col = (idx % Cfg::kVecsPerRow) * kV;
        const int64_t t = t0 + r;
        acc xv[kV], yv[kV], sv[kV];
        load_token<kV>(a, it, TokenRow<scalar_t>(a, it, t, own_side_tile), col, own_side_tile, al, xv, yv, sv);
        // 16-byte stores: a quarter warp fills 32 banks with one stage row (per element a warp had hit
        // 8 banks, 4-way; nvcc does not merge them)
        store_vec16(&x_tile[r][col], xv);
        store_vec16(&y_tile[r][col], yv);
        if (own_side_tile) store_vec16(&s_tile[r][col], sv);
      }
      __syncthreads();
#pragma unroll 8
      for (int r = 0; r < kStage; ++r) m_acc.fma(&x_tile[r][m0], &y_tile[r][n0]);
      if (side) {
        // Thread column tn sums stage rows tn, tn + kThreadCols, ...: every thread does the same.
        const acc(*src)[kPitch] = own_side_tile ? s_tile : x_tile;
        for (int r = tn; r < kStage; r += kThreadCols)
#pragma unroll
          for (int i = 0; i < kTM; ++i) side_acc[i] += src[r][m0 + i];
      }
    }

    const ReduceDst<acc> dst = reduce_dst<acc>(a, it);
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int m = mb + m0 + i;
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int n = it.nb + n0 + j;
        if (m < a.Dm && n < a.Dn) dst.m[int64_t(m) * a.Dn + n] = m_acc.c[i][j] * dst.scale;
      }
    }
    if (side) {  // uniform per block
#pragma unroll
      for (int i = 0; i < kTM; ++i) side_red[m0 + i][tn] = side_acc[i];
      __syncthreads();
      if (tid < kTile && mb + tid < a.Dm) {
        acc sum = acc(0);
        for (int c = 0; c < kThreadCols; ++c) sum += side_red[tid][c];  // fixed order
        dst.side[mb + tid] = sum * dst.scale;
      }
      __syncthreads();  // side_red is free again for the next item
    }
  }
}

// Sums the chunk partials in chunk order: results = scale * sum_c partial_c. One thread per entry.
template <typename acc>
__global__ void __launch_bounds__(kThreads) combine_chunks_kernel(const TokenReduceArgs a) {
  const int64_t mn = int64_t(a.Dm) * a.Dn, per_head = mn + a.Dm, total = a.heads * per_head;
  const acc* partials = static_cast<const acc*>(a.partials);
  const acc scale = static_cast<acc>(a.scale);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t bh = e / per_head, r = e % per_head;
    if (r >= mn && !a.with_side) continue;
    const acc* src = partials + bh * a.chunks * per_head + r;
    acc sum = acc(0);
    for (int64_t c = 0; c < a.chunks; ++c) sum += src[c * per_head];
    if (r < mn) static_cast<acc*>(a.m_out)[bh * mn + r] = sum * scale;
    else static_cast<acc*>(a.side_out)[bh * a.Dm + (r - mn)] = sum * scale;
  }
}

}  // namespace la
}  // namespace sola
