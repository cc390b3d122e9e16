// Runs the linear-attention CUDA launchers (emulated on the CPU, see README.md) against the CPU
// kernels: out, S, z, then dq, dk, dv (dqn, dkn) from the same state, on awkward sizes, every dtype
// (fp16/bf16 take the tensor-core kernels), each feature map, q_norm / k_norm, strided and
// misaligned views, NaN inputs; a second backward must be bitwise equal. Fused RoPE (`rope` cases,
// fp16 / bf16): the CUDA kernels take q, k and the angle tables, the CPU side composes the rope
// kernels (rope_cpu.cpp) with q_norm / k_norm, as the op layer does where it does not fuse.
// Every CUDA result is also computed with the row kernels' other variants (SOLA_LINEAR_ROWS=unstaged;
// the backward also staged_presplit) and must be bitwise equal (bf16's unstaged ones only under
// SOLA_LINEAR_MMA=tf32: by default its staged row kernels multiply 16-bit operands).
// Usage: driver_linear [quick|all|big|race|fold|rope|rope_walk|huge|tiny|vision|fuzz <seed> <count> [first]].
#include <ATen/cuda/CUDAContext.h>  // the emulated device (emu::tuned_device)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "driver_common.h"
#include "linear_attention/linear_attention.h"
#include "rope/rope.h"

using namespace sola;

struct Case {
  int64_t B = 1, H = 1, Nq = 7, Nk = 7, Dk = 32, Dv = 32;
  at::ScalarType dt = at::kBFloat16;
  FeatureMap fm = FeatureMap::Elu;
  bool normalize = true, has_qn = false, has_kn = false, strided = false, poison = false, rope = false;
  bool huge = false;  // one key entry near the dtype's range: den ~ 1e30 (1e200 in fp64), den^2 overflows
  // q, k ~ 1e-20 sqrt(20 / Dk) (positive), v ~ 1e20, identity map, eps = 0: den ~ 1e-39, subnormal in fp32,
  // so 1 / den overflows (for Dk = 64 too) while out ~ v does not. Forward only: the CUDA backward still
  // multiplies by 1 / den (the CPU one divides).
  bool tiny = false;
  double eps = 1e-6;
};

// The rope tables (N, D / 2) of random angles, fp32 (what the op hands the kernels).
static std::pair<at::Tensor, at::Tensor> rope_tables(int64_t N, int64_t D) {
  const at::Tensor angles = at::randn({N, D / 2}, at::kFloat) * 3;
  return {angles.cos(), angles.sin()};
}

// rope_cpu's forward (rot, and feat = phi(x)) or backward (dx from grad_rot, grad_feat), contiguous.
static RopeParams rope_params(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, FeatureMap fm) {
  RopeParams r;
  r.B = x.size(0), r.H = x.size(1), r.N = x.size(2), r.D = x.size(3);
  r.cos = cos.data_ptr(), r.sin = sin.data_ptr(), r.feature_map = fm, r.x = make_view(x);
  r.dtype = x.scalar_type(), r.device_index = -1;
  return r;
}
static std::pair<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                                  FeatureMap fm) {
  at::Tensor rot = at::empty(x.sizes(), x.options()), feat = at::empty(x.sizes(), x.options());
  RopeParams r = rope_params(x, cos, sin, fm);
  r.rot = make_view(rot), r.feat = make_view(feat);
  rope_fwd_cpu(r);
  return {rot, feat};
}
static at::Tensor rope_grad_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, FeatureMap fm,
                                const at::Tensor& grad_rot, const at::Tensor* grad_feat) {
  at::Tensor dx = at::empty(x.sizes(), x.options());
  RopeParams r = rope_params(x, cos, sin, fm);
  r.grad_rot = make_view(grad_rot), r.dx = make_view(dx);
  if (grad_feat) r.grad_feat = make_view(*grad_feat);
  rope_bwd_cpu(r);
  return dx;
}

// The CUDA launchers with the row kernels' variant SOLA_LINEAR_ROWS=variant; main() clears the
// variable, so the other runs take the default.
template <typename F>
static void with_rows(const char* variant, F&& f) {
  setenv("SOLA_LINEAR_ROWS", variant, 1);
  f();
  unsetenv("SOLA_LINEAR_ROWS");
}

// a's bits as integers of its width.
static at::Tensor bits(const at::Tensor& a) {
  const size_t width = a.element_size();
  return a.contiguous().view(width == 2 ? at::kShort : width == 4 ? at::kInt : at::kLong);
}

// FAIL unless a and b hold the same bits.
static void expect_same_bits(const std::string& what, const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() && !at::equal(bits(a), bits(b))) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

static void linear_case(const Case& c) {
  char name[256];
  std::snprintf(name, sizeof name, "linear B%ld H%ld q%ld k%ld d%ld v%ld %s fm%d n%d qn%d kn%d s%d p%d r%d h%d", (long)c.B,
                (long)c.H, (long)c.Nq, (long)c.Nk, (long)c.Dk, (long)c.Dv, c10::toString(c.dt), (int)c.fm, c.normalize,
                c.has_qn, c.has_kn, c.strided, c.poison, c.rope, c.huge);
  if (c.tiny) std::strcat(name, " tiny");
  const at::ScalarType dt = c.dt, acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor q = input(c.B, c.H, c.Nq, c.Dk, dt, c.strided), k = input(c.B, c.H, c.Nk, c.Dk, dt, c.strided),
             v = input(c.B, c.H, c.Nk, c.Dv, dt, c.strided);
  at::Tensor qn = input(c.B, c.H, c.Nq, c.Dk, dt, false), kn = input(c.B, c.H, c.Nk, c.Dk, dt, c.strided);
  if (c.poison) k.select(0, c.B - 1).select(0, c.H - 1).select(0, c.Nk / 2).select(0, c.Dk / 2).fill_(NAN);
  if (c.tiny) {
    const double scale = 1e-20 * std::sqrt(20.0 / c.Dk);  // den ~ 0.64 Dk scale^2 ~ 1e-39
    for (at::Tensor* t : {&q, &k, &qn, &kn}) t->copy_(t->abs() * scale);
    v.mul_(1e20);
  }
  if (c.huge) k.select(0, 0).select(0, 0).select(0, c.Nk / 3).select(0, c.Dk / 3).fill_(dt == at::kDouble ? 1e200 : 1e30);
  LinearAttentionParams p;
  p.B = c.B, p.H = c.H, p.Nq = c.Nq, p.Nk = c.Nk, p.Dk = c.Dk, p.Dv = c.Dv;
  p.q = make_view(q), p.k = make_view(k), p.v = make_view(v);
  p.qn = c.has_qn ? make_view(qn) : p.q, p.kn = c.has_kn ? make_view(kn) : p.k;
  p.has_qn = c.has_qn, p.has_kn = c.has_kn;
  p.feature_map = c.fm, p.normalize = c.normalize, p.eps = c.tiny ? 0.0 : c.eps, p.dtype = dt, p.device_index = -1;
  // rope: the CPU side (pc) runs on rope(phi(x)) and phi(x) with the identity map; p takes the tables.
  LinearAttentionParams pc = p;
  at::Tensor cos, sin, rq, fq, rk, fk;
  if (c.rope) {
    std::tie(cos, sin) = rope_tables(c.Nq, c.Dk);
    std::tie(rq, fq) = rope_cpu(q, cos, sin, c.fm);
    std::tie(rk, fk) = rope_cpu(k, cos, sin, c.fm);
    pc.q = make_view(rq), pc.k = make_view(rk), pc.feature_map = FeatureMap::Identity;
    pc.qn = c.normalize ? make_view(fq) : pc.q, pc.kn = c.normalize ? make_view(fk) : pc.k;
    pc.has_qn = pc.has_kn = c.normalize;
    p.rope_cos = cos.data_ptr(), p.rope_sin = sin.data_ptr();
    // Where the fused kernels do not fit (EMU_DEVICE sm86, sm75) the op composes RoPE itself
    // (linear_attention_rope_fused_cuda): that case is the unfused one the other cases run. On an H100 they must.
    if (!linear_attention_rope_fused_cuda(p)) {
      if (emu::tuned_device()) {
        std::printf("FAIL %s: fused RoPE does not fit an H100\n", name);
        ++failures;
      } else {
        std::printf("skipped %s: fused RoPE does not fit this device\n", name);
      }
      return;
    }
  }

  at::Tensor out[3], state[3], z[3];  // CPU, CUDA, CUDA unstaged
  for (int r = 0; r < 3; ++r) {
    out[r] = nan_out({c.B, c.H, c.Nq, c.Dv}, dt, c.strided && r > 0);  // CUDA: the ops' layout
    state[r] = nan_out({c.B, c.H, c.Dk, c.Dv}, acc);
    z[r] = nan_out({c.B, c.H, c.Dk}, acc);
    LinearAttentionParams pr = r == 0 ? pc : p;
    pr.out = make_view(out[r]), pr.state = state[r].data_ptr(), pr.z = z[r].data_ptr();
    if (r == 0) linear_attention_fwd_cpu(pr);
    else if (r == 1) linear_attention_fwd_cuda(pr);
    else with_rows("unstaged", [&] { linear_attention_fwd_cuda(pr); });
  }
  // bf16's staged row kernels (head dims <= 64) multiply 16-bit operands unless SOLA_LINEAR_MMA=tf32, the
  // unstaged ones tf32: the same bits only then (tests/test_cuda_emulator.py runs both ways); else the
  // unstaged results are compared with the CPU kernels'.
  const char* mma = std::getenv("SOLA_LINEAR_MMA");
  const bool rows_16bit = dt == at::kBFloat16 && std::max(c.Dk, c.Dv) <= 64 && !(mma && std::strcmp(mma, "tf32") == 0);
  // On a smaller EMU_DEVICE a variant asked for that does not fit falls back to the SIMT row kernels: other bits.
  const bool same_variant_bits = emu::tuned_device();
  if (rows_16bit) compare(std::string(name) + " out (unstaged rows)", out[2], out[0], dt, !c.poison);
  else if (same_variant_bits) expect_same_bits(std::string(name) + " out: staged and unstaged rows differ", out[2], out[1]);
  compare(std::string(name) + " out", out[1], out[0], dt, !c.poison);
  compare(std::string(name) + " S", state[1], state[0], dt, !c.poison);
  // without the normaliser the composition's z is the mean of rope(phi(k)), the fused one's of phi(k): unused
  if (!c.rope || c.normalize) compare(std::string(name) + " z", z[1], z[0], dt, !c.poison);
  if (c.tiny) {
    if (!at::isfinite(out[1]).all().item<bool>()) {
      std::printf("FAIL %s: out not finite\n", name);
      ++failures;
    }
    std::printf("done %s\n", name);
    return;
  }

  at::Tensor g = input(c.B, c.H, c.Nq, c.Dv, dt, c.strided);
  at::Tensor grads[5][5];  // CPU, CUDA, CUDA again, CUDA unstaged, CUDA presplit: dq, dk, dv, dqn, dkn
  for (int r = 0; r < 5; ++r) {
    at::Tensor* d = grads[r];
    const bool il = c.strided && r > 0;
    d[0] = nan_out(q.sizes(), dt, il), d[1] = nan_out(k.sizes(), dt, il), d[2] = nan_out(v.sizes(), dt, il);
    d[3] = nan_out(q.sizes(), dt, il), d[4] = nan_out(k.sizes(), dt, il);
    LinearAttentionParams pr = r == 0 ? pc : p;
    pr.state = state[0].data_ptr(), pr.z = z[0].data_ptr(), pr.grad_out = make_view(g);
    pr.dq = make_view(d[0]), pr.dk = make_view(d[1]), pr.dv = make_view(d[2]);
    if (pr.has_qn) pr.dqn = make_view(d[3]);
    if (pr.has_kn) pr.dkn = make_view(d[4]);
    if (r == 0) linear_attention_bwd_cpu(pr);
    else if (r < 3) linear_attention_bwd_cuda(pr);
    else with_rows(r == 3 ? "unstaged" : "staged_presplit", [&] { linear_attention_bwd_cuda(pr); });
    if (r == 0 && c.rope) {  // d rope(phi(x)) and d phi(x) -> dx
      d[0] = rope_grad_cpu(q, cos, sin, c.fm, d[0], c.normalize ? &d[3] : nullptr);
      d[1] = rope_grad_cpu(k, cos, sin, c.fm, d[1], c.normalize ? &d[4] : nullptr);
    }
  }
  const char* names[5] = {" dq", " dk", " dv", " dqn", " dkn"};
  for (int i = 0; i < 5; ++i) {
    if ((i == 3 && !c.has_qn) || (i == 4 && !c.has_kn)) continue;
    compare(std::string(name) + names[i], grads[1][i], grads[0][i], dt, !c.poison);
    expect_same_bits(std::string(name) + names[i] + ": backward not bitwise reproducible", grads[2][i], grads[1][i]);
    if (rows_16bit) compare(std::string(name) + names[i] + " (unstaged rows)", grads[3][i], grads[0][i], dt, !c.poison);
    else if (same_variant_bits)
      expect_same_bits(std::string(name) + names[i] + ": staged and unstaged rows differ", grads[3][i], grads[1][i]);
    if (same_variant_bits)
      expect_same_bits(std::string(name) + names[i] + ": staged and presplit rows differ", grads[4][i], grads[1][i]);
  }
  if (c.poison && c.B * c.H > 1 && c.Nq > 0) {
    if (!at::isfinite(out[1].flatten(0, 1)[0]).all().item<bool>()) {
      std::printf("FAIL %s: NaN leaked into another head\n", name);
      ++failures;
    }
    if (at::isfinite(out[1].flatten(0, 1)[c.B * c.H - 1]).all().item<bool>()) {
      std::printf("FAIL %s: NaN vanished\n", name);
      ++failures;
    }
  }
  std::printf("done %s\n", name);
}

int main(int argc, char** argv) {
  at::manual_seed(0);
  unsetenv("SOLA_LINEAR_ROWS");
  const std::string which = argc > 1 ? argv[1] : "all";
  const at::ScalarType all_dts[] = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
  const at::ScalarType tc_dts[] = {at::kHalf, at::kBFloat16};
  auto run = [](Case c, at::ScalarType dt) {
    c.dt = dt;
    linear_case(c);
  };
  // QueryGrad summing dS, dz itself (head dim <= 32: fp16 / bf16 on the tensor-core kernel, fp32
  // on the SIMT one): blocks walking several row tiles (512 heads: 2 groups; 301 rows: a last
  // tile of 45), group partials + combine, q_norm / k_norm (with the identity map and signed
  // inputs fp16 overflows on the CPU as well: den ~ 0); Dk, Dv short of the tile (warps with no
  // dS rows, skipped column tiles); relu; no normaliser (no dz).
  auto fold_cases = [&](at::ScalarType dt) {
    Case c;
    c.B = 8, c.H = 16, c.Nq = 600, c.Nk = 40, c.has_qn = c.has_kn = true;
    run(c, dt);
    c.B = 32, c.Nq = 301, c.Nk = 8;
    run(c, dt);
    c = Case{};
    c.Nq = 200, c.Nk = 30, c.Dk = 20, c.Dv = 12, c.fm = FeatureMap::Relu, c.has_qn = true, c.strided = true;
    run(c, dt);
    c = Case{};
    c.H = 2, c.Nq = 130, c.Nk = 50, c.normalize = false;
    run(c, dt);
    c = Case{};  // dz's share of dk, dkn is ~0.002 at the sizes above, under the 16-bit tolerance;
    c.Nq = 600, c.Nk = 2, c.has_qn = c.has_kn = true;  // here dkn = phi'(kn) dz / 2 is O(1)
    run(c, dt);
  };
  const at::ScalarType fold_dts[] = {at::kHalf, at::kBFloat16, at::kFloat};
  if (which == "fold") {
    for (auto dt : fold_dts) fold_cases(dt);
  }
  if (which == "quick" || which == "all") {
    for (auto dt : all_dts) {
      Case c;
      c.Nq = 17, c.Nk = 113;
      run(c, dt);
      c.Dk = c.Dv = 64, c.has_qn = c.has_kn = true, c.strided = true;
      run(c, dt);
      c.B = 2, c.H = 3;  // strided with several heads: outputs in the ops' heads-interleaved layout
      run(c, dt);
    }
    // Five heads at head dim 32: under SOLA_MAX_GRID=2 (tests/test_cuda_emulator.py) each QueryGrad block
    // folds dS, dz for several heads in turn (a missing barrier let the next head zero the dz sums before
    // every thread had read them: fp32 dk 2e-3 off, found by `fuzz 3 400`).
    for (auto dt : all_dts) {
      Case c;
      c.H = 5, c.Nq = 70, c.Nk = 40;
      run(c, dt);
    }
  }
  // den^2 past the dtype's range: the query gradient's normaliser term is -(g . num / den) / den.
  // Head dim 32 (QueryGrad folding dS: tensor cores for bf16, SIMT for fp32) and 64; relu.
  if (which == "quick" || which == "all" || which == "huge") {
    for (auto dt : {at::kBFloat16, at::kFloat, at::kDouble}) {
      Case c;
      c.H = 2, c.Nq = 40, c.Nk = 33, c.huge = true;
      run(c, dt);
      c.Dk = c.Dv = 64, c.fm = FeatureMap::Relu;
      run(c, dt);
    }
  }
  // A subnormal fp32 denominator (eps = 0): head dim 32 (tensor cores for bf16, SIMT for fp32) and 64.
  if (which == "quick" || which == "all" || which == "tiny") {
    for (auto dt : {at::kBFloat16, at::kFloat}) {
      Case c;
      c.H = 2, c.Nq = 40, c.Nk = 33, c.fm = FeatureMap::Identity, c.tiny = true;
      run(c, dt);
      c.Dk = c.Dv = 64, c.has_qn = true;
      run(c, dt);
    }
  }
  if (which == "all") {
    for (auto dt : tc_dts) {
      Case c;
      for (int64_t d : {8, 59, 100, 128, 200}) {  // 200: the SIMT row kernels, tensor-core reduction
        c.Dk = c.Dv = d, c.Nq = 70, c.Nk = 65;
        run(c, dt);
      }
      c = Case{};
      c.Dk = 32, c.Dv = 64, c.Nq = 1, c.Nk = 1;
      run(c, dt);
      c.Dk = 64, c.Dv = 16, c.Nq = 65, c.Nk = 9, c.has_qn = true;
      run(c, dt);
      c.Dk = 24, c.Dv = 128, c.Nq = 33, c.Nk = 40, c.has_qn = false, c.has_kn = true, c.strided = true;
      run(c, dt);
      c = Case{};
      c.fm = FeatureMap::Relu, c.Dk = c.Dv = 48, c.Nq = 40, c.Nk = 50;
      run(c, dt);
      c.fm = FeatureMap::Identity, c.normalize = false;
      run(c, dt);
      c.fm = FeatureMap::Elu;
      run(c, dt);
      c = Case{};
      c.B = 2, c.H = 3, c.Nq = 20, c.Nk = 1100, c.Dk = c.Dv = 32;  // token chunks: partials + combine
      run(c, dt);
      c.Nq = 1100, c.Nk = 20, c.Dk = c.Dv = 64;  // query chunks in the backward
      run(c, dt);
      c = Case{};
      c.B = 2, c.H = 2, c.Nq = 9, c.Nk = 12, c.poison = true;
      run(c, dt);
      c.Nq = 0;
      run(c, dt);
    }
  }
  if (which == "all") {
    for (auto dt : fold_dts) fold_cases(dt);
  }
  // Fused RoPE (tensor-core kernels): every state bucket (32: QueryGrad sums dS; 64, 128: the token
  // reduction over q and g), token chunks and row groups, partial table vectors (Dk 10, 20: half % 4
  // != 0), Dk != Dv, strided views, relu / identity, no normaliser, NaN.
  if (which == "rope" || which == "all") {
    for (auto dt : tc_dts) {
      Case c;
      c.rope = true, c.Nq = c.Nk = 37;
      run(c, dt);
      c.Dk = c.Dv = 64, c.strided = true;
      run(c, dt);
      c.Dk = 128, c.Dv = 96, c.Nq = c.Nk = 70, c.strided = false;
      run(c, dt);
      c.Dk = 10, c.Dv = 6, c.Nq = c.Nk = 17, c.fm = FeatureMap::Relu;
      run(c, dt);
      c.Dk = 20, c.Dv = 40, c.fm = FeatureMap::Identity, c.normalize = false;
      run(c, dt);
      c = Case{};
      c.rope = true, c.B = 2, c.H = 3, c.Nq = c.Nk = 1100;  // token chunks, QueryGrad row groups
      run(c, dt);
      c.Dk = c.Dv = 64;
      run(c, dt);
      c = Case{};
      c.rope = true, c.B = 2, c.H = 2, c.Nq = c.Nk = 9, c.poison = true;
      run(c, dt);
    }
  }
  // 128 heads of 600 rows: row blocks walk two tiles (QueryGrad's dS fold too); with
  // EMU_BLOCKS_PER_SM=1 all ten. kD 32 and 64 with RoPE, and kD 64 with q_norm / k_norm (a third
  // staged input).
  if (which == "rope_walk") {
    Case c;
    c.rope = true, c.B = 8, c.H = 16, c.Nq = c.Nk = 600;
    for (auto dt : tc_dts) run(c, dt);
    c.Dk = c.Dv = 64;
    for (auto dt : tc_dts) run(c, dt);
    c.rope = false, c.has_qn = c.has_kn = true;
    for (auto dt : tc_dts) run(c, dt);
  }
  if (which == "big") {
    Case c;
    c.B = 1, c.H = 2, c.Nq = 3000, c.Nk = 3000, c.Dk = c.Dv = 128;
    run(c, at::kBFloat16);
    c.Dk = c.Dv = 32, c.Nq = c.Nk = 5000, c.has_qn = c.has_kn = true;
    run(c, at::kHalf);
  }
  // SoLA-Vision's first stage at batch 1 (bf16 with its fused RoPE, and fp32) and the sweep's head dim
  // 64: whole-tile shapes for the MEMSTAT=1 build's access statistics.
  if (which == "vision") {
    Case c;
    c.H = 2, c.Nq = c.Nk = 3136, c.rope = true;
    run(c, at::kBFloat16);
    c.rope = false;
    run(c, at::kFloat);
    c.H = 1, c.Nq = c.Nk = 4096, c.Dk = c.Dv = 64;
    run(c, at::kBFloat16);
  }
  // Random cases (driver_common.h's fuzz_cases): sizes, head dims up to 256, dtypes, maps, options,
  // views, RoPE where the CUDA kernels fuse it, NaN; SOLA_MAX_GRID caps some grids so blocks walk items.
  if (which == "fuzz") fuzz_cases(argc, argv, [&](FuzzDraw& f) {
    Case c;
    c.dt = f.dtype();
    c.B = f.uniform(1, 3), c.H = f.uniform(1, 5);
    if (f.chance(0.1)) c.B = 8, c.H = 16;  // many heads: grids past one block per head
    const int64_t n_max = std::max<int64_t>(8, 3000 / (c.B * c.H));
    c.Nq = f.length(n_max), c.Nk = f.length(n_max), c.Dk = f.head_dim(), c.Dv = f.head_dim();
    c.fm = static_cast<FeatureMap>(f.uniform(0, 2));
    // The identity map's normaliser phi(q) . z can sit at 0: out = num / den is then ill-conditioned.
    c.normalize = c.fm != FeatureMap::Identity && f.chance(0.85);
    c.has_qn = c.normalize && f.chance(0.25), c.has_kn = c.normalize && f.chance(0.25);
    c.strided = f.chance(0.3), c.poison = f.chance(0.1);
    LinearAttentionParams p;
    p.Dk = c.Dk, p.Dv = c.Dv, p.dtype = c.dt, p.device_index = -1;
    if (!c.has_qn && !c.has_kn && c.Dk % 2 == 0 && f.chance(0.35) && linear_attention_rope_fused_cuda(p))
      c.rope = true, c.Nk = c.Nq;
    // One key: out is v whatever k is, so dk is 0 by cancellation of terms ~ |g . v| / den, and both sides
    // leave their rounding of those terms: fp32 (seed 3 case 333) 3e-5 apart, the CUDA one the nearer to
    // fp64; fp16 (seed 5 case 85, relu) CUDA 7e-3 from fp64 against a true dk of 8e-6, the tensor-core
    // kernels' tf32 operands (2^-11, an fp16 input's own precision) on terms of ~10. Two keys.
    if (c.Nk == 1) c.Nk = 2, c.Nq = c.rope ? 2 : c.Nq;
    // relu with q_norm / k_norm: a row's normaliser phi(qn) . z can be 0 where phi(q) . S is not (few keys, small
    // Dk), so out = num / eps, past fp16's range for eps 1e-6 in both kernels (seed 6 case 247): eps 0.1 in
    // fp16, as tests/test_fuzz.py takes.
    if (c.fm == FeatureMap::Relu && c.dt == at::kHalf) c.eps = 0.1;
    const MaybeCappedGrid cap(f);
    linear_case(c);
  });
  if (which == "race") {  // for the TSAN=1 build: 1024 heads, so every QueryGrad block walks all
    Case c;               // its head's row tiles (bf16: 3 of 64, fp32: 2 of 128), reusing qs / xs
    c.B = 32, c.H = 32, c.Nq = 130, c.Nk = 8, c.has_qn = true;  // and the sums between them
    run(c, at::kBFloat16);
    c.Nq = 250;
    run(c, at::kFloat);
  }
  std::printf("%s: %d failures, %ld launches, %ld threads, %ld mmas\n", failures ? "FAILED" : "PASSED", failures,
              (long)emu::launches.load(), (long)emu::threads_run.load(), (long)emu::mmas.load());
  return failures ? 1 : 0;
}
