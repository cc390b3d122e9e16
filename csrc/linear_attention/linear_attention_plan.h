// How the linear-attention CUDA kernels split their work: the arguments each kernel takes and
// the host-side sizing (token chunks, tiles, workspace). Plain C++, shared by the launchers and
// by anything that wants to replay the kernels' schedule.
#pragma once

#include <algorithm>
#include <cstdint>

#include "linear_attention/linear_attention.h"

namespace sola {
namespace la {

// ---- token reduction: M = sum_t phi(x_t) (y_t s_t)^T, side = sum_t phi(xs_t) r_t ---------------
// Forward: x = k, y = v, xs = kn -> S, z (times 1/Nk). Backward: x = q, y = grad_out scaled by
// 1/den_i, xs = qn scaled by dd_i -> dS, dz. One kernel template serves both.
struct TokenReduceArgs {
  View4 x, y, xs;
  int64_t H = 0, heads = 0, N = 0;
  int Dm = 0, Dn = 0;  // x and xs have Dm columns, y has Dn
  FeatureMap fm = FeatureMap::Elu;
  const void* y_scale = nullptr;  // acc per (head, token), or null for 1
  const void* s_scale = nullptr;  // acc per (head, token), or null for 1
  bool with_side = true;
  bool side_is_x = false;         // xs aliases x and s_scale is null: the side reuses the x tile
  // Fused RoPE (tensor-core kernel only): x is rotated by token t's angles (fp32 (N, Dm / 2)),
  // the side takes phi(x) unrotated (times s_scale); xs is not read.
  const void* rope_cos = nullptr;
  const void* rope_sin = nullptr;
  // Work split (plan_token_reduce).
  int tile = 64;                  // the block's square tile of M: 32 or 64
  int tiles_m = 1, tiles_n = 1;
  int64_t chunk_len = 0, chunks = 1;
  // Results, accumulator-typed: M (heads, Dm, Dn) and side (heads, Dm), times `scale`.
  void* m_out = nullptr;
  void* side_out = nullptr;
  double scale = 1.0;
  // chunks > 1: per-chunk partials (heads, chunks, Dm * Dn + Dm), summed in chunk order afterwards.
  void* partials = nullptr;
};

// Tokens per shared-memory stage: 32 x 64 fp32 values per operand (8 KiB), half as many for fp64.
constexpr int reduce_stage_rows(bool fp64) { return fp64 ? 16 : 32; }

// Threads the reduction aims for: about one wave of 2048 threads on each of an H100's 132 SMs
// (several waves of what registers let reside). A constant rather than the device's SM count, so
// the chunking and hence the rounding depend on the problem alone, not on the GPU it runs on.
constexpr int64_t kReduceTargetThreads = 1024 * 256;
// A chunk is at least this many stages, so partials stay small next to the tokens they sum.
constexpr int64_t kReduceMinChunkStages = 8;

// Fills the tile and chunk fields of a (shapes already set).
inline void plan_token_reduce(TokenReduceArgs& a, bool fp64) {
  // fp64 always takes the 64 tile (one instantiation); 32 avoids 4x padding work at D <= 32.
  a.tile = (!fp64 && a.Dm <= 32 && a.Dn <= 32) ? 32 : 64;
  a.tiles_m = static_cast<int>((a.Dm + a.tile - 1) / a.tile);
  a.tiles_n = static_cast<int>((a.Dn + a.tile - 1) / a.tile);
  const int64_t stage = reduce_stage_rows(fp64);
  const int64_t stages = std::max<int64_t>(1, (a.N + stage - 1) / stage);
  const int64_t block_threads = int64_t(a.tile) * a.tile / 16;  // one thread per 4 x 4 of the tile
  const int64_t base = a.heads * a.tiles_m * a.tiles_n * block_threads;
  const int64_t want = (kReduceTargetThreads + base - 1) / base;
  const int64_t max_chunks = std::max<int64_t>(1, stages / kReduceMinChunkStages);
  const int64_t chunks = std::min(want, max_chunks);
  a.chunk_len = (stages + chunks - 1) / chunks * stage;
  a.chunks = std::max<int64_t>(1, (a.N + a.chunk_len - 1) / a.chunk_len);
}

// One work item of a token reduction: (head, token chunk, tile of M), the tiles of one chunk
// adjacent so blocks sharing token rows run together (L2 reuse).
struct ReduceItem {
  int64_t bh, b, h, chunk, t_begin, t_end;
  int mb, nb;  // first row and column of the tile in M
  bool side;   // the first column of tiles also sums the side
};

SOLA_HD ReduceItem reduce_item(const TokenReduceArgs& a, int64_t item) {
  ReduceItem it;
  const int tile_n = static_cast<int>(item % a.tiles_n);
  item /= a.tiles_n;
  const int tile_m = static_cast<int>(item % a.tiles_m);
  item /= a.tiles_m;
  it.chunk = item % a.chunks, it.bh = item / a.chunks;
  it.b = it.bh / a.H, it.h = it.bh % a.H;
  it.mb = tile_m * a.tile, it.nb = tile_n * a.tile;
  it.t_begin = it.chunk * a.chunk_len;
  it.t_end = a.N < it.t_begin + a.chunk_len ? a.N : it.t_begin + a.chunk_len;
  it.side = a.with_side && tile_n == 0;
  return it;
}

// Where an item's sums go: straight into M and side (times scale) when the tokens are one chunk,
// else into its chunk's partial.
template <typename acc>
struct ReduceDst {
  acc* m;
  acc* side;
  acc scale;
};

template <typename acc>
SOLA_HD ReduceDst<acc> reduce_dst(const TokenReduceArgs& a, const ReduceItem& it) {
  if (a.chunks == 1) {
    return {static_cast<acc*>(a.m_out) + it.bh * a.Dm * a.Dn, static_cast<acc*>(a.side_out) + it.bh * a.Dm,
            static_cast<acc>(a.scale)};
  }
  acc* m = static_cast<acc*>(a.partials) + (it.bh * a.chunks + it.chunk) * (int64_t(a.Dm) * a.Dn + a.Dm);
  return {m, m + int64_t(a.Dm) * a.Dn, acc(1)};
}

// Accumulator elements of the partials buffer (0 when one chunk writes the results directly).
inline int64_t token_reduce_workspace(const TokenReduceArgs& a) {
  return a.chunks > 1 ? a.heads * a.chunks * (int64_t(a.Dm) * a.Dn + a.Dm) : 0;
}

// ---- row products: a tile of token rows times a per-head matrix (linear_attention_rows.cuh) ----
enum class RowsMode : int {
  Out = 0,        // forward:  out = phi(q) S / (phi(qn) . z + eps)
  QueryGrad = 1,  // backward: u = S g; den, dd; dq (dqn); writes 1/den and dd per query, or sums dS, dz
  KeyGrad = 2,    // backward: dv = dS^T phi(k) / Nk; dk = phi'(k) (dS v) / Nk (+ phi'(kn) dz / Nk, or dkn)
};

// Blocks the row kernels that walk several row tiles of one head aim for (several per SM on any
// current GPU). A constant, so the grouping (and the fold's summation order) depends on the
// problem alone.
constexpr int64_t kRowsTargetBlocks = 1024;

// Row tiles per head a block walks over (its group): enough blocks in all for the target.
inline int64_t row_groups(int64_t heads, int64_t row_tiles) {
  return std::min(row_tiles, std::max<int64_t>(1, ceil_div(kRowsTargetBlocks, heads)));
}

// Whether the backward's QueryGrad kernel sums dS and dz itself (its head-dim 32 instantiations,
// fp32 accumulators: fp16 / bf16 / fp32 with Dk, Dv <= 32), so the token reduction over q and g
// does not run and 1 / den, dd are never written.
inline bool query_grad_sums_dstate(const LinearAttentionParams& p) {
  return p.dtype != at::kDouble && std::max(p.Dk, p.Dv) <= 32 && p.Nq > 0;
}

// Accumulator-typed buffers the backward passes between kernels.
struct BwdScratch {
  void* inv_den = nullptr;       // (heads, Nq): 1 / den_i, unless query_grad_sums_dstate
  void* dd = nullptr;            // (heads, Nq): -(g_i . num_i) / den_i^2, unless query_grad_sums_dstate
  void* dstate = nullptr;        // (heads, Dk, Dv)
  void* dz = nullptr;            // (heads, Dk)
};

// Forward pass 1: S = mean_j phi(k_j) v_j^T, z = mean_j phi(kn_j), written straight into the
// op's state and z.
inline TokenReduceArgs state_reduce_args(const LinearAttentionParams& p) {
  TokenReduceArgs a;
  a.x = p.k, a.y = p.v, a.xs = p.kn;
  a.H = p.H, a.heads = p.B * p.H, a.N = p.Nk;
  a.Dm = static_cast<int>(p.Dk), a.Dn = static_cast<int>(p.Dv);
  a.fm = p.feature_map;
  a.with_side = true;  // z is an output even with normalize=False
  a.side_is_x = !p.has_kn;
  a.rope_cos = p.rope_cos, a.rope_sin = p.rope_sin;
  a.m_out = p.state, a.side_out = p.z;
  a.scale = 1.0 / static_cast<double>(p.Nk);
  plan_token_reduce(a, p.dtype == at::kDouble);
  return a;
}

// Backward: dS = sum_i phi(q_i) (g_i / den_i)^T, dz = sum_i phi(qn_i) dd_i (after QueryGrad).
inline TokenReduceArgs dstate_reduce_args(const LinearAttentionParams& p, const BwdScratch& s) {
  TokenReduceArgs a;
  a.x = p.q, a.y = p.grad_out, a.xs = p.qn;
  a.H = p.H, a.heads = p.B * p.H, a.N = p.Nq;
  a.Dm = static_cast<int>(p.Dk), a.Dn = static_cast<int>(p.Dv);
  a.fm = p.feature_map;
  a.y_scale = s.inv_den, a.s_scale = s.dd;
  a.with_side = p.normalize;  // without it dd = 0 and dz is never read
  a.side_is_x = false;
  a.rope_cos = p.rope_cos, a.rope_sin = p.rope_sin;
  a.m_out = s.dstate, a.side_out = s.dz;
  a.scale = 1.0;
  plan_token_reduce(a, p.dtype == at::kDouble);
  return a;
}

}  // namespace la
}  // namespace sola
