// Runs the rope CUDA launchers (emulated on the CPU, see README.md) against the CPU kernels: rot,
// feat, then dx with and without grad_feat, every dtype and feature map, head dims that leave a
// partial last vector, strided and misaligned views (element loads), NaN inputs.
// Usage: driver_rope [all].
#include <cstdio>
#include <string>

#include "driver_common.h"
#include "rope/rope.h"

using namespace sola;

struct Case {
  int64_t B = 2, H = 3, N = 17, D = 32;
  at::ScalarType dt = at::kBFloat16;
  FeatureMap fm = FeatureMap::Elu;
  bool strided = false, misaligned = false, features = true, poison = false;
};

// x as a view whose rows start one element off a 16-byte boundary (odd strides and offset).
static at::Tensor misaligned_view(const at::Tensor& x) {
  const auto s = x.sizes();
  at::Tensor big = at::randn({s[0], s[1], s[2], s[3] + 1}, at::kDouble).to(x.scalar_type());
  at::Tensor v = big.narrow(3, 1, s[3]);
  v.copy_(x);
  return v;
}

static void rope_case(const Case& c) {
  char name[200];
  std::snprintf(name, sizeof name, "rope B%ld H%ld N%ld D%ld %s fm%d s%d m%d f%d p%d", (long)c.B, (long)c.H, (long)c.N,
                (long)c.D, c10::toString(c.dt), (int)c.fm, c.strided, c.misaligned, c.features, c.poison);
  const at::ScalarType dt = c.dt, acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = input(c.B, c.H, c.N, c.D, dt, c.strided);
  at::Tensor g = input(c.B, c.H, c.N, c.D, dt, c.strided), gf = input(c.B, c.H, c.N, c.D, dt, false);
  if (c.misaligned) x = misaligned_view(x), g = misaligned_view(g);
  if (c.poison) x.select(0, 0).select(0, 0).select(0, c.N / 2).select(0, 1).fill_(NAN);
  const at::Tensor angles = at::randn({c.N, c.D / 2}, at::kDouble) * 3;
  const at::Tensor cos = angles.cos().to(acc), sin = angles.sin().to(acc);

  RopeParams p;
  p.B = c.B, p.H = c.H, p.N = c.N, p.D = c.D;
  p.cos = cos.data_ptr(), p.sin = sin.data_ptr();
  p.feature_map = c.fm, p.dtype = dt, p.device_index = -1;
  p.x = make_view(x), p.grad_rot = make_view(g);
  if (c.features) p.grad_feat = make_view(gf);
  at::Tensor rot[2], feat[2], dx[2];
  for (int r = 0; r < 2; ++r) {  // 0: emulated CUDA, 1: CPU
    rot[r] = nan_out(x.sizes(), dt), feat[r] = nan_out(x.sizes(), dt), dx[r] = nan_out(x.sizes(), dt);
    p.rot = make_view(rot[r]), p.dx = make_view(dx[r]);
    p.feat = c.features ? make_view(feat[r]) : View4{};
    if (r == 0) rope_fwd_cuda(p), rope_bwd_cuda(p);
    else rope_fwd_cpu(p), rope_bwd_cpu(p);
  }
  const bool finite = !c.poison;
  compare(std::string(name) + " rot", rot[0], rot[1], dt, finite);
  if (c.features) compare(std::string(name) + " feat", feat[0], feat[1], dt, finite);
  else if (!at::isnan(feat[0]).all().item<bool>()) std::printf("FAIL %s: feat written without features\n", name), ++failures;
  compare(std::string(name) + " dx", dx[0], dx[1], dt, finite);
}

int main(int argc, char** argv) {
  at::manual_seed(0);
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which != "all") return std::printf("usage: driver_rope [all]\n"), 2;
  const at::ScalarType dts[] = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
  const FeatureMap fms[] = {FeatureMap::Elu, FeatureMap::Relu, FeatureMap::Identity};
  for (auto dt : dts) {
    for (auto fm : fms) {
      Case c;
      c.dt = dt, c.fm = fm;
      rope_case(c);
    }
    for (int64_t D : {2, 6, 10, 30, 58, 256}) {  // partial last vectors; tables not 16-byte aligned per row
      Case c;
      c.dt = dt, c.D = D, c.N = 9;
      rope_case(c);
    }
    Case c;
    c.dt = dt, c.strided = true, c.features = false;
    rope_case(c);
    c.strided = false, c.misaligned = true, c.features = true, c.D = 24;
    rope_case(c);
    c = Case{};
    c.dt = dt, c.poison = true;
    rope_case(c);
    c = Case{};
    c.dt = dt, c.B = 1, c.H = 1, c.N = 1, c.D = 8;
    rope_case(c);
  }
  return report_failures();
}
