// Runs the softmax-attention CUDA launchers (emulated on the CPU, see README.md) against the CPU
// kernels: out, lse, delta, dq, dk, dv on awkward sizes, every dtype, NaN / -inf inputs, and a
// second backward that must be bitwise equal.
// Usage: driver [softmax|flash|wgmma|race|big|vision|all|fuzz <seed> <count> [first]].
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include <ATen/cuda/CUDAContext.h>  // the emulator's device properties (emu::g_prop)

#include "driver_common.h"
#include "softmax_attention/softmax_attention.h"

using namespace sola;

void softmax_case(int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t Dk, int64_t Dv, at::ScalarType dt, double scale,
                  bool strided, int poison = 0, bool grad_lse = false) {
  char name[256];
  std::snprintf(name, sizeof name, "softmax B%ld H%ld q%ld k%ld d%ld v%ld %s sc%g s%d p%d", (long)B, (long)H, (long)Nq,
                (long)Nk, (long)Dk, (long)Dv, c10::toString(dt), scale, strided, poison);
  at::Tensor q = input(B, H, Nq, Dk, dt, strided, 2.0), k = input(B, H, Nk, Dk, dt, strided, 2.0),
             v = input(B, H, Nk, Dv, dt, strided);
  if (poison == 1 && Nq > 3) q.select(0, B - 1).select(0, 0).select(0, 3).fill_(NAN);
  if (poison == 2) k.select(0, B - 1).select(0, 0).select(1, 2).fill_(-INFINITY);  // whole column: many -inf scores
  if (poison == 3) k.select(0, B - 1).select(0, 0).fill_(-INFINITY), q.select(0, B - 1).select(0, 0).fill_(1.0);  // all -inf
  if (poison == 4) k.select(0, B - 1).select(0, 0).fill_(-40.0), q.select(0, B - 1).select(0, 0).fill_(40.0);  // lse << 0
  if (poison == 5)  // key 2 scores +inf in every row: lse = +inf (as torch.logsumexp), out NaN; -inf with scale < 0
    k.select(0, B - 1).select(0, 0).select(0, 2).select(0, 0).fill_(INFINITY), q.select(0, B - 1).select(0, 0).select(1, 0).fill_(1.0);
  const bool finite = poison == 0 || poison == 4;
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  SoftmaxAttentionParams p;
  p.B = B, p.H = H, p.Nq = Nq, p.Nk = Nk, p.Dk = Dk, p.Dv = Dv;
  p.q = make_view(q), p.k = make_view(k), p.v = make_view(v);
  p.scale = scale, p.dtype = dt, p.device_index = -1;
  at::Tensor out[2], lse[2];
  for (int r = 0; r < 2; ++r) {
    out[r] = nan_out({B, H, Nq, Dv}, dt, strided && r == 1), lse[r] = nan_out({B, H, Nq}, acc);  // CUDA: the ops' layout
    SoftmaxAttentionParams pr = p;
    pr.out = make_view(out[r]), pr.lse = lse[r].data_ptr();
    if (r == 0) softmax_attention_fwd_cpu(pr); else softmax_attention_fwd_cuda(pr);
  }
  compare(std::string(name) + " out", out[1], out[0], dt, finite);
  compare(std::string(name) + " lse", lse[1], lse[0], acc, finite);
  at::Tensor g = input(B, H, Nq, Dv, dt, strided);
  // A gradient of lse too (it enters through delta), when asked for.
  const at::Tensor glse = grad_lse ? at::randn({B, H, Nq}, at::TensorOptions().dtype(acc)) : at::Tensor();
  p.grad_lse = grad_lse ? glse.data_ptr() : nullptr;
  at::Tensor dq[2], dk[2], dv[2], delta[2];
  for (int r = 0; r < 2; ++r) {
    const bool il = strided && r == 1;
    dq[r] = nan_out(q.sizes(), dt, il), dk[r] = nan_out(k.sizes(), dt, il), dv[r] = nan_out(v.sizes(), dt, il);
    delta[r] = nan_out({B, H, Nq}, acc);
    SoftmaxAttentionParams pr = p;
    pr.out = make_view(out[0]), pr.lse = lse[0].data_ptr(), pr.delta = delta[r].data_ptr();
    pr.grad_out = make_view(g), pr.dq = make_view(dq[r]), pr.dk = make_view(dk[r]), pr.dv = make_view(dv[r]);
    if (r == 0) softmax_attention_bwd_cpu(pr); else softmax_attention_bwd_cuda(pr);
  }
  {
    at::Tensor dq2 = nan_out(q.sizes(), dt), dk2 = nan_out(k.sizes(), dt), dv2 = nan_out(v.sizes(), dt), de2 = nan_out({B, H, Nq}, acc);
    SoftmaxAttentionParams pr = p;
    pr.out = make_view(out[0]), pr.lse = lse[0].data_ptr(), pr.delta = de2.data_ptr();
    pr.grad_out = make_view(g), pr.dq = make_view(dq2), pr.dk = make_view(dk2), pr.dv = make_view(dv2);
    softmax_attention_bwd_cuda(pr);
    auto same = [](const at::Tensor& a, const at::Tensor& b) { return a.numel() == 0 || at::equal(a.nan_to_num(7), b.nan_to_num(7)); };
    if (!same(dq2, dq[1]) || !same(dk2, dk[1]) || !same(dv2, dv[1])) {
      std::printf("FAIL %s: backward not bitwise reproducible\n", name);
      ++failures;
    }
  }
  compare(std::string(name) + " delta", delta[1], delta[0], acc, finite);
  compare(std::string(name) + " dq", dq[1], dq[0], dt, finite);
  compare(std::string(name) + " dk", dk[1], dk[0], dt, finite);
  compare(std::string(name) + " dv", dv[1], dv[0], dt, finite);
  if (!finite && B > 1) {
    if (!at::isfinite(out[1].select(0, 0)).all().item<bool>() || !at::isfinite(dk[1].select(0, 0)).all().item<bool>()) {
      std::printf("FAIL %s: poison leaked into another head\n", name);
      ++failures;
    }
    // (poison 5 with a negative scale scores the key -inf: its out stays finite)
    if (!(poison == 5 && scale < 0) && at::isfinite(out[1].select(0, B - 1)).all().item<bool>()) {
      std::printf("FAIL %s: poison vanished\n", name);
      ++failures;
    }
  }
  std::printf("done %s\n", name);
}

// The flash kernels' cases for the given dtypes.
void flash_cases(std::initializer_list<at::ScalarType> hts) {
  for (auto dt : hts) {
    softmax_case(1, 2, 17, 113, 32, 32, dt, 0.17, false);
    softmax_case(1, 1, 113, 17, 64, 64, dt, 0.125, true);
    softmax_case(1, 1, 1, 1, 8, 8, dt, 0.3, false);
    softmax_case(1, 1, 65, 130, 40, 40, dt, 0.15, false);
    softmax_case(1, 1, 20, 70, 59, 59, dt, 0.13, true);   // odd D: misaligned rows
    softmax_case(1, 1, 30, 33, 96, 96, dt, 0.1, false);
    softmax_case(1, 1, 17, 40, 111, 111, dt, 0.09, false);
    softmax_case(1, 1, 9, 70, 256, 256, dt, 0.0625, false);
    softmax_case(1, 1, 9, 21, 200, 130, dt, 0.07, true);  // Dk != Dv, two output chunks
    softmax_case(1, 1, 9, 21, 24, 72, dt, 0.2, false);
    softmax_case(1, 1, 9, 21, 256, 40, dt, 0.06, false);  // Dv far below the bucket: fewer fwd chunks
    softmax_case(1, 1, 9, 21, 40, 256, dt, 0.15, true);   // Dk far below it: fewer dq chunks than dkdv
    softmax_case(2, 2, 0, 5, 8, 4, dt, 0.3, false);       // Nq == 0
    softmax_case(3, 5, 7, 6, 8, 5, dt, 0.3, true);         // many heads
    softmax_case(1, 1, 12, 9, 16, 16, dt, 0.0, false);     // scale 0
    softmax_case(2, 2, 6, 5, 8, 4, dt, 0.3, false, 1);     // NaN in q
    softmax_case(2, 2, 6, 5, 8, 4, dt, 0.3, false, 2);     // -inf column in k
    softmax_case(2, 2, 6, 5, 8, 4, dt, 0.3, false, 3);     // every score -inf
    softmax_case(2, 2, 6, 5, 16, 16, dt, 0.1, false, 4);  // every score -2560: exp(-lse) overflows
  }
  // After the cases above, so their random inputs stay as they were: bf16 dq of the -2560 case
  // is a near-cancellation (sum_j dS_ij ~ 0) whose error, from rounding dS to bf16 for the
  // tensor cores, is close to the tolerance for some inputs (0.043 against 0.032 for one draw).
  for (auto dt : hts) {
    // Full key tiles (no masking) and two-group query blocks (130 rows) with the cases above:
    softmax_case(1, 1, 130, 140, 32, 32, dt, -0.2, true);  // negative scale (the forward negates Q)
    softmax_case(1, 1, 130, 128, 64, 64, dt, 0.0, false);  // scale 0, keys exactly two tiles
    for (int poison = 1; poison <= 4; ++poison) softmax_case(2, 1, 70, 140, 32, 32, dt, 0.3, false, poison);
    // Head dims 65-128 past 64 rows: two-group forward blocks with 32-key steps (a partial last
    // one, then none), two-group dkdv blocks with 32-query steps.
    softmax_case(1, 1, 100, 75, 96, 96, dt, 0.1, true);
    softmax_case(1, 1, 130, 64, 128, 128, dt, 0.09, false);
    softmax_case(1, 1, 20, 130, 64, 64, dt, 0.12, false);
    // An infinite key scored -inf by every query (negative scale): its P, dk and dv are 0 (dq is NaN
    // where 0 * inf), also beside the zero rows past Nq of the backward's last query step.
    softmax_case(1, 1, 70, 140, 32, 32, dt, -0.3, false, 5);
  }
}

int main(int argc, char** argv) {
  at::manual_seed(0);
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which == "all" || which == "softmax") {
    softmax_case(2, 3, 5, 7, 8, 5, at::kFloat, 0.35, false);
    softmax_case(1, 2, 9, 6, 37, 70, at::kDouble, 0.2, true);
    softmax_case(1, 1, 4, 9, 64, 64, at::kHalf, 0.125, true);
    softmax_case(1, 1, 4, 9, 100, 20, at::kBFloat16, 0.1, false);
  }
  if (which == "all" || which == "flash") flash_cases({at::kHalf, at::kBFloat16, at::kFloat, at::kDouble});
  if (which == "all" || which == "wgmma") {  // the forward on the emulated wgmma (fp16 / bf16)
    setenv("SOLA_FLASH_WGMMA", "1", 1);
    flash_cases({at::kHalf, at::kBFloat16});
    setenv("SOLA_FLASH_GROUPS", "2", 1);  // two 64-row wgmma tiles per block wherever rows > 64
    softmax_case(1, 1, 130, 140, 32, 32, at::kHalf, -0.2, true);
    softmax_case(1, 1, 100, 75, 96, 96, at::kBFloat16, 0.1, true);
    softmax_case(1, 1, 130, 64, 128, 128, at::kHalf, 0.09, false);
    softmax_case(2, 1, 70, 140, 64, 64, at::kBFloat16, 0.3, false, 1);
    // Long key sequences: the forward's ring of K / V stages wraps around (10+ tiles).
    softmax_case(1, 2, 70, 600, 64, 64, at::kBFloat16, 0.2, false);
    softmax_case(1, 1, 130, 333, 128, 128, at::kHalf, 0.1, true);
    unsetenv("SOLA_FLASH_GROUPS");
    softmax_case(2, 1, 40, 517, 32, 32, at::kHalf, 0.3, false);  // one group, 8 full tiles and an edge of 5
    unsetenv("SOLA_FLASH_WGMMA");
  }
  if (which == "all" || which == "shallow") {  // an A100's 164 KB per SM: 2 K / V stages where 3 cost blocks
    const size_t per_sm = emu::g_prop.sharedMemPerMultiprocessor;
    emu::g_prop.sharedMemPerMultiprocessor = 167936;
    setenv("SOLA_FLASH_GROUPS", "2", 1);
    for (auto dt : {at::kHalf, at::kBFloat16}) {
      softmax_case(1, 1, 130, 333, 128, 128, dt, 0.1, true);  // kD 128, two groups
      softmax_case(1, 1, 40, 300, 256, 200, dt, 0.07, false);  // kD 256
    }
    unsetenv("SOLA_FLASH_GROUPS");
    softmax_case(1, 1, 70, 100, 64, 64, at::kFloat, -0.2, true);  // fp32 kD 64 splits per fragment there
    emu::g_prop.sharedMemPerMultiprocessor = per_sm;
  }
  if (which == "race") {  // few, small cases that still take every flash pipeline (for the TSAN=1 build)
    const at::ScalarType hts[] = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
    for (auto dt : hts) {
      softmax_case(1, 1, 17, 140, 32, 32, dt, 0.17, false);   // double-buffered backward
      softmax_case(1, 1, 70, 40, 64, 40, dt, 0.125, true);    // two query blocks, misaligned rows
      softmax_case(1, 1, 9, 70, 256, 200, dt, 0.0625, false);  // single-buffered, column chunks
      softmax_case(1, 1, 130, 70, 32, 32, dt, -0.3, false);    // two-group forward blocks, Q negated
      softmax_case(1, 1, 100, 75, 96, 96, dt, 0.1, false);     // two-group forward, 32-key steps
      softmax_case(1, 1, 20, 130, 64, 64, dt, 0.12, false);    // two-group dkdv, 32-query steps
    }
  }
  if (which == "race" || which == "race_wgmma") {  // the wgmma kernels alone: ~1 min under TSan
    setenv("SOLA_FLASH_WGMMA", "1", 1);  // one and two 64-row tiles per block
    softmax_case(1, 1, 17, 140, 64, 64, at::kHalf, 0.17, false);
    softmax_case(1, 1, 130, 70, 32, 32, at::kBFloat16, -0.3, true);
    softmax_case(1, 1, 100, 75, 96, 96, at::kHalf, 0.1, false);
    softmax_case(1, 1, 70, 400, 64, 64, at::kBFloat16, 0.2, false);  // the forward's K / V ring wraps
    unsetenv("SOLA_FLASH_WGMMA");
  }
  if (which == "all" || which == "softmax") {  // last: their random draws leave the cases above as they were
    for (auto dt : {at::kHalf, at::kFloat, at::kDouble}) softmax_case(1, 2, 70, 90, 32, 40, dt, 0.2, false, 0, true);
    for (auto dt : {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}) softmax_case(2, 1, 70, 90, 32, 32, dt, 0.3, false, 5);
  }
  // Random cases (driver_common.h's fuzz_cases): sizes, head dims up to 256, dtypes, scales (0, negative),
  // views, NaN / -inf / +inf inputs, a gradient of lse; for fp16 / bf16 the wgmma kernels and one or two
  // row groups by chance; SOLA_MAX_GRID caps some grids so blocks walk several items.
  if (which == "fuzz") fuzz_cases(argc, argv, [&](FuzzDraw& f) {
    const at::ScalarType dt = f.dtype();
    int64_t B = f.uniform(1, 3), H = f.uniform(1, 4);
    if (f.chance(0.1)) B = 8, H = 16;
    const int64_t n_max = std::max<int64_t>(8, 1500 / (B * H));
    const int64_t Nq = f.length(n_max), Nk_drawn = f.length(n_max), Dk = f.head_dim(), Dv = f.head_dim();
    // fp32 with one key: dq, dk are 0 by cancellation and both sides leave rounding noise near the tolerance
    // (softmax_attention_notes.md, "Random cases"): two keys there
    const int64_t Nk = dt == at::kFloat && Nk_drawn == 1 ? 2 : Nk_drawn;
    const double u = f.real(0, 1);
    const double scale = u < 0.05 ? 0.0 : (u < 0.1 ? -1.0 : 1.0) * f.real(0.2, 1.2) / std::sqrt(double(Dk));
    // Poison 1 needs a fourth query, 2 a third column, 5 a third key; 4 (every score -2560) makes bf16 / fp16
    // dq a near-cancellation whose error can pass the tolerance (flash_cases).
    int poison = f.chance(0.15) ? int(f.uniform(1, 5)) : 0;
    const bool low = dt == at::kHalf || dt == at::kBFloat16;
    if ((poison == 1 && Nq <= 3) || (poison == 2 && Dk < 3) || (poison == 5 && Nk < 3) || (poison == 4 && low))
      poison = 0;
    const bool strided = f.chance(0.3), grad_lse = f.chance(0.15);
    if (low && std::max(Dk, Dv) <= 128 && f.chance(0.4)) setenv("SOLA_FLASH_WGMMA", "1", 1);
    if (f.chance(0.4)) setenv("SOLA_FLASH_GROUPS", f.chance(0.5) ? "1" : "2", 1);
    const MaybeCappedGrid cap(f);
    softmax_case(B, H, Nq, Nk, Dk, Dv, dt, scale, strided, poison, grad_lse);
    for (const char* var : {"SOLA_FLASH_WGMMA", "SOLA_FLASH_GROUPS"}) unsetenv(var);
  });
  // Whole tiles at SoLA-Vision's head dim 32 and at 64, bf16 and fp32: for the MEMSTAT=1 build's access
  // statistics.
  if (which == "vision") {
    softmax_case(1, 2, 1024, 1024, 32, 32, at::kBFloat16, 0.17, false);
    softmax_case(1, 1, 1024, 1024, 64, 64, at::kBFloat16, 0.125, false);
    softmax_case(1, 1, 512, 512, 32, 32, at::kFloat, 0.17, false);
  }
  if (which == "big") {
    softmax_case(1, 1, 1023, 1023, 32, 32, at::kHalf, 0.17, false);
    softmax_case(1, 1, 300, 4097, 64, 64, at::kBFloat16, 0.125, true);
    softmax_case(1, 1, 1023, 300, 32, 32, at::kFloat, 0.17, false);
    softmax_case(1, 1, 200, 4097, 128, 128, at::kFloat, 0.1, true);
    softmax_case(1, 1, 129, 1023, 64, 40, at::kDouble, 0.125, false);
  }
  std::printf("%s: %d failures, %ld launches, %ld threads\n", failures ? "FAILED" : "PASSED", failures,
              (long)emu::launches.load(), (long)emu::threads_run.load());
  std::printf("mmas %ld\n", (long)emu::mmas.load());
  return failures ? 1 : 0;
}
