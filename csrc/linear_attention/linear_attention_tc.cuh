// Tensor-core versions of the two linear-attention kernels, for fp16/bf16 inputs on sm_80+:
// the same work split and epilogues as linear_attention_reduce.cuh and linear_attention_rows.cuh,
// with the products on mma.sync. tf32 (mma_tf32.cuh): operands are computed in fp32 (feature map,
// scales) and rounded once to tf32, which holds an fp16/bf16 input exactly and phi of it to 2^-11;
// the fp32 states S / dS enter split into hi + lo tf32 parts (two mmas, ~21 bits). 16-bit
// (mma_f16.cuh; by default where it qualifies, SOLA_LINEAR_MMA): the forward's token reduction
// (fp16, bf16) and bf16's staged row kernels round phi (and the fold's phi(q) / den) once to the
// input dtype, as PyTorch's composite in that dtype does, and take the states as bf16 hi + lo parts
// (~16 bits). Accumulation is fp32; sums that the SIMT kernels do in fp32 (z, the denominators,
// g . num) stay in fp32 on unrounded values. Deterministic: fixed orders, no atomics.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cp_async.cuh"
#include "cuda_utils.cuh"
#include "mma_f16.cuh"
#include "mma_tf32.cuh"
#include "rope/rope.h"
#include "vec_acc.cuh"
#include "linear_attention/linear_attention_cuda.cuh"
#include "linear_attention/linear_attention_reduce.cuh"
#include "linear_attention/linear_attention_rows.cuh"

namespace sola {
namespace la {

// ---- token reduction ----------------------------------------------------------------------------

// This thread's first load row (then every kRowsPerPass-th) of a config's row-major tiles: kMma16's
// rows of 4 16-byte vectors (the 32 tile) are padded to 5 bank groups (quarter_warp_row). Not tf32:
// store_row8 pairs a quarter warp's adjacent rows.
template <bool kMma16, int kVecsPerRow>
SOLA_HD int first_load_row(int tid) {
  if constexpr (kMma16 && kVecsPerRow == 4) return quarter_warp_row(tid);
  else return tid / kVecsPerRow;
}

// One k8 step of c[n] += X^T Y_n over tokens, both tiles stored [token][column] with pitch kLd:
// A = 16 columns of x from x0 (&x[k0][m0]) read transposed (a0 = x[k0 + t][m0 + g]), B_n = 8
// columns of y from y0 + 8 n (&y[k0][n0 + 8 n]); the n tiles from n_live on are skipped. At a
// pitch of 8 (mod 32) both reads are conflict-free; at 4 (QueryGrad's fold, whose tiles the row
// product reads the other way) they take 2-way conflicts (t * 4 + g repeats for g >= 4).
template <int kLd, int kNT>
SOLA_HD void mma_tokens_k8(float (&c)[kNT][4], const float* x0, const float* y0, int n_live, int lane) {
  const int g = lane / 4, t4 = lane % 4;
  const float* a = x0 + t4 * kLd + g;
  const uint32_t af[4] = {tf32::bits(a[0]), tf32::bits(a[8]), tf32::bits(a[4 * kLd]), tf32::bits(a[4 * kLd + 8])};
  const float* b = y0 + t4 * kLd + g;
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
    if (n >= n_live) continue;  // uniform
    const uint32_t bf[2] = {tf32::bits(b[8 * n]), tf32::bits(b[4 * kLd + 8 * n])};
    tf32::mma_1688(c[n], af, bf);
  }
}

// The same on 16-bit operands, one k16 step (mma.sync m16n8k16): A = 16 columns of x from x0 (&x[k0][m0])
// by ldmatrix.trans, B_n = 8 columns of y from y0 + 8 n (&y[k0][n0 + 8 n]) in pairs, also by
// ldmatrix.trans. Row pitches kLdX, kLdY: an odd number of 16-byte groups (conflict-free ldmatrix).
template <int kLdX, int kLdY, int kNT, typename T>
SOLA_DEVICE void mma_tokens_k16(float (&c)[kNT][4], const T* x0, const T* y0, int lane) {
  static_assert(kNT % 2 == 0, "B loads come in n8 tile pairs");
  const mma16::FragA af = mma16::load_a_trans(x0, kLdX, 0, 0, lane);
#pragma unroll
  for (int n = 0; n < kNT; n += 2) {
    const mma16::FragB2 bf = mma16::load_b(y0, kLdY, 0, 8 * n, lane);
    mma16::mma_16816<T>(c[n], af, bf.lo);
    mma16::mma_16816<T>(c[n + 1], af, bf.hi);
  }
}

// A block owns one (head, token chunk, kTile x kTile tile of M), as the SIMT kernel; each warp owns
// 16 rows of the tile and all its columns (kTile / 8 accumulator tiles). The inputs arrive by
// cp.async into raw stages as stored, the next stage's copies in flight while this one is mapped and
// multiplied (loads issued only after each barrier had left DRAM at 19% of its bandwidth on an H200:
// 4-8 blocks per SM, each waiting for its own loads). A thread maps only the vectors it copied
// itself. The side sum is kept per loading thread in fp32 on unrounded values and summed across
// threads in order.
//
// Two ways to multiply (kMma16):
// - tf32 (m16n8k8): the stage is mapped into fp32 [token][column] tiles, A = phi(x)^T read
//   transposed (a0 = x_tile[k + t][m + g]), B = y * y_scale as stored; both reads conflict-free
//   at the row pitch kTile + 8. Every reduction can take it (y_scale's g / den needs fp32 range).
// - 16-bit (m16n8k16, kMma16): the forward's S = sum phi(k) v^T (fp16, bf16) and bf16's backward
//   dS = sum phi(q) (g / den)^T. A thread writes phi(x) (rotated with RoPE), rounded to the input
//   dtype, back over the raw x it copied, and y * y_scale over its raw y when there is a y_scale;
//   A and B come from there by ldmatrix.trans. Half the mmas, no fp32 tiles, and an unscaled y is
//   never mapped: the tf32 path's mapping (unpack, round, store, re-read as fragments) was most of
//   its ~2800 instructions (SASS, bf16 tile 32; 16 HMMA). phi(x) and g / den round to the input's
//   dtype, as PyTorch's composite in that dtype rounds them; products of 16-bit operands are exact
//   in the fp32 accumulators. fp16 stays on tf32 with RoPE (a rotation can carry phi(x) near fp16's
//   largest value past it) and with scales (g / den needs fp32's range).
template <typename scalar_t, int kTile, bool kMma16 = false>
struct ReduceTcConfig {
  static constexpr int kWarps = kTile / 16;
  static constexpr int kBlockThreads = 32 * kWarps;  // 128 for the 64 tile, 64 for the 32 tile
  static constexpr int kNT = kTile / 8;
  static constexpr int kStage = 32;      // tokens per stage: 4 k8 steps, 2 k16 steps
  static constexpr int kRawStages = 2;   // copied as stored: the one being mapped and the next
  static constexpr int kLd = kTile + 8;  // tf32 tiles: = 8 (mod 32), reads at t * kLd + g hit 32 banks
  static constexpr int kVec = kVec16<scalar_t>;
  static constexpr int kVecsPerRow = kTile / kVec;
  static constexpr int kRowsPerPass = kBlockThreads / kVecsPerRow;
  static constexpr int kPasses = kStage / kRowsPerPass;
  // Register cap 128: 512 threads per SM for the 64 tile, keeping loads in flight.
  static constexpr int kMinBlocks = 65536 / (128 * kBlockThreads);
  static_assert(kStage % kRowsPerPass == 0, "a stage must be whole load passes");
  static_assert(kVec * sizeof(scalar_t) == 16, "a load vector is one 16-byte cp.async");
  // Raw stage rows: as stored for tf32 (read back only by the thread that copied them); padded by 16
  // bytes for kMma16's ldmatrix (an odd number of 16-byte groups a row: 8 rows fill 32 banks).
  static constexpr int kRawLd = kMma16 ? kTile + 8 : kTile;
  // Dynamic shared memory, in this order: x_tile, y_tile (tf32 only: kStage x kLd fp32 each),
  // side_red (kRowsPerPass x kTile fp32), then per raw stage the arrays x, y, xs as stored (with fused
  // RoPE xs's place holds the stage's cos, fp32, kRawLd / 2 per token: the same bytes, and one more
  // array its sin), then the rows' scales (y_scale, s_scale): tf32 [stage][y, s][kStage], copied by a
  // row's first thread and read by all after a barrier; kMma16 [stage][y, s][pass][thread], each thread
  // its own rows' (read before any barrier), and only for a reduction with scales. At the 64 tile:
  // tf32 47.6 KB without RoPE, 55.8 KB with it (4 blocks per SM); kMma16 31.7 / 41.0 KB, + 4.1 KB scaled.
  static constexpr int kRawElems = kStage * kRawLd;  // one raw array of a stage
  static constexpr int kRawArrays = 3;               // x, y, xs (or cos); + sin with RoPE
  static constexpr int kTileFloats = kMma16 ? 0 : 2 * kStage * kLd;
  static constexpr int kFloatsBeforeRaw = kTileFloats + kRowsPerPass * kTile;
  static constexpr int kScaleFloats = kRawStages * 2 * (kMma16 ? kPasses * kBlockThreads : kStage);
  static constexpr int raw_arrays(bool rope) { return kRawArrays + (rope ? 1 : 0); }
  static constexpr int smem_bytes(bool rope, bool scaled) {
    return 4 * kFloatsBeforeRaw + kRawStages * raw_arrays(rope) * kRawElems * int(sizeof(scalar_t)) +
           (scaled || !kMma16 ? 4 * kScaleFloats : 0);
  }
  static_assert(kFloatsBeforeRaw % 4 == 0 && kRawElems * sizeof(scalar_t) % 16 == 0, "16-byte aligned arrays");
};

// Copies kV columns of a token row from col on into a raw stage slot: one cp.async for a whole
// aligned vector, else load_cols' element loads (a partial last vector, a misaligned view; 0 past
// n), all 0 when the row is not one of the item's tokens.
template <int kV, typename scalar_t>
SOLA_DEVICE void copy_cols_async(scalar_t* slot, const scalar_t* row, int col, int n, bool aligned, bool live) {
  if (live && aligned && col + kV <= n) {
    cp_async_16(slot, row + col);
    return;
  }
  Vec<scalar_t, kV> x;
  if (live) {
    load_cols<kV>(row, col, n, aligned, x.v);
  } else {
#pragma unroll
    for (int e = 0; e < kV; ++e) x.v[e] = scalar_t(0);
  }
  *reinterpret_cast<Vec<scalar_t, kV>*>(slot) = x;
}

// slot = scales[idx] (one cp.async), or 1 without scales or when the row is not one of the item's tokens.
SOLA_DEVICE void copy_scale_async(float* slot, const void* scales, int64_t idx, bool live) {
  if (live && scales) cp_async_4(slot, static_cast<const float*>(scales) + idx);
  else *slot = 1.f;
}

// grid.x: any (grid-stride over heads * chunks * tiles_m * tiles_n), block: kBlockThreads,
// dynamic shared memory smem_bytes(kRope, a.y_scale || a.s_scale). kRope: a.rope_cos is set (a
// template parameter: as a run-time switch its few extra live values cost the 64 tile 36 bytes of
// spill at the 128 cap). kMma16: 16-bit products (ReduceTcConfig).
template <typename scalar_t, int kTile, bool kRope, bool kMma16>
__global__ void __launch_bounds__(ReduceTcConfig<scalar_t, kTile, kMma16>::kBlockThreads,
                                  ReduceTcConfig<scalar_t, kTile, kMma16>::kMinBlocks)
    token_reduce_tc_kernel(const TokenReduceArgs a) {
  using Cfg = ReduceTcConfig<scalar_t, kTile, kMma16>;
  constexpr int kStage = Cfg::kStage, kLd = Cfg::kLd, kV = Cfg::kVec, kNT = Cfg::kNT, kRawElems = Cfg::kRawElems;
  constexpr int kRowsPerPass = Cfg::kRowsPerPass, kPasses = Cfg::kPasses, kRawLd = Cfg::kRawLd;
  SOLA_DYNAMIC_SMEM(smem_raw);
  float* const x_tile = reinterpret_cast<float*>(smem_raw);  // tf32: phi(x) (rotated with RoPE), 0 past Dm or the chunk
  float* const y_tile = x_tile + kStage * kLd;                // tf32: y * y_scale
  float* const side_red = x_tile + Cfg::kTileFloats;          // side sums of the threads' load rows
  // [stage][x, y, xs or cos, (sin)][kStage][kRawLd]: the rows as stored, [token][column]; kMma16
  // writes phi(x) over x and y * y_scale over y.
  scalar_t* const raw = reinterpret_cast<scalar_t*>(side_red + kRowsPerPass * kTile);
  constexpr int raw_arrays = Cfg::raw_arrays(kRope);
  float* const scales = reinterpret_cast<float*>(raw + Cfg::kRawStages * raw_arrays * kRawElems);

  const int half = a.Dm / 2;
  auto raw_at = [&](int stage, int array) { return raw + (stage * raw_arrays + array) * kRawElems; };
  // With RoPE: the angles of the stage's tokens, [token][kRawLd / 2] fp32 in arrays 2 (cos) and 3 (sin).
  auto table_at = [&](int stage, int array) { return reinterpret_cast<float*>(raw_at(stage, array)); };
  const int tid = threadIdx.x, lane = tid % 32, m0 = 16 * (tid / 32);
  // This thread loads columns lc .. lc + kV - 1 of stage rows lr, lr + kRowsPerPass, ...
  const int lr = first_load_row<kMma16, Cfg::kVecsPerRow>(tid), lc = (tid % Cfg::kVecsPerRow) * kV;
  const ReduceAlignment al = reduce_alignment<scalar_t>(a, kV);
  const bool table_al = kRope && rope_tables_aligned<float>(a.rope_cos, a.rope_sin, half, kV / 2);
  const int64_t items = a.heads * a.chunks * a.tiles_m * a.tiles_n;
  // The scale (0: y_scale, 1: s_scale) of stage row r, this thread's pass p (ReduceTcConfig's layout).
  auto scale_at = [&](int stage, int which, int p, int r) -> float* {
    if constexpr (kMma16) return scales + ((stage * 2 + which) * kPasses + p) * Cfg::kBlockThreads + tid;
    else return scales + (stage * 2 + which) * kStage + r;
  };
  const bool scaled = !kMma16 || a.y_scale || a.s_scale;  // kMma16: the scales are read at all
  const bool y_mapped = !kMma16 || a.y_scale;             // kMma16: y is scaled over its raw copy

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform per block
    const ReduceItem it = reduce_item(a, item);
    const bool own_side = it.side && !a.side_is_x && !kRope;
    const bool side_scaled = own_side || (kRope && it.side);  // the side's rows take s_scale
    float c[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[n][e] = 0.f;
    float side_acc[kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) side_acc[e] = 0.f;

    // This thread's rows: lr, lr + kRowsPerPass, ..., copied into raw stage `stage`; with tf32 the
    // first thread of a row also copies its scales (read by all after the barrier), with kMma16 every
    // thread its own.
    TokenRow<scalar_t> row(a, it, it.t_begin + lr, own_side);
    auto copy_stage = [&](int stage) {
#pragma unroll
      for (int p = 0; p < kPasses; ++p, row.step(a, kRowsPerPass)) {
        const int r = lr + p * kRowsPerPass, slot = r * kRawLd + lc;
        const bool live = row.t < it.t_end;
        copy_cols_async<kV>(raw_at(stage, 0) + slot, row.x, it.mb + lc, a.Dm, al.x, live);
        copy_cols_async<kV>(raw_at(stage, 1) + slot, row.y, it.nb + lc, a.Dn, al.y, live);
        if (own_side) copy_cols_async<kV>(raw_at(stage, 2) + slot, row.xs, it.mb + lc, a.Dm, al.xs, live);
        if constexpr (kRope) {  // the vector's kV / 2 channel pairs: 16 bytes of each table
          const int64_t t_row = live ? row.t * half : 0;
          const int pc = (it.mb + lc) / 2;
          copy_cols_async<kV / 2>(table_at(stage, 2) + slot / 2, static_cast<const float*>(a.rope_cos) + t_row, pc,
                                  half, table_al, live);
          copy_cols_async<kV / 2>(table_at(stage, 3) + slot / 2, static_cast<const float*>(a.rope_sin) + t_row, pc,
                                  half, table_al, live);
        }
        if (kMma16 ? scaled : lc == 0) {
          copy_scale_async(scale_at(stage, 0, p, r), a.y_scale, row.scale_idx, live);
          copy_scale_async(scale_at(stage, 1, p, r), side_scaled ? a.s_scale : nullptr, row.scale_idx, live);
        }
      }
      cp_async_commit();
    };
    if constexpr (kMma16) __syncthreads();  // every warp has read the previous item's last stage
    copy_stage(0);
    int stage = 0;
    for (int64_t t0 = it.t_begin; t0 < it.t_end; t0 += kStage, stage ^= 1) {
      if constexpr (kMma16) __syncthreads();  // every warp has read the other stage's fragments
      if (t0 + kStage < it.t_end) {  // uniform
        copy_stage(stage ^ 1);  // tf32: its previous contents were mapped before the last barrier
        cp_async_wait<1>();     // this stage's copies have landed
      } else {
        cp_async_wait<0>();
      }
      // tf32: the previous stage's tiles have been consumed; every thread's copies (scales) are visible
      if constexpr (!kMma16) __syncthreads();
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        const int r = lr + p * kRowsPerPass, slot = r * kRawLd + lc;
        const bool live = t0 + r < it.t_end;
        using V = Vec<scalar_t, kV>;
        float xv[kV], yv[kV], sv[kV];
        if (live) {
          // load_token's mapping: phi(x), y * y_scale, phi(xs) * s_scale
          const V x = *reinterpret_cast<const V*>(raw_at(stage, 0) + slot);
          const int valid = a.Dm - (it.mb + lc);
          const float ss = scaled ? *scale_at(stage, 1, p, r) : 1.f;
#pragma unroll
          for (int e = 0; e < kV; ++e) xv[e] = static_cast<float>(x.v[e]);
          phi_cols<true>(a.fm, valid, xv);
          if (y_mapped) {
            const V y = *reinterpret_cast<const V*>(raw_at(stage, 1) + slot);
            const float ys = *scale_at(stage, 0, p, r);
#pragma unroll
            for (int e = 0; e < kV; ++e) yv[e] = static_cast<float>(y.v[e]) * ys;
          }
          if (own_side) {
            const V xs = *reinterpret_cast<const V*>(raw_at(stage, 2) + slot);
#pragma unroll
            for (int e = 0; e < kV; ++e) sv[e] = static_cast<float>(xs.v[e]);
            phi_cols<true>(a.fm, valid, sv);
#pragma unroll
            for (int e = 0; e < kV; ++e) sv[e] *= ss;
          } else if constexpr (kRope) {  // the side takes phi(x) unrotated; the product its rotation
            using T = Vec<float, kV / 2>;  // one 16-byte read each (per element: 4-way bank conflicts)
            const T cs = *reinterpret_cast<const T*>(table_at(stage, 2) + slot / 2);
            const T sn = *reinterpret_cast<const T*>(table_at(stage, 3) + slot / 2);
#pragma unroll
            for (int e = 0; e < kV; ++e) sv[e] = xv[e] * ss;
#pragma unroll
            for (int j = 0; j < kV / 2; ++j)
              rotate_pair(xv[2 * j], xv[2 * j + 1], cs.v[j], sn.v[j], xv[2 * j], xv[2 * j + 1]);
          }
        } else {
#pragma unroll
          for (int e = 0; e < kV; ++e) xv[e] = yv[e] = sv[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < kV; ++e)
          if (it.side) side_acc[e] += side_scaled ? sv[e] : xv[e];
        if constexpr (kMma16) {
          if (live) {  // rows past the chunk were copied as 0, and y is 0 there
            store_acc(xv, raw_at(stage, 0) + slot);
            if (y_mapped) store_acc(yv, raw_at(stage, 1) + slot);
          }
        } else {
#pragma unroll
          for (int e = 0; e < kV; ++e) {
            xv[e] = tf32::from_bits(tf32::round(xv[e]));
            yv[e] = tf32::from_bits(tf32::round(yv[e]));
          }
          store_row8<kLd, Cfg::kVecsPerRow>(x_tile + r * kLd + lc, xv, tid);
          store_row8<kLd, Cfg::kVecsPerRow>(y_tile + r * kLd + lc, yv, tid);
        }
      }
      __syncthreads();
      if constexpr (kMma16) {
#pragma unroll
        for (int k0 = 0; k0 < kStage; k0 += 16)
          mma_tokens_k16<kRawLd, kRawLd>(c, raw_at(stage, 0) + k0 * kRawLd + m0, raw_at(stage, 1) + k0 * kRawLd, lane);
      } else {
#pragma unroll
        for (int k0 = 0; k0 < kStage; k0 += 8) mma_tokens_k8<kLd>(c, x_tile + k0 * kLd + m0, y_tile + k0 * kLd, kNT, lane);
      }
    }
    cp_async_wait_all();  // an item without tokens still committed its (empty) first stage

    const ReduceDst<float> dst = reduce_dst<float>(a, it);
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = it.mb + m0 + tf32::acc_row(e, lane), col = it.nb + 8 * n + tf32::acc_col(e, lane);
        if (m < a.Dm && col < a.Dn) dst.m[int64_t(m) * a.Dn + col] = c[n][e] * dst.scale;
      }
    if (it.side) {  // uniform per block
      store_row8<kTile, Cfg::kVecsPerRow>(side_red + lr * kTile + lc, side_acc, tid);
      __syncthreads();
      if (tid < kTile && it.mb + tid < a.Dm) {
        float sum = 0.f;
        for (int r = 0; r < kRowsPerPass; ++r) sum += side_red[r * kTile + tid];  // fixed order
        dst.side[it.mb + tid] = sum * dst.scale;
      }
      __syncthreads();  // side_red is free again for the next item
    }
  }
}

// ---- row products ---------------------------------------------------------------------------------
// A block owns one head's S (or dS) in shared memory, fp32 as stored (Dk x Dv, 0-padded to kD), and
// walks over every `groups`-th tile of kRows rows of that head, so the state is read from L2 once
// per block rather than once per row tile. Per tile the A rows (phi(q), g, phi(k) or v) are loaded
// with 16-byte loads, mapped in fp32, rounded to tf32 into [row][column] (pitch kD + 4: reads at
// g * pitch + t hit 32 banks); each warp multiplies its 16 rows by the whole state (kD / 8
// accumulator tiles) as hi + lo tf32 parts. At kD 32, and at 64 where the smem allows, the parts
// are split once per state into two smem arrays (split per tile, they cost ~10 issue slots per mma
// pair, more than the row kernels can spare at head dim 32); elsewhere (kD 128, and the staged kD 64
// backward) a second array would cost blocks per SM, so the state is split on the fly. Epilogues
// work on the accumulator fragments: a row's 4 owning lanes sum their parts with two xor shuffles
// (identical in all four). bf16's row kernels with staged tiles take 16-bit products instead
// (RowsTcConfig::kMma16): A from bf16 tiles, the state as bf16 hi + lo parts.
//
// QueryGrad at kD = 32 also sums dS = sum_i phi(q_i) (g_i / den_i)^T and dz = sum_i phi(qn_i) dd_i
// over the rows it walks (kFoldDs), one partial per block, so the backward does not read q and g a
// second time for a token reduction (18 -> 14 N D bytes moved). The epilogue leaves
// tf32(phi(q_i) / den_i) in qs next to g in xs (kMma16: bf16 in qs, g as staged); the four warps
// then split the kD x kD product qs^T g (16 x 8 tiles, K = the tile's rows). dz stays fp32 on
// unrounded values: per lane, then xor shuffles over the 8 row lanes, then per warp in smem.
//
// kVariant (rows_variant(): SOLA_LINEAR_ROWS) picks how the row kernels load their tiles, so the
// benchmark can time the choices in one run until the staging is measured: Staged (the default,
// below), Unstaged (as before staging), StagedPreSplit (the kD 64 backward staged with the state
// pre-split: 2 blocks per SM instead of 3, for fewer issue slots per tile).
enum class RowsVariant : int { Staged = 0, Unstaged = 1, StagedPreSplit = 2 };

// kMma16Asked: bf16 inputs, and 16-bit products not declined (SOLA_LINEAR_MMA); kMma16 below says where
// they are taken.
template <int kD, RowsMode kMode, RowsVariant kVariant = RowsVariant::Staged, bool kMma16Asked = false>
struct RowsTcConfig {
  static constexpr int kThreads = 128, kRows = 64;  // 4 warps x 16 rows
  static constexpr int kNT = kD / 8;
  // At kD 32 QueryGrad sums dS itself (kFoldDs, below; at kD 64 it took 213 registers, 128 without:
  // 4 -> 2 blocks per SM).
  static constexpr bool kFoldDs = kMode == RowsMode::QueryGrad && kD == 32;
  // The row product reads xs as A (xs[g][t]: conflict-free at a pitch of 4 mod 32, 2-way at 8). The
  // fold reads xs and qs transposed (mma_tokens_k8: conflict-free at 8, 2-way at 4), 64 loads a warp
  // and tile against the product's 16: pitch 8 mod 32 there.
  static constexpr int kXLd = kFoldDs ? kD + 8 : kD + 4;
  // Out reads the state as B (W[k + t][n + g], pitch = 8 mod 32 conflict-free); QueryGrad reads it
  // transposed (W[n + g][k + t], pitch = 4 mod 32); KeyGrad both (its dv product takes 2-way conflicts).
  static constexpr int kWLd = kMode == RowsMode::Out ? kD + 8 : kD + 4;
  // Staged tiles (kStaged): every input row of a tile (Out: q, qn; QueryGrad: g, q, qn; KeyGrad: k,
  // v, kn; qn / kn only when given) and with fused RoPE its angles arrive by cp.async into one of
  // two stages, the next tile's copies in flight while this one is multiplied; the epilogues read
  // their operands there too. The first profile (H200) had these kernels at 9-24% of DRAM
  // bandwidth: each tile's loads, then the epilogue's, waited with nothing else in flight. kD 32 and
  // 64; at 64 the tf32 backward splits the state on the fly (kPreSplit false) to pay for the stages:
  // 72 KiB without RoPE, 3 blocks per SM on an H100 as before (2 on an A100). kD 128's state takes
  // 66-68 KiB: it loads as before.
  static constexpr bool kStaged = kVariant != RowsVariant::Unstaged && kD <= 64;
  // kMma16 (bf16 with staged tiles): products on m16n8k16, A by ldmatrix from bf16 tiles and the
  // state as bf16 hi + lo parts (~16 of fp32's 24 bits; tf32's hi + lo kept ~21): no fp32 A tile,
  // half the mmas, fragment loads in place of per-element reads. Out: each thread writes phi(q)
  // (rotated with RoPE; fp32 math, one rounding) back over the staged q vector it copied. KeyGrad:
  // phi(k) goes to a bf16 tile (the epilogue still reads k), and v is A as staged. QueryGrad: g is A
  // as staged; the fold's phi(q_i) / den_i goes to a bf16 tile, B = g as staged. No mapping pass for
  // g or v at all. Roundings to bf16 are where PyTorch's composite in bf16 rounds too. Not fp16: its
  // range cannot hold every S, dS or phi(q) / den.
  static constexpr bool kMma16 = kMma16Asked && kStaged;
  static constexpr int kW16Ld = kD + 8;  // kMma16: bf16 tile rows; 16-byte rows, ldmatrix hits 32 banks
  // Blocks per SM the registers must allow at kD 32 / 64: 3, as their smem does (Out at kD 32: 4,
  // and its 123 registers fit). With the bound at 128 threads alone ptxas held some of these kernels
  // to 128 registers and spilled (nvcc 13.0: QueryGrad kD 32 unstaged 52 bytes, staged kD 64 14).
  static constexpr int kMinBlocks = kD == 128 ? 1 : 3;
  static constexpr bool kPreSplit =
      kD <= 32 || (kD == 64 && (!kStaged || kMode == RowsMode::Out || kVariant == RowsVariant::StagedPreSplit));
  // The variant whose kernel is this one's (the others' instantiations would repeat it).
  static constexpr RowsVariant kCanonical = !kStaged ? RowsVariant::Unstaged
                                            : kD == 64 && kMode != RowsMode::Out ? kVariant
                                                                                  : RowsVariant::Staged;
  static constexpr int kWArrays = kPreSplit ? 2 : 1;  // ws (hi, or all of it) and ws_lo
  // The state: kWArrays fp32 arrays, or kMma16's bf16 hi and lo arrays [kD][kW16Ld] (in floats).
  static constexpr int kWFloats = kMma16 ? kD * kW16Ld : kWArrays * kD * kWLd;
  // The A tile: fp32 [kRows][kXLd]; kMma16: KeyGrad's bf16 phi(k) [kRows][kW16Ld], else none.
  static constexpr int kXFloats = !kMma16 ? kRows * kXLd : kMode == RowsMode::KeyGrad ? kRows * kW16Ld / 2 : 0;
  static constexpr int kVec = 8;  // 16-bit inputs
  static constexpr int kVecsPerRow = kD / kVec;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
  // dS tiles: kD / 16 rows of 16 x 8 tiles, each warp a row's kDsNT tiles (kD 32: half a row).
  static constexpr int kDsMT = kD / 16, kDsNT = kNT * kDsMT / 4;
  static constexpr int kQsFloats = kMma16 ? kRows * kW16Ld / 2 : kRows * kXLd;  // qs: fp32, or kMma16's bf16
  static constexpr int kFoldFloats = kFoldDs ? kQsFloats + 4 * kD : 0;           // qs, dz_s
  static constexpr int kSmemBytes = 4 * (kXFloats + kWFloats + kD + kRows * kVecsPerRow + kFoldFloats);
  static_assert(kRows % kRowsPerPass == 0, "a tile must be whole load passes");
  static_assert(!kFoldDs || (4 % kDsMT == 0 && kDsNT >= 1), "four warps split the dS tiles evenly");

  static constexpr int kStages = 2;
  static constexpr int kRawLd = kD + 8;      // 16-bit values; 16-byte rows, fragment reads hit 32 banks
  static constexpr int kTabLd = kD / 2 + 4;  // fp32 angles, same
  static constexpr int kRawBytes = kRows * kRawLd * 2, kTabBytes = kRows * kTabLd * 4;
  static constexpr int kInputs = kMode == RowsMode::Out ? 2 : 3;  // the last one: qn or kn
  // Dynamic shared memory for the inputs given: the arrays above, then per stage the raw inputs
  // and the cos, sin tables (5 KB each at kD 32). With RoPE and no qn / kn, as the models call it:
  // Out 51 KB (4 blocks per SM), QueryGrad 70 KB and KeyGrad 60 KB (3) at kD 32; at kD 64 Out 112 KB,
  // QueryGrad and KeyGrad 111 KB (2). kMma16 (bf16): Out 37 KB at kD 32, 76 KB (3 blocks per SM) at
  // kD 64; QueryGrad 53 KB, KeyGrad 52 KB at kD 32.
  static constexpr int smem_bytes(bool has_xn, bool rope) {
    if (!kStaged) return kSmemBytes;
    return kSmemBytes + kStages * ((kInputs - (has_xn ? 0 : 1)) * kRawBytes + (rope ? 2 * kTabBytes : 0));
  }
  static_assert(kSmemBytes % 16 == 0 && kRawBytes % 16 == 0 && kTabBytes % 16 == 0, "16-byte aligned arrays");
};

// c = A W over Din, A = the warp's 16 rows of xs, W[k][n] = ws[k][n] or, kTrans, ws[n][k];
// n8 tiles at or past Dout stay 0. kPreSplit: ws holds W's hi parts and ws_lo (same layout) its lo
// parts; else W is split here.
template <bool kTrans, bool kPreSplit, int kNT, int kXLd, int kWLd>
SOLA_DEVICE void rows_product_tc(float (&c)[kNT][4], const float* xs, const float* ws, const float* ws_lo, int Din,
                                 int Dout, int m0, int lane) {
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int n = 0; n < kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[n][e] = 0.f;
  const float* xa = xs + (m0 + g) * kXLd + t4;
  for (int k0 = 0; k0 < Din; k0 += 8) {
    const uint32_t af[4] = {tf32::bits(xa[k0]), tf32::bits(xa[8 * kXLd + k0]), tf32::bits(xa[k0 + 4]),
                            tf32::bits(xa[8 * kXLd + k0 + 4])};
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      if (8 * n >= Dout) continue;  // uniform
      const int i0 = kTrans ? (8 * n + g) * kWLd + k0 + t4 : (k0 + t4) * kWLd + 8 * n + g;
      const int i1 = i0 + (kTrans ? 4 : 4 * kWLd);
      uint32_t lo[2], hi[2];
      if constexpr (kPreSplit) {
        hi[0] = tf32::bits(ws[i0]), hi[1] = tf32::bits(ws[i1]);
        lo[0] = tf32::bits(ws_lo[i0]), lo[1] = tf32::bits(ws_lo[i1]);
      } else {
        const tf32::Split s0 = tf32::split(ws[i0]), s1 = tf32::split(ws[i1]);
        hi[0] = s0.hi, hi[1] = s1.hi, lo[0] = s0.lo, lo[1] = s1.lo;
      }
      tf32::mma_1688(c[n], af, lo);
      tf32::mma_1688(c[n], af, hi);
    }
  }
}

// kMma16: c = A W over Din on m16n8k16, A = the warp's 16 rows of the 16-bit tile a (row pitch kLd,
// 0 past Din), W = w_hi + w_lo (stored [k][n], or [n][k] when kTrans; pitch kWLd, 0 past Din x Dout);
// n8 tiles at or past Dout stay 0.
template <bool kTrans, typename T, int kNT, int kLd, int kWLd>
SOLA_DEVICE void rows_product_mma16(float (&c)[kNT][4], const T* a, const T* w_hi, const T* w_lo, int Din, int Dout,
                                    int m0, int lane) {
#pragma unroll
  for (int n = 0; n < kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[n][e] = 0.f;
#pragma unroll
  for (int k0 = 0; k0 < 8 * kNT; k0 += 16) {  // Din <= kD = 8 kNT
    if (k0 >= Din) break;  // uniform
    const mma16::FragA af = mma16::load_a(a, kLd, m0, k0, lane);
#pragma unroll
    for (int n = 0; n < kNT; n += 2) {
      if (8 * n >= Dout) continue;  // uniform
      auto load = [&](const T* w) {
        if constexpr (kTrans) return mma16::load_b_trans(w, kWLd, 8 * n, k0, lane);
        else return mma16::load_b(w, kWLd, k0, 8 * n, lane);
      };
      const mma16::FragB2 lo = load(w_lo), hi = load(w_hi);
      mma16::mma_16816<T>(c[n], af, lo.lo);
      mma16::mma_16816<T>(c[n], af, hi.lo);
      mma16::mma_16816<T>(c[n + 1], af, lo.hi);
      mma16::mma_16816<T>(c[n + 1], af, hi.hi);
    }
  }
}

// Sum over the 4 lanes that share a fragment row; the same bits in all four.
SOLA_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// grid.x: any (grid-stride over heads * groups), block: 128 threads, dynamic smem
// smem_bytes(has_xn, rope). kFoldDs: ds = dstate_reduce_args with chunks = groups (block group c
// sums chunk c's partial).
template <typename scalar_t, int kD, RowsMode kMode, RowsVariant kVariant, bool kMma16Asked>
__global__ void __launch_bounds__(128, (RowsTcConfig<kD, kMode, kVariant, kMma16Asked>::kMinBlocks))
    rows_tc_kernel(const LinearAttentionParams p, const BwdScratch s, int64_t groups, const TokenReduceArgs ds) {
  using Cfg = RowsTcConfig<kD, kMode, kVariant, kMma16Asked>;
  constexpr int kNT = Cfg::kNT, kXLd = Cfg::kXLd, kWLd = Cfg::kWLd, kV = Cfg::kVec, kVpr = Cfg::kVecsPerRow;
  constexpr int kRows = Cfg::kRows, kThreads = Cfg::kThreads, kRawLd = Cfg::kRawLd, kTabLd = Cfg::kTabLd;
  constexpr bool kPreSplit = Cfg::kPreSplit, kFoldDs = Cfg::kFoldDs, kStaged = Cfg::kStaged;
  constexpr int kDsNT = Cfg::kDsNT, kInputs = Cfg::kInputs;
  constexpr bool kQueries = kMode != RowsMode::KeyGrad;
  SOLA_DYNAMIC_SMEM(smem_raw);
  constexpr bool kMma16 = Cfg::kMma16;
  constexpr int kW16Ld = Cfg::kW16Ld;
  float* const xs = reinterpret_cast<float*>(smem_raw);  // [kRows][kXLd] A rows as tf32 (not kMma16)
  float* const ws = xs + Cfg::kXFloats;                  // [kD][kWLd] S or dS (kPreSplit: hi parts), 0 past Dk x Dv
  float* const ws_lo = ws + kD * kWLd;                   // [kD][kWLd] kPreSplit: their lo parts
  float* const zs = ws + Cfg::kWFloats;                  // [kD] z (Out, QueryGrad) or dz (KeyGrad)
  float* const den_part = zs + kD;                       // [kRows][kVpr] Out: phi(qn) . z per load vector
  float* const qs = den_part + kRows * kVpr;             // [kRows][kXLd] kFoldDs: tf32(phi(q_i) / den_i)
  float* const dz_s = qs + Cfg::kQsFloats;               // [4][kD] kFoldDs: each warp's dz sum
  // kMma16: the state's bf16 hi and lo parts, [kD][kW16Ld] each, in ws's place; KeyGrad's phi(k) tile.
  scalar_t* const ws16 = reinterpret_cast<scalar_t*>(ws);
  scalar_t* const ws16_lo = ws16 + kD * kW16Ld;
  scalar_t* const xs16 = reinterpret_cast<scalar_t*>(xs);
  scalar_t* const qs16 = reinterpret_cast<scalar_t*>(qs);  // kFoldDs && kMma16: bf16 [kRows][kW16Ld]

  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv);
  const int64_t N = kQueries ? p.Nq : p.Nk;
  const int64_t row_tiles = ceil_div(N, kRows), items = p.B * p.H * groups;
  const float* const w_all = static_cast<const float*>(kQueries ? p.state : s.dstate);
  const float* const z_all = static_cast<const float*>(kQueries ? p.z : s.dz);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, m0 = 16 * warp;
  const int g = lane / 4, t4 = lane % 4;
  const int lr = first_load_row<kMma16, kVpr>(tid), lc = (tid % kVpr) * kV;  // this thread's load rows lr + kRowsPerPass i, columns lc..
  const FeatureMap fm = p.feature_map;
  // Fused RoPE: q (Out, QueryGrad) or k (KeyGrad) rows rotated after phi, by row r's angles.
  const float* const rope_cos = static_cast<const float*>(p.rope_cos);
  const float* const rope_sin = static_cast<const float*>(p.rope_sin);
  const bool rope = rope_cos != nullptr;
  const int half = Dk / 2;
  const bool table_al = rope && rope_tables_aligned<float>(rope_cos, rope_sin, half, kV / 2);
  // kFoldDs: this warp's dS tiles, rows ds_m0 .. + 15, columns 8 (ds_n0 + n) .. + 7.
  const int ds_m0 = 16 * (warp % Cfg::kDsMT), ds_n0 = kDsNT * (warp / Cfg::kDsMT);

  // The tile's inputs, numbered as staged: Out q, qn; QueryGrad g, q, qn; KeyGrad k, v, kn. kX is q
  // or k (the feature map's input). qn / kn are staged only when given; without them the normaliser
  // reads input kX (p.qn / p.kn are then views of q / k).
  constexpr int kX = kMode == RowsMode::QueryGrad ? 1 : 0;
  const bool has_xn = kMode == RowsMode::KeyGrad ? p.has_kn : p.has_qn;
  const int n_inputs = has_xn ? kInputs : kInputs - 1, xn_input = has_xn ? kInputs - 1 : kX;
  const View4& x_view = kMode == RowsMode::KeyGrad ? p.k : p.q;
  const View4& xn_view = kMode == RowsMode::KeyGrad ? p.kn : p.qn;
  // kStaged: stage st's input i at raw + (st * n_inputs + i) * kRows * kRawLd, [row][kRawLd] as
  // stored; with RoPE its cos and sin at tab + (2 st + 0 / 1) * kRows * kTabLd.
  scalar_t* const raw = reinterpret_cast<scalar_t*>(smem_raw + Cfg::kSmemBytes);
  float* const tab = reinterpret_cast<float*>(raw + Cfg::kStages * n_inputs * kRows * kRawLd);
  auto stage_row = [&](int stage, int i, int r) { return raw + ((stage * n_inputs + i) * kRows + r) * kRawLd; };
  auto stage_angles = [&](int stage, bool sine, int r) { return tab + ((2 * stage + (sine ? 1 : 0)) * kRows + r) * kTabLd; };

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform per block
    const int64_t bh = item / groups, b = bh / p.H, h = bh % p.H;
    const int64_t first_tile = item % groups;
    // Row r of the tile at r0 of input i (tensor view x): the staged copy, or the tensor's row.
    auto in_row = [&](int stage, int i, const View4& x, int64_t r0, int r) -> const scalar_t* {
      if constexpr (kStaged) return stage_row(stage, i, r);
      else return x.row<const scalar_t>(b, h, r0 + r);
    };
    auto in_aligned = [&](const View4& x, int vec) { return kStaged || rows_aligned<scalar_t>(x, vec); };
    // Row r's RoPE angles (cos, or sin when `sine`), half of them, fp32.
    auto angles = [&](int stage, bool sine, int64_t r0, int r) -> const float* {
      if constexpr (kStaged) return stage_angles(stage, sine, r);
      else return (sine ? rope_sin : rope_cos) + (r0 + r) * half;
    };
    const bool angles_al = kStaged || table_al;
    // kStaged: copies the tile at r0 into `stage` (0 past N and past each input's width), one group.
    auto stage_tile = [&](int stage, int64_t r0) {
      auto input = [&](int i, const View4& x, int width) {
        if (i >= n_inputs) return;  // uniform: qn / kn not given
        const bool al = rows_aligned<scalar_t>(x, kV);
#pragma unroll
        for (int r = lr; r < kRows; r += Cfg::kRowsPerPass) {
          const bool live = r0 + r < N;
          scalar_t* const slot = stage_row(stage, i, r) + lc;
          copy_cols_async<kV>(slot, live ? x.row<const scalar_t>(b, h, r0 + r) : nullptr, lc, width, al, live);
        }
      };
      if constexpr (kMode == RowsMode::Out) input(0, p.q, Dk), input(1, p.qn, Dk);
      else if constexpr (kMode == RowsMode::QueryGrad) input(0, p.grad_out, Dv), input(1, p.q, Dk), input(2, p.qn, Dk);
      else input(0, p.k, Dk), input(1, p.v, Dv), input(2, p.kn, Dk);
      if (rope) {  // a load vector's kV / 2 channel pairs: 16 bytes of each table
#pragma unroll
        for (int r = lr; r < kRows; r += Cfg::kRowsPerPass) {
          const bool live = r0 + r < N;
          const int64_t t_row = live ? (r0 + r) * half : 0;
          copy_cols_async<kV / 2>(stage_angles(stage, false, r) + lc / 2, rope_cos + t_row, lc / 2, half, table_al, live);
          copy_cols_async<kV / 2>(stage_angles(stage, true, r) + lc / 2, rope_sin + t_row, lc / 2, half, table_al, live);
        }
      }
      cp_async_commit();
    };

    __syncthreads();  // the previous item is done with ws, zs and the stages
    if constexpr (kStaged) stage_tile(0, first_tile * kRows);  // lands while the state is loaded
    const float* const w = w_all + bh * Dk * Dv;
    for (int i = tid; i < kD * kD; i += kThreads) {
      const int k = i / kD, n = i % kD;
      const float wv = k < Dk && n < Dv ? w[int64_t(k) * Dv + n] : 0.f;
      if constexpr (kMma16) {
        const scalar_t hi = static_cast<scalar_t>(wv);
        ws16[k * kW16Ld + n] = hi, ws16_lo[k * kW16Ld + n] = static_cast<scalar_t>(wv - static_cast<float>(hi));
      } else if constexpr (kPreSplit) {
        const tf32::Split sp = tf32::split(wv);
        ws[k * kWLd + n] = tf32::from_bits(sp.hi), ws_lo[k * kWLd + n] = tf32::from_bits(sp.lo);
      } else {
        ws[k * kWLd + n] = wv;
      }
    }
    for (int i = tid; i < kD; i += kThreads) zs[i] = p.normalize && i < Dk ? z_all[bh * Dk + i] : 0.f;
    float ds_acc[kDsNT][4];  // kFoldDs: this warp's dS tiles over the item's rows
    if constexpr (kFoldDs) {
#pragma unroll
      for (int n = 0; n < kDsNT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) ds_acc[n][e] = 0.f;
      for (int i = lane; i < kD; i += 32) dz_s[warp * kD + i] = 0.f;
    }

    int stage = 0;  // kStaged: the stage holding this tile
    // xs = f(x) for the tile's rows from input i (f = phi when x_phi, then rotated by the row's
    // angles with fused RoPE), 0 past N and Din; with den also den_part = phi(qn) . z per load
    // vector, from the unrounded (and unrotated) fp32 values.
    auto load_rows = [&](int i, const View4& x, bool x_phi, int Din, bool den, int64_t r0) {
      const bool al = in_aligned(x, kV), qn_al = in_aligned(p.qn, kV);
#pragma unroll
      for (int r = lr; r < kRows; r += Cfg::kRowsPerPass) {
        const bool live = r0 + r < N;
        float xv[kV], sv[kV];
        if (live) {
          load_cols<kV>(in_row(stage, i, x, r0, r), lc, Din, al, xv);
          if (x_phi) phi_cols<true>(fm, Din - lc, xv);
        } else {
#pragma unroll
          for (int e = 0; e < kV; ++e) xv[e] = 0.f;
        }
        if (den) {
          if (p.has_qn && live) {
            load_cols<kV>(in_row(stage, xn_input, p.qn, r0, r), lc, Din, qn_al, sv);
            phi_cols<true>(fm, Din - lc, sv);
          } else {
#pragma unroll
            for (int e = 0; e < kV; ++e) sv[e] = xv[e];
          }
          float part = 0.f;
#pragma unroll
          for (int e = 0; e < kV; ++e) part += sv[e] * zs[lc + e];
          den_part[r * kVpr + tid % kVpr] = part;
        }
        if (rope && x_phi && live) {  // uniform but for the last tile's rows
          float cs[kV / 2], sn[kV / 2];
          load_cols<kV / 2>(angles(stage, false, r0, r), lc / 2, half, angles_al, cs);
          load_cols<kV / 2>(angles(stage, true, r0, r), lc / 2, half, angles_al, sn);
#pragma unroll
          for (int j = 0; j < kV / 2; ++j) rotate_pair(xv[2 * j], xv[2 * j + 1], cs[j], sn[j], xv[2 * j], xv[2 * j + 1]);
        }
        if constexpr (kMma16) {  // Out: over the staged vector this thread copied; KeyGrad: the bf16 tile
          store_acc(xv, kMode == RowsMode::Out ? stage_row(stage, i, r) + lc : xs16 + r * kW16Ld + lc);
        } else {
#pragma unroll
          for (int e = 0; e < kV; ++e) xv[e] = tf32::from_bits(tf32::round(xv[e]));
          store_row8<kXLd, kVpr>(xs + r * kXLd + lc, xv, tid);
        }
      }
    };

    float c[kNT][4];
    // The dq / dk epilogue at this lane's columns of fragment row half hh (tile row rl, row r0 + rl):
    //   dx = c * c_scale * phi'(x),  dxn = z * z_scale * phi'(xn)  (added to dx when xn is x).
    // Fused RoPE (xn is x): dx = phi'(x) (R^T (c * c_scale) + z * z_scale), the lane's two columns
    // being one channel pair.
    // x_row, xn_row: the row's in_row of x and xn.
    const bool x_al = in_aligned(x_view, 2), xn_al = in_aligned(xn_view, 2);
    auto store_input_grads = [&](int hh, int64_t r0, int rl, const scalar_t* x_row, const scalar_t* xn_row,
                                 float c_scale, float z_scale, const View4& dx, const View4& dxn) {
      const int64_t row = r0 + rl;
      const bool dx_al = rows_aligned<scalar_t>(dx, 2), dxn_al = rows_aligned<scalar_t>(dxn, 2);
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        const int col = 8 * n + 2 * t4;
        if (col >= Dk) continue;
        float xv[2], xnv[2], d[2], dn[2];
        load_cols<2>(x_row, col, Dk, x_al, xv);
        dphi_cols<true>(fm, xv);
        if (rope) {
          const float gz0 = p.normalize ? zs[col] * z_scale : 0.f, gz1 = p.normalize ? zs[col + 1] * z_scale : 0.f;
          unrotate_pair(c[n][2 * hh] * c_scale, c[n][2 * hh + 1] * c_scale, gz0, gz1, angles(stage, false, r0, rl)[col / 2],
                        angles(stage, true, r0, rl)[col / 2], d[0], d[1]);
#pragma unroll
          for (int j = 0; j < 2; ++j) d[j] = through_phi(d[j], xv[j]);
          store_cols<2>(dx.row<scalar_t>(b, h, row), col, Dk, dx_al, d);
          continue;
        }
        load_cols<2>(xn_row, col, Dk, xn_al, xnv);
        dphi_cols<true>(fm, xnv);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          d[j] = through_phi(c[n][2 * hh + j] * c_scale, xv[j]);
          dn[j] = p.normalize ? through_phi(zs[col + j] * z_scale, xnv[j]) : 0.f;
          if (!has_xn) d[j] += dn[j];
        }
        store_cols<2>(dx.row<scalar_t>(b, h, row), col, Dk, dx_al, d);
        if (has_xn) store_cols<2>(dxn.row<scalar_t>(b, h, row), col, Dk, dxn_al, dn);
      }
    };
    for (int64_t tile = first_tile; tile < row_tiles; tile += groups, stage ^= kStaged ? 1 : 0) {
      const int64_t r0 = tile * kRows;
      __syncthreads();  // xs, den_part and the other stage are free (and ws, zs written, on the first tile)
      if constexpr (kStaged) {
        if (tile + groups < row_tiles) {  // uniform
          stage_tile(stage ^ 1, r0 + groups * kRows);
          cp_async_wait<1>();  // this tile's copies have landed
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();  // and every thread's are visible
      }
      if constexpr (kMode == RowsMode::Out) {
        const bool side = p.normalize;
        load_rows(0, p.q, true, Dk, side, r0);
        __syncthreads();
        if constexpr (kMma16)
          rows_product_mma16<false, scalar_t, kNT, kRawLd, kW16Ld>(c, stage_row(stage, 0, 0), ws16, ws16_lo, Dk, Dv, m0, lane);
        else
          rows_product_tc<false, kPreSplit, kNT, kXLd, kWLd>(c, xs, ws, ws_lo, Dk, Dv, m0, lane);
        const bool out_al = rows_aligned<scalar_t>(p.out, 2);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int rl = m0 + g + 8 * hh;
          const int64_t row = r0 + rl;
          float den = 1.f;
          if (side) {
            den = 0.f;
            for (int v = 0; v < kVpr; ++v) den += den_part[rl * kVpr + v];  // fixed order
            den += static_cast<float>(p.eps);
          }
          const RowDivisor<float> divisor(den);
          if (row >= N) continue;
          scalar_t* const out = p.out.row<scalar_t>(b, h, row);
#pragma unroll
          for (int n = 0; n < kNT; ++n) {
            if (8 * n >= Dv) continue;
            const float o[2] = {divisor.divide(c[n][2 * hh]), divisor.divide(c[n][2 * hh + 1])};
            store_cols<2>(out, 8 * n + 2 * t4, Dv, out_al, o);
          }
        }
      } else if constexpr (kMode == RowsMode::QueryGrad) {
        if constexpr (kMma16) {  // u = S g, g as staged
          rows_product_mma16<true, scalar_t, kNT, kRawLd, kW16Ld>(c, stage_row(stage, 0, 0), ws16, ws16_lo, Dv, Dk, m0, lane);
        } else {
          load_rows(0, p.grad_out, false, Dv, false, r0);
          __syncthreads();
          rows_product_tc<true, kPreSplit, kNT, kXLd, kWLd>(c, xs, ws, ws_lo, Dv, Dk, m0, lane);  // u = S g
        }
        float* const inv_den_out = static_cast<float*>(s.inv_den);
        float* const dd_out = static_cast<float*>(s.dd);
        float dz_part[kNT][2];  // kFoldDs: phi(qn_i) dd_i summed over this lane's two rows
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int rl = m0 + g + 8 * hh;
          const int64_t row = r0 + rl;
          const bool valid = row < N;  // every lane takes part in the shuffles
          const scalar_t* const q_row = in_row(stage, kX, p.q, r0, rl);
          const scalar_t* const qn_row = in_row(stage, xn_input, p.qn, r0, rl);
          // g . num = phi(q) . u and den = phi(qn) . z over this lane's columns, then the row's.
          float g_num = 0.f, den = 0.f;
          float qv[kNT][2], qnv[kNT][2];  // phi(q), phi(qn) at this lane's columns, 0 outside
#pragma unroll
          for (int n = 0; n < kNT; ++n) {
            const int col = 8 * n + 2 * t4;
            if constexpr (kFoldDs) qv[n][0] = qv[n][1] = qnv[n][0] = qnv[n][1] = 0.f;
            if (!valid || col >= Dk) continue;
            load_cols<2>(q_row, col, Dk, x_al, qv[n]);
            phi_cols<true>(fm, Dk - col, qv[n]);
            if (rope) {  // phi(q) unrotated in the normaliser, rotated in the numerator (one pair)
              qnv[n][0] = qv[n][0], qnv[n][1] = qv[n][1];
              rotate_pair(qnv[n][0], qnv[n][1], angles(stage, false, r0, rl)[col / 2], angles(stage, true, r0, rl)[col / 2],
                          qv[n][0], qv[n][1]);
            } else {
              load_cols<2>(qn_row, col, Dk, xn_al, qnv[n]);
              phi_cols<true>(fm, Dk - col, qnv[n]);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              if (col + j >= Dk) continue;  // u is not 0 there when g holds an Inf
              g_num += qv[n][j] * c[n][2 * hh + j];
              den += qnv[n][j] * zs[col + j];
            }
          }
          g_num = quad_sum(g_num), den = quad_sum(den);
          if (!kFoldDs && !valid) continue;  // the fold writes 0 for rows past N below
          const float d = p.normalize ? den + static_cast<float>(p.eps) : 1.f;
          const float inv = 1.f / d;
          const float dd = p.normalize ? -(g_num / d) / d : 0.f;  // not / d^2: it overflows first
          if constexpr (kFoldDs) {  // rows past N and columns past Dk add 0
#pragma unroll
            for (int n = 0; n < kNT; ++n) {
              float qi[2];
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                const bool in = valid && 8 * n + 2 * t4 + j < Dk;
                qi[j] = in ? qv[n][j] * inv : 0.f;
                const float dz = in ? qnv[n][j] * dd : 0.f;
                dz_part[n][j] = hh == 0 ? dz : dz_part[n][j] + dz;
              }
              if constexpr (kMma16) {  // one 4-byte store of the lane's two columns
                store_acc(qi, qs16 + rl * kW16Ld + 8 * n + 2 * t4);
              } else {
#pragma unroll
                for (int j = 0; j < 2; ++j) qs[rl * kXLd + 8 * n + 2 * t4 + j] = tf32::from_bits(tf32::round(qi[j]));
              }
            }
          }
          if (!valid) continue;
          if constexpr (!kFoldDs) {
            if (t4 == 0) inv_den_out[bh * N + row] = inv, dd_out[bh * N + row] = dd;
          }
          // dphi(q_i) = u_i / den_i; the normaliser adds z dd_i through phi'(qn).
          store_input_grads(hh, r0, rl, q_row, qn_row, inv, dd, p.dq, p.dqn);
        }
        if constexpr (kFoldDs) {
          if (p.normalize) {  // uniform; sum the warp's 16 rows (8 row lanes x 2), fixed order
#pragma unroll
            for (int n = 0; n < kNT; ++n)
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                float x = dz_part[n][j];
                x += __shfl_xor_sync(0xffffffffu, x, 4);
                x += __shfl_xor_sync(0xffffffffu, x, 8);
                x += __shfl_xor_sync(0xffffffffu, x, 16);
                if (g == 0) dz_s[warp * kD + 8 * n + 2 * t4 + j] += x;
              }
          }
          __syncthreads();  // qs is complete (xs, or kMma16's stage, still holds g)
          // dS += phi(Q)^T diag(1 / den) G over the tile's rows: A = qs read transposed, B = g.
          if (ds_m0 < Dk) {  // uniform per warp
            const int n_live = ceil_div(Dv, 8) - ds_n0;  // this warp's column tiles short of Dv
            if constexpr (kMma16) {
              if (n_live > 0) {  // a pair's tile past Dv adds 0: g is 0 there
#pragma unroll
                for (int k0 = 0; k0 < kRows; k0 += 16)
                  mma_tokens_k16<kW16Ld, kRawLd>(ds_acc, qs16 + k0 * kW16Ld + ds_m0, stage_row(stage, 0, k0) + 8 * ds_n0, lane);
              }
            } else {
#pragma unroll 2
              for (int k0 = 0; k0 < kRows; k0 += 8)
                mma_tokens_k8<kXLd>(ds_acc, qs + k0 * kXLd + ds_m0, xs + k0 * kXLd + 8 * ds_n0, n_live, lane);
            }
          }
        }
      } else {  // KeyGrad: dv, then dk for the same rows
        const float inv_nk = 1.f / static_cast<float>(p.Nk);
        load_rows(0, p.k, true, Dk, false, r0);
        __syncthreads();
        if constexpr (kMma16)  // dS^T phi(k_j)
          rows_product_mma16<false, scalar_t, kNT, kW16Ld, kW16Ld>(c, xs16, ws16, ws16_lo, Dk, Dv, m0, lane);
        else
          rows_product_tc<false, kPreSplit, kNT, kXLd, kWLd>(c, xs, ws, ws_lo, Dk, Dv, m0, lane);
        const bool dv_al = rows_aligned<scalar_t>(p.dv, 2);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int64_t row = r0 + m0 + g + 8 * hh;
          if (row >= N) continue;
#pragma unroll
          for (int n = 0; n < kNT; ++n) {
            if (8 * n >= Dv) continue;
            const float dv[2] = {c[n][2 * hh] * inv_nk, c[n][2 * hh + 1] * inv_nk};
            store_cols<2>(p.dv.row<scalar_t>(b, h, row), 8 * n + 2 * t4, Dv, dv_al, dv);
          }
        }
        if constexpr (kMma16) {  // dS v_j, v as staged
          rows_product_mma16<true, scalar_t, kNT, kRawLd, kW16Ld>(c, stage_row(stage, 1, 0), ws16, ws16_lo, Dv, Dk, m0, lane);
        } else {
          __syncthreads();  // xs is reloaded with v
          load_rows(1, p.v, false, Dv, false, r0);
          __syncthreads();
          rows_product_tc<true, kPreSplit, kNT, kXLd, kWLd>(c, xs, ws, ws_lo, Dv, Dk, m0, lane);  // dS v_j
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int rl = m0 + g + 8 * hh;
          if (r0 + rl < N)
            store_input_grads(hh, r0, rl, in_row(stage, kX, p.k, r0, rl), in_row(stage, xn_input, p.kn, r0, rl), inv_nk,
                              inv_nk, p.dk, p.dkn);
        }
      }
    }
    if constexpr (kFoldDs) {  // this block's dS, dz: the results (one group) or its group's partial
      ReduceItem it{};
      it.bh = bh, it.chunk = item % groups;
      const ReduceDst<float> dst = reduce_dst<float>(ds, it);
#pragma unroll
      for (int n = 0; n < kDsNT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = ds_m0 + tf32::acc_row(e, lane), col = 8 * (ds_n0 + n) + tf32::acc_col(e, lane);
          if (m < Dk && col < Dv) dst.m[int64_t(m) * Dv + col] = ds_acc[n][e] * dst.scale;
        }
      if (p.normalize) {  // uniform
        __syncthreads();  // every warp's dz_s row is complete
        if (tid < Dk) dst.side[tid] = (dz_s[tid] + dz_s[kD + tid] + dz_s[2 * kD + tid] + dz_s[3 * kD + tid]) * dst.scale;
      }
    }
  }
}

// ---- launchers (explicitly instantiated in linear_attention_tc_*.cu) -------------------------------

// SOLA_LINEAR_MMA=tf32 (read per launch) keeps the products that could take 16-bit operands (the
// forward's token reduction, bf16's row kernels: kMma16) on tf32; unset or anything else: 16-bit where
// they qualify. A benchmark hook (bench/kernels.py's sola_ops_tf32) until a GPU has timed the two.
inline bool tf32_products_asked() {
  const char* asked = std::getenv("SOLA_LINEAR_MMA");
  return asked != nullptr && std::strcmp(asked, "tf32") == 0;
}

template <typename scalar_t>
bool launch_token_reduce_tc(const TokenReduceArgs& a, cudaStream_t stream) {
  if (!sm80_or_newer()) return false;
  const unsigned grid = grid_x(a.heads * a.chunks * a.tiles_m * a.tiles_n, 1);
  auto launch = [&](auto tile, auto rope, auto mma16) {
    constexpr int kTile = decltype(tile)::value;
    constexpr bool kRope = decltype(rope)::value, kMma16 = decltype(mma16)::value;
    using Cfg = ReduceTcConfig<scalar_t, kTile, kMma16>;
    constexpr auto kKernel = token_reduce_tc_kernel<scalar_t, kTile, kRope, kMma16>;
    // The tf32 RoPE layout at the 64 tile (55.8 KB) needs the opt-in past 48 KB.
    const int smem = Cfg::smem_bytes(kRope, a.y_scale || a.s_scale);
    TORCH_INTERNAL_ASSERT(allow_dynamic_smem<kKernel>(smem),
                          "linear_attention: the tensor-core token reduction's shared memory exceeds the device's");
    token_reduce_tc_kernel<scalar_t, kTile, kRope, kMma16><<<grid, Cfg::kBlockThreads, smem, stream>>>(a);
  };
  // 16-bit products (ReduceTcConfig): bf16; fp16 without scales (the forward's S, z) or RoPE.
  constexpr bool kHalf = std::is_same_v<scalar_t, at::Half>;
  const bool mma16 = !tf32_products_asked() && !(kHalf && (a.y_scale || a.s_scale || a.rope_cos));
  auto with_tile = [&](auto rope, auto mma16_c) {
    if (a.tile == 32) launch(std::integral_constant<int, 32>{}, rope, mma16_c);
    else launch(std::integral_constant<int, 64>{}, rope, mma16_c);
  };
  auto with_products = [&](auto rope) {
    constexpr bool kHalfRope = kHalf && decltype(rope)::value;
    if constexpr (!kHalfRope) {
      if (mma16) return with_tile(rope, std::true_type{});
    }
    with_tile(rope, std::false_type{});
  };
  if (a.rope_cos) with_products(std::true_type{});
  else with_products(std::false_type{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// f(std::integral_constant<int, kD>{}) for the row kernels' head-dim bucket of d = max(Dk, Dv) <= 128:
// 32, 64 or 128. One switch for the launcher and for the check of where RoPE is fused.
template <typename F>
auto with_rows_tc_bucket(int64_t d, F&& f) {
  if (d <= 32) return f(std::integral_constant<int, 32>{});
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  return f(std::integral_constant<int, 128>{});
}

template <RowsVariant kVariant>
using VariantC = std::integral_constant<RowsVariant, kVariant>;

// SOLA_LINEAR_ROWS=unstaged or staged_presplit (read per launch) picks the row kernels' variant
// (RowsVariant); unset or anything else: Staged. A benchmark hook: bench/kernels.py's
// sola_ops_unstaged and sola_ops_presplit.
inline RowsVariant rows_variant() {
  const char* asked = std::getenv("SOLA_LINEAR_ROWS");
  if (asked != nullptr && std::strcmp(asked, "unstaged") == 0) return RowsVariant::Unstaged;
  if (asked != nullptr && std::strcmp(asked, "staged_presplit") == 0) return RowsVariant::StagedPreSplit;
  return RowsVariant::Staged;
}

template <typename scalar_t, RowsMode kMode>
RowsLaunch launch_rows_tc(const LinearAttentionParams& p, const BwdScratch& s, cudaStream_t stream) {
  const int64_t d = std::max(p.Dk, p.Dv), n = kMode == RowsMode::KeyGrad ? p.Nk : p.Nq;
  if (d > 128 || !sm80_or_newer()) return {};  // 256-wide states take the SIMT kernel
  if (n == 0) return {true, false};
  RowsLaunch result;
  // kSmem: the dynamic shared memory for the inputs given (has_xn: qn / kn; RoPE tables).
  // kMma16Asked (std::bool_constant): only where the config takes 16-bit products (no duplicate kernels).
  auto launch = [&](auto head_dim, auto has_xn, auto rope, auto variant, auto mma16_asked) {
    constexpr int kD = decltype(head_dim)::value;
    constexpr RowsVariant kVariant = decltype(variant)::value;
    constexpr bool kMma16Asked = decltype(mma16_asked)::value;
    using Cfg = RowsTcConfig<kD, kMode, kVariant, kMma16Asked>;
    static_assert(Cfg::kMma16 == kMma16Asked, "instantiated once per choice of products");
    constexpr auto kKernel = rows_tc_kernel<scalar_t, kD, kMode, kVariant, kMma16Asked>;
    constexpr int kSmem = Cfg::smem_bytes(decltype(has_xn)::value, decltype(rope)::value);
    if (!allow_dynamic_smem<kKernel>(kSmem)) return;
    // Each output row is computed the same way whatever the grouping: it sets how often a state
    // is re-read (and, with the fold, how dS is split into partials, which must not depend on the
    // GPU: row_groups' constant target). Without the fold the blocks are what the device holds at
    // once: with the 1024 of row_groups a kernel at 7 blocks per SM on 132 SMs ran a second wave
    // of 100 blocks, each walking its dozen tiles on an otherwise idle GPU.
    const int64_t heads = p.B * p.H, row_tiles = ceil_div(n, Cfg::kRows);
    int64_t groups = row_groups(heads, row_tiles);
    if constexpr (!Cfg::kFoldDs) {
      const int64_t resident = int64_t(resident_blocks_per_sm<kKernel, Cfg::kThreads, kSmem>()) *
                               at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      groups = std::min(row_tiles, std::max<int64_t>(1, resident / heads));
    }
    const DstateFold fold = Cfg::kFoldDs ? DstateFold(p, s, groups) : DstateFold();
    rows_tc_kernel<scalar_t, kD, kMode, kVariant, kMma16Asked><<<grid_x(heads * groups, 1), Cfg::kThreads, kSmem, stream>>>(
        p, s, groups, fold.args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fold.combine(stream);
    result = {true, Cfg::kFoldDs};
  };
  // f(std::true_type or std::false_type) for a runtime flag.
  auto with_flag = [](bool flag, auto&& f) {
    if (flag) f(std::true_type{});
    else f(std::false_type{});
  };
  const bool has_xn = kMode == RowsMode::KeyGrad ? p.has_kn : p.has_qn;
  const RowsVariant asked = rows_variant();
  with_rows_tc_bucket(d, [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    with_flag(has_xn, [&](auto xn) {
      with_flag(p.rope_cos != nullptr, [&](auto rope) {
        // Only the canonical variants are instantiated (Unstaged alone at kD 128, no StagedPreSplit
        // but for the kD 64 backward).
        auto as = [&](auto variant) {
          constexpr RowsVariant kVariant = RowsTcConfig<kD, kMode, decltype(variant)::value>::kCanonical;
          // bf16 with staged tiles: 16-bit products unless declined (RowsTcConfig::kMma16)
          constexpr bool kCan16 = RowsTcConfig<kD, kMode, kVariant, std::is_same_v<scalar_t, at::BFloat16>>::kMma16;
          // One 16-bit kernel for both staged variants (the state is split to bf16 in either, so
          // StagedPreSplit runs the default kernel for bf16); Unstaged stays tf32. (Written in terms of
          // kVariant so the call stays dependent: a non-dependent one would be instantiated, for fp16
          // and kD 128 too, outside the discarded branch.)
          constexpr RowsVariant k16Variant = kCan16 ? RowsVariant::Staged : kVariant;
          if constexpr (kCan16) {
            if (!tf32_products_asked()) return launch(head_dim, xn, rope, VariantC<k16Variant>{}, std::true_type{});
          }
          launch(head_dim, xn, rope, VariantC<kVariant>{}, std::false_type{});
        };
        if (asked == RowsVariant::Unstaged) as(VariantC<RowsVariant::Unstaged>{});
        else if (asked == RowsVariant::StagedPreSplit) as(VariantC<RowsVariant::StagedPreSplit>{});
        else as(VariantC<RowsVariant::Staged>{});
      });
    });
  });
  return result;
}

}  // namespace la
}  // namespace sola
