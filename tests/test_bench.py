"""The benchmark harness on the CPU: bench/kernels.py --tiny writes a JSON in the DESIGN.md format
whose derived columns follow their formulas, bench/plot.py makes PNGs of it, bench/models.py
measures a stand-in model (the real one may not be importable), scripts/perf_table.py renders it,
and csrc_sha256 equals the shell pipeline DESIGN.md names."""
import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def _load(name, path):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


common = _load("bench_common", os.path.join(BENCH, "common.py"))
kernels = _load("bench_kernels", os.path.join(BENCH, "kernels.py"))
models = _load("bench_models", os.path.join(BENCH, "models.py"))
dwconv = _load("bench_dwconv", os.path.join(BENCH, "dwconv.py"))
perf_table = _load("perf_table", os.path.join(ROOT, "scripts", "perf_table.py"))

E = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu-tiny.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "kernels.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sola_ops" in proc.stdout  # the table at the end
    with open(out) as f:
        return out, json.load(f)


def test_kernels_json_schema(tiny_json):
    _, data = tiny_json
    for key in ("device", "torch", "date", "csrc_sha256", "peak", "rows", "skipped"):
        assert key in data, key
    assert data["torch"] == torch.__version__
    assert data["csrc_sha256"] == common.csrc_sha256(ROOT)
    assert data["peak"]["copy_GBps"] > 0 and data["peak"]["bf16_matmul_TFLOPs"] > 0
    rows = data["rows"]
    assert rows
    for r in rows:
        for key in ("op", "impl", "pass", "dtype", "B", "H", "Nq", "Nk", "D", "ms", "GBps", "TFLOPs",
                    "peak_mem_MB", "pct_peak", "ratio_to_best_baseline"):
            assert key in r, (key, r)
        assert r["op"] in ("linear_attention", "softmax_attention")
        assert r["pass"] in ("fwd", "fwd_bwd")
        assert r["impl"] in ("sola_ops", "reference", "einsum_fp32", "sdpa_flash", "sdpa_cudnn",
                             "sdpa_efficient", "sdpa_math", "naive", "fla", "flash_bla")
        assert r["dtype"] in E
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        assert r["peak_mem_MB"] is None  # CPU
        if r["op"] == "linear_attention":
            assert r["GBps"] > 0 and r["TFLOPs"] is None
        else:
            assert r["TFLOPs"] > 0 and r["GBps"] is None
    seen = {(r["op"], r["impl"], r["pass"]) for r in rows}
    for op, impls in (("linear_attention", ("sola_ops", "reference", "einsum_fp32")),
                      ("softmax_attention", ("sola_ops", "sdpa_math", "naive"))):
        for impl in impls:
            for p in ("fwd", "fwd_bwd"):
                assert (op, impl, p) in seen, (op, impl, p)
    for s in data["skipped"]:
        assert s["reason"] and "op" in s and "impl" in s
    # CUDA-only baselines are listed as skipped with a reason, not silently dropped
    skipped_impls = {s["impl"] for s in data["skipped"]}
    assert {"sdpa_cudnn", "sdpa_efficient", "fla", "flash_bla"} <= skipped_impls


def test_kernels_derived_columns(tiny_json):
    """GB/s, TFLOP/s, % of peak and the ratio recomputed here from the issue's formulas."""
    _, data = tiny_json
    rows, peak = data["rows"], data["peak"]
    for r in rows:
        bh, n, d, s = r["B"] * r["H"], r["Nq"], r["D"], r["ms"] * 1e-3
        assert r["Nq"] == r["Nk"]
        if r["op"] == "linear_attention":
            per_head = 4 * n * d if r["pass"] == "fwd" else 11 * n * d  # fwd + bwd's 7*N*D
            assert r["GBps"] == pytest.approx(E[r["dtype"]] * bh * per_head / s / 1e9, rel=2e-3)
            assert r["pct_peak"] == pytest.approx(100 * r["GBps"] / peak["copy_GBps"], rel=1e-2, abs=0.01)
        else:
            flops = 4 * bh * n * n * d * (1 if r["pass"] == "fwd" else 3.5)
            assert r["TFLOPs"] == pytest.approx(flops / s / 1e12, rel=2e-3, abs=1e-4)
            assert r["pct_peak"] == pytest.approx(100 * r["TFLOPs"] / peak["bf16_matmul_TFLOPs"], rel=1e-2, abs=0.05)
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["pass"], r["dtype"], r["B"], r["H"], r["Nq"], r["D"], r["case"]), []).append(r)
    for grp in groups.values():
        base = [r for r in grp if r["impl"] != "sola_ops"]
        best = min(r["ms"] for r in base)
        for r in grp:
            assert r["ratio_to_best_baseline"] == pytest.approx(best / r["ms"], rel=1e-3)
        assert max(r["ratio_to_best_baseline"] for r in base) == pytest.approx(1.0)


def test_kernels_outputs_agree(tiny_json):
    """Every impl computed the same function on the same inputs (rel_err of fwd rows)."""
    _, data = tiny_json
    fwd = [r for r in data["rows"] if r["pass"] == "fwd"]
    assert all("rel_err" in r for r in fwd)
    for r in fwd:
        tol = 1e-4 if r["dtype"] == "float32" else 3e-2
        assert r["rel_err"] <= tol, r


def test_plot_makes_pngs(tiny_json, tmp_path):
    path, _ = tiny_json
    src = tmp_path / "run.json"
    shutil.copy(path, src)
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "plot.py"), str(src)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["run_linear_sweep.png", "run_linear_vision.png", "run_softmax_long.png",
                    "run_softmax_vision.png"]
    for name in pngs:
        blob = (tmp_path / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000


def test_perf_table_renders(tiny_json):
    path, data = tiny_json
    md = perf_table.render(data, current_sha=data["csrc_sha256"])
    assert md.startswith(f"### {data['device']}")
    assert "stale" not in md
    body = [ln for ln in md.splitlines() if ln.startswith("| linear") or ln.startswith("| softmax")]
    assert len(body) == len({common.group_key(r) for r in data["rows"]})
    assert "stale" in perf_table.render(data, current_sha="0" * 64)
    assert perf_table.main([str(path), "--all-impls", "--out", os.devnull]) == 0


def test_perf_table_variants(tiny_json):
    """Variants of ours timed beside sola_ops get a table of their time over sola_ops' per case and a summary:
    the numbers a GPU run picks each default by."""
    _, data = tiny_json
    ours = [r for r in data["rows"] if r["impl"] == "sola_ops" and r["op"] == "softmax_attention"][:2]
    assert len(ours) == 2
    variants = [dict(r, impl="sola_ops_1group", ms=r["ms"] * f) for r, f in zip(ours, (0.5, 2.0))]
    md = perf_table.render(dict(data, rows=data["rows"] + variants))
    table = md.split("Variants of ours")[1]
    assert "| sola_ops_1group |" in table.splitlines()[2]
    assert "| 0.50 |" in table and "| 2.00 |" in table
    same_pass = ours[0]["pass"] == ours[1]["pass"]
    summary = [ln for ln in table.splitlines() if ln.startswith("- sola_ops_1group, softmax")]
    assert len(summary) == (1 if same_pass else 2)
    if same_pass:
        assert "geometric mean 1.00, faster in 1 of 2 cases" in summary[0]
    assert "Variants of ours" not in perf_table.render(data)


def test_perf_table_default_skips_dwconv_results(tiny_json, tmp_path, monkeypatch):
    """Without arguments it renders bench/results/*.json but not bench/dwconv.py's <gpu>_dwconv.json, whose
    rows it cannot show (it printed an empty section for it)."""
    path, data = tiny_json
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "gpu.json").write_text(path.read_text())
    (results / "gpu_dwconv.json").write_text(json.dumps({**data, "device": "dwconv device", "rows": []}))
    monkeypatch.setattr(perf_table, "ROOT", str(tmp_path))
    out = tmp_path / "table.md"
    assert perf_table.main(["--out", str(out)]) == 0
    md = out.read_text()
    assert f"### {data['device']}" in md and "dwconv device" not in md


def test_formulas():
    c = kernels.Case("linear_attention", "vision", "bfloat16", B=128, H=2, Nq=3136, Nk=3136, D=32)
    assert kernels.linear_bytes(c, "fwd") == 2 * 128 * 2 * 4 * 3136 * 32
    assert kernels.linear_bytes(c, "fwd_bwd") == 2 * 128 * 2 * 11 * 3136 * 32
    s = kernels.Case("softmax_attention", "long", "bfloat16", B=8, H=16, Nq=4096, Nk=4096, D=64)
    assert kernels.softmax_flops(s, "fwd") == 4 * 8 * 16 * 4096 * 4096 * 64
    assert kernels.softmax_flops(s, "fwd_bwd") == 3.5 * 4 * 8 * 16 * 4096 * 4096 * 64


def test_shape_sets():
    """The issue's GPU shapes are all there; CPU --quick stays small."""
    gpu = kernels.build_cases("cuda")
    lin = {(c.B, c.H, c.Nq, c.D) for c in gpu if c.op == "linear_attention" and c.dtype == "bfloat16"}
    for shape in [(128, 2, 3136, 32), (128, 4, 784, 32), (128, 10, 196, 32), (128, 16, 49, 32),
                  (8, 2, 16384, 32), (2, 4, 65536, 32)] + [(8, 16, 1024 << i, 64) for i in range(7)]:
        assert shape in lin, shape
    smx = {(c.B, c.H, c.Nq, c.D) for c in gpu if c.op == "softmax_attention" and c.dtype == "bfloat16"}
    for d in (32, 64):
        for shape in [(128, 2, 3136, d), (128, 4, 784, d), (128, 8, 196, d), (8, 2, 16384, d)]:
            assert shape in smx, shape
    for d in (64, 128):
        for i in range(6):
            assert (8, 16, 1024 << i, d) in smx
    assert {c.dtype for c in gpu} == {"bfloat16", "float16", "float32"}
    cpu = kernels.build_cases("cpu", quick=True)
    assert max(c.B * c.H * c.Nq * c.Nk for c in cpu if c.op == "softmax_attention") <= 4 * 1024 * 1024


def test_csrc_sha256_matches_shell(tmp_path):
    if not (shutil.which("sha256sum") and shutil.which("find") and shutil.which("xargs")):
        pytest.skip("needs find, xargs and sha256sum")
    files = {"csrc/sola.cpp": "a", "csrc/common.h": "b\n", "csrc/Z.cu": "c", "csrc/linear_attention/x_cpu.cpp": "d",
             "csrc/linear_attention/X.h": "", "csrc/softmax_attention/y.cu": "e" * 1000}
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def shell():
        out = subprocess.run("find csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum", shell=True,
                             cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        return out.split()[0]

    first = common.csrc_sha256(str(tmp_path))
    assert first == shell()
    (tmp_path / "csrc/common.h").write_text("changed\n")
    assert common.csrc_sha256(str(tmp_path)) == shell() != first
    if os.path.isdir(os.path.join(ROOT, "csrc")):
        out = subprocess.run("find csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum", shell=True,
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert common.csrc_sha256(ROOT) == out.split()[0]


class _StandIn(torch.nn.Module):
    """A small backbone with the sola_vision constructor arguments (attn_impl, features_only)."""

    def __init__(self, attn_impl, features_only, num_classes=10):
        super().__init__()
        import sola_ops
        self.ops = sola_ops
        self.attn_impl, self.features_only, self.num_classes = attn_impl, features_only, num_classes
        self.stem = torch.nn.Conv2d(3, 32, 16, stride=16)
        self.head = torch.nn.Linear(32, num_classes)
        self.autocast_dtypes = set()  # what the steps ran under: None (off) or the CPU autocast dtype

    def forward(self, x):
        self.autocast_dtypes.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        t = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, 32)
        B, N, _ = t.shape
        q = t.reshape(B, N, 2, 16).transpose(1, 2)
        if self.attn_impl == "sola":
            a = self.ops.softmax_attention(q, q, q) + self.ops.linear_attention(q, q, q)
        else:
            a = torch.nn.functional.scaled_dot_product_attention(q, q, q) + q
        a = a.transpose(1, 2).reshape(B, N, 32)
        return [a] if self.features_only else self.head(a.mean(1))


@pytest.mark.parametrize("amp, dtype", [(None, "float32"), ("bf16", "bfloat16")])
def test_models_bench_with_stand_in(monkeypatch, amp, dtype):
    made, autocast_dtypes = [], []

    def create_model(name, pretrained=False, attn_impl="sola", features_only=False):
        assert name == "sola_vision_tiny" and pretrained is False
        made.append((attn_impl, features_only))
        model = _StandIn(attn_impl, features_only)
        autocast_dtypes.append(model.autocast_dtypes)
        return model

    monkeypatch.setattr(models, "load_models", lambda: (types.SimpleNamespace(create_model=create_model), None))
    args = argparse.Namespace(quick=True, reps=2, budget_s=None, max_impl_s=60.0, amp=amp)
    rows, skipped = [], []
    models.run(torch.device("cpu"), args, rows, skipped)
    assert not skipped, skipped
    common.add_derived(rows, {})
    cfgs = models.configs("cpu", quick=True)
    assert len(rows) == len(cfgs) * 2 * 2  # configs x attn_impl x (fwd, train)
    assert {(r["op"], r["pass"]) for r in rows} == {("model_fwd", "fwd"), ("model_train", "fwd_bwd")}
    for r in rows:
        assert r["img_per_s"] == pytest.approx(r["B"] / (r["ms"] * 1e-3), rel=1e-3)
        assert r["impl"] == ("sola_ops" if r["attn_impl"] == "sola" else "torch")
        assert r["dtype"] == dtype and r["model"] == "sola_vision_tiny"
        if r["attn_impl"] == "torch":
            assert r["ratio_to_best_baseline"] == pytest.approx(1.0)
    assert ("sola", True) in made and ("torch", False) in made
    assert set().union(*autocast_dtypes) == {torch.bfloat16 if amp == "bf16" else None}


def test_models_bench_skips_without_model(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_models", lambda: (None, "sola_vision not importable (test)"))
    out = tmp_path / "m.json"
    data = models.main(["--device", "cpu", "--out", str(out), "--no-table"])
    assert data["rows"] == []
    assert {s["op"] for s in data["skipped"]} == {"model_fwd", "model_train"}
    assert all("test" in s["reason"] for s in data["skipped"])
    with open(out) as f:
        assert json.load(f)["peak"]["copy_GBps"] > 0
    # --strict makes that a failure (gpu_check's model step said ok with no row measured)
    assert data["meta"]["models_exit_status"] == 0
    strict = models.main(["--device", "cpu", "--out", str(out), "--no-table", "--strict"])
    assert strict["meta"]["models_exit_status"] == 1
    assert models.failures([{"reason": "time budget (--budget-s 10) used up"},
                            {"reason": common.short_reason(torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                                  "allocate 2 GiB"))}]) == []


def test_model_breakdown_groups_the_step_time():
    """bench/model_breakdown.py on CPU: both impls profiled, our ops grouped as sola_ops in the sola model
    only, and the torch model's attention in sdpa / gemm instead."""
    if models.load_models()[0] is None:
        pytest.skip("timm or sola_vision not importable")
    import model_breakdown as MB
    groups = MB.measure(MB.parse_args(["--device", "cpu", "--img-size", "64", "--batch", "1"]))
    assert set(groups) == {"sola", "torch"}
    assert groups["sola"]["sola_ops"] > 0 and groups["torch"].get("sola_ops", 0.0) == 0.0
    assert groups["sola"]["sola_ops conv"] > 0 and groups["torch"].get("sola_ops conv", 0.0) == 0.0
    assert groups["sola"]["sola_ops norm"] > 0 and groups["torch"].get("sola_ops norm", 0.0) == 0.0
    assert groups["torch"]["gemm"] > 0 and groups["sola"]["conv"] > 0
    assert MB.group_of("void sola::la::token_reduce_tc_kernel<c10::BFloat16, 32>(sola::la::TokenReduceArgs)") == "sola_ops"
    assert MB.group_of("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT") == "gemm"
    assert MB.group_of("void sola::(anonymous namespace)::dwconv_wgrad_kernel<c10::BFloat16, 4>(sola::DwconvParams)") \
        == "sola_ops conv"
    assert MB.group_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv"
    assert MB.group_of("void sola::(anonymous namespace)::ln_bwd_kernel<c10::BFloat16, 8, 2>(sola::LayerNormParams, "
                       "int, float*)") == "sola_ops norm"
    assert MB.group_of("sola_ops::layer_norm_fwd") == "sola_ops norm"
    assert MB.group_of("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>") == "norm"


def test_model_breakdown_op_bytes():
    """--ops: each op's time joined with the bytes of its tensor inputs and outputs over one step; views
    (a transpose) move nothing and are not listed."""
    import model_breakdown as MB
    import sola_ops
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    m = torch.randn(16, 32)

    def step():
        y = sola_ops.layer_norm(x, w) @ m.t()
        y.sum().backward()
    effs = MB.op_efficiency(step, MB.profile_step(step, torch.device("cpu"), 2)[1])
    ms, calls, gb = effs["sola_ops::layer_norm_fwd"]
    # x and weight in; out, mean and rstd out (fp32)
    assert ms > 0 and calls == 1 and gb * 1e9 == 64 * 32 * 4 + 32 * 4 + 64 * 32 * 4 + 2 * 64 * 4
    assert effs["sola_ops::layer_norm_bwd"][2] > 0 and effs["aten::mm"][1] >= 1
    assert "aten::t" not in effs and "aten::transpose" not in effs


def test_model_breakdown_bytes_per_step():
    """--bytes: both impls' bytes per step at a batch, extrapolated from batches 2 and 4; the sola path moves
    fewer (no fp32 LayerNorm round trips, fused gate / ReLU, no layout copies) and runs our ops."""
    if models.load_models()[0] is None:
        pytest.skip("timm or sola_vision not importable")
    import model_breakdown as MB
    args = MB.parse_args(["--device", "cpu", "--img-size", "64", "--batch", "6", "--bytes", "5"])
    per_impl = MB.bytes_per_step(args)
    sola, torch_ = (sum(per_impl[i].values()) for i in ("sola", "torch"))
    assert 0 < sola < torch_
    assert per_impl["sola"]["sola_ops::silu_mul_fwd"] > 0 and "sola_ops::silu_mul_fwd" not in per_impl["torch"]


def test_gpu_check_script_parses():
    if not shutil.which("bash"):
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")], check=True)


def test_dwconv_bench(tmp_path):
    """bench/dwconv.py on CPU: both impls, both passes per shape and form (the three conv forms, the
    LayerNorm, silu_mul and bias_gelu), the same results, derived columns."""
    out = tmp_path / "dw.json"
    data = dwconv.main(["--device", "cpu", "--tiny", "--reps", "2", "--out", str(out)])
    rows = data["rows"]
    assert not data["skipped"], data["skipped"]
    assert len(rows) == len(dwconv.TINY_SHAPES) * (len(dwconv.FORMS) + 3) * 2 * 2
    assert {r["case"] for r in rows} == {"dwconv_residual", "dwconv_silu", "dwconv_downsample", "layer_norm",
                                         "silu_mul", "bias_gelu"}
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in ("sola_ops", "torch") for p in ("fwd", "fwd_bwd")}
    for r in rows:
        B, H, W, C = next(s for s in dwconv.TINY_SHAPES if s[0] == r["B"] and s[1] * s[2] == r["Nq"])
        assert r["op"] == (r["case"] if r["case"] in ("layer_norm", "silu_mul", "bias_gelu") else "depthwise_conv3x3")
        assert r["D"] == C and r["img_hw"] == [H, W]
        assert r["max_abs_diff_vs_torch"] < 1e-4  # fp32: ours and torch's agree
        # elements moved, in x's size: stride 1 reads x, writes out (+ reads g, x, writes dx);
        # the downsample's out and g are a quarter-ish of x (ceil(H / 2) x ceil(W / 2)), relu reads out too
        x_elems = B * H * W * C
        out_elems = B * -(-H // 2) * -(-W // 2) * C if r["case"] == "dwconv_downsample" else x_elems
        elems = x_elems + out_elems
        if r["pass"] == "fwd_bwd":
            elems += out_elems * (2 if r["case"] == "dwconv_downsample" else 1) + 2 * x_elems
        if r["case"] == "silu_mul":  # gate in; backward: gate in, dgate out (3 + 5 tensor passes)
            elems = x_elems * (8 if r["pass"] == "fwd_bwd" else 3)
        if r["case"] == "bias_gelu":  # fc1's 4C-wide output: 2 + 3 elementwise passes
            elems = 4 * x_elems * (5 if r["pass"] == "fwd_bwd" else 2)
        assert r["GBps"] == pytest.approx(elems * 4 / (r["ms"] * 1e-3) / 1e9, rel=1e-3)
        if r["impl"] == "torch":
            assert r["ratio_to_best_baseline"] == pytest.approx(1.0)
    with open(out) as f:
        assert json.load(f)["csrc_sha256"] == data["csrc_sha256"]


def test_kernels_refuses_unknown_names(capsys):
    """A misspelt --impls / --ops / --dtypes / --sets name stops the run before any measuring (it dropped that
    impl silently, or --ops ended in a KeyError); the names gpu_check.sh passes are all known."""
    for flag, value in (("--impls", "sola_ops,flashbla"), ("--ops", "attn"), ("--dtypes", "bf61"),
                        ("--sets", "visoin")):
        with pytest.raises(SystemExit) as exc:
            kernels.parse_args(["--tiny", flag, value])
        assert exc.value.code == 2 and value.split(",")[-1] in capsys.readouterr().err
    with open(os.path.join(ROOT, "scripts", "gpu_check.sh")) as f:
        script = f.read()
    ours = script.split("OUR_IMPLS=", 1)[1].split()[0]
    peers = script.split("--ops linear --impls ", 1)[1].split()[0]
    for impls in (ours, peers):
        assert kernels.parse_args(["--quick", "--impls", impls]).impls == impls
    assert kernels.parse_args(["--ops", "softmax", "--dtypes", "bf16,float32", "--sets", "vision,long"]).ops == "softmax"


def _runner(**kw):
    args = argparse.Namespace(budget_s=None, reps=1, tiny=True, quick=False, max_impl_s=20.0, verbose=False)
    vars(args).update(kw)
    return kernels.Runner(torch.device("cpu"), args, kernels.load_sola_ops()[1])


def test_kernels_skip_reason_keeps_sdpa_why():
    """A backend that refuses: the skipped reason holds SDPA's reasons, which come as warnings of their own after
    the "... not used because:" ones (only those headers were kept: the H200 run's fp32 rows said nothing more)."""
    import warnings

    def refuse(q, k, v):
        for msg in ("Flash attention kernel not used because: (Triggered internally at sdp_utils.cpp:988.)",
                    "Expected query, key and value to all be of dtype: {Half, BFloat16}. Got Query dtype: float "
                    "(Triggered internally at sdp_utils.cpp:123.)"):
            warnings.warn(msg)
        raise RuntimeError("No available kernel. Aborting execution.")

    case = kernels.Case("softmax_attention", "vision", "float32", 1, 2, 64, 64, 16)
    runner = _runner()
    runner.measure(case, kernels.Impl("sdpa_flash", fn=refuse), "fwd", lambda: refuse(None, None, None), None, None)
    (entry,) = runner.skipped
    assert entry["reason"].startswith("RuntimeError: No available kernel")
    assert "Flash attention kernel not used because:" in entry["reason"]
    assert "Expected query, key and value to all be of dtype: {Half, BFloat16}" in entry["reason"]
    assert "Triggered internally" not in entry["reason"]


def test_kernels_impl_passes():
    """A variant timed on some passes only (sola_ops_twin: the backward's kernels, fwd_bwd) has no row of the
    others, beside an impl that runs both."""
    case = kernels.Case("softmax_attention", "vision", "float32", 1, 2, 64, 64, 16)
    runner = _runner()
    fn = kernels.load_sola_ops()[1].softmax_attention  # the reference: any function of q, k, v will do
    runner.run_case(case, [kernels.Impl("sola_ops", fn=fn), kernels.Impl("sola_ops_twin", fn=fn, passes=("fwd_bwd",))])
    assert sorted((r["impl"], r["pass"]) for r in runner.rows) == [
        ("sola_ops", "fwd"), ("sola_ops", "fwd_bwd"), ("sola_ops_twin", "fwd_bwd")]


def test_kernels_strict_counts_our_variants():
    """--strict fails on a variant of ours that raised on a case (gpu_check runs sola_ops_wgmma / _unstaged /
    _presplit, kernels no GPU has run yet: their errors passed as ok), not on one that does not apply here."""
    case = dict(op="softmax_attention", dtype="bfloat16", B=1, H=2, Nq=64, Nk=64, D=16, case="vision")
    skipped = [
        {"impl": "sola_ops_wgmma", "pass": None, "op": "softmax_attention", "reason": "wgmma kernels: H100 / H200 only"},
        {"impl": "sola_ops_unstaged", "pass": "fwd", **case, "reason": "out of memory"},
        {"impl": "naive", "pass": "fwd", **case, "reason": "RuntimeError: boom"},
    ]
    assert kernels.sola_ops_failures(skipped) == []
    bad = {"impl": "sola_ops_wgmma", "pass": "fwd_bwd", **case, "reason": "RuntimeError: CUDA error: invalid argument"}
    assert kernels.sola_ops_failures(skipped + [bad]) == [bad]
    missing = {"impl": "sola_ops", "pass": None, "op": "linear_attention", "reason": "import sola_ops failed: x"}
    assert kernels.sola_ops_failures([missing]) == [missing]


def test_kernels_strict_checks_our_accuracy(tiny_json):
    """--strict fails on an output of ours far from the reference, or NaN (a fast but wrong kernel passed);
    the CPU kernels' own rows are within the limits, and a baseline's error is not ours to fail on."""
    _, data = tiny_json
    assert any(r.get("rel_err") is not None and common.is_ours(r["impl"]) for r in data["rows"])
    assert kernels.inaccurate_rows(data["rows"]) == []
    row = dict(op="linear_attention", dtype="bfloat16", B=1, H=2, Nq=64, Nk=64, D=32, rel_err_vs="reference")
    wrong = [{**row, "impl": "sola_ops", "rel_err": 0.9}, {**row, "impl": "sola_ops_unstaged", "rel_err": math.nan}]
    fine = [{**row, "impl": "sola_ops", "rel_err": 3e-3}, {**row, "impl": "einsum_fp32", "rel_err": 0.9}]
    assert kernels.inaccurate_rows(wrong + fine) == wrong


def test_model_breakdown_ops_keep_kernels_below_the_dispatch_mode(capsys):
    """--ops: an op that another op's kernel calls (CPU: aten::mkldnn_convolution under aten::convolution; CUDA:
    aten::cudnn_convolution, SDPA's aten::_flash_attention_forward) holds the time but is never seen by the dispatch
    mode that counts bytes: it stays in the table with no GB/s (it was dropped, so the convs and the torch model's
    attention were missing from the slowest ops)."""
    import model_breakdown as MB
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)

    def step():
        conv(x).transpose(1, 2).sum().backward()
    _, ops = MB.profile_step(step, torch.device("cpu"), 2)
    effs = MB.op_efficiency(step, ops)
    unseen = [name for name, (ms, _, gb) in effs.items() if gb is None and "conv" in name and ms > 0]
    assert unseen and all(name in ops for name in unseen)
    assert effs["aten::convolution"][2] > 0 and "aten::transpose" not in effs
    MB.print_op_table(effs, len(effs), 10.0)
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.endswith(unseen[0]))
    assert row.split()[2:5] == ["-", "-", "-"]


def test_dwconv_bench_survives_a_refused_case(monkeypatch, tmp_path):
    """An impl that raises on its first call (a shape our kernel refuses, out of memory) skips that case with its
    shape and reason; the others still run (that first call was outside the try: the whole step died)."""
    real = dwconv.impls

    def refusing(sola_ops, form):
        fns = dict(real(sola_ops, form))
        if form == "silu_mul":
            def refuse(x, module):
                raise ValueError("silu_mul: refused (test)")
            fns["sola_ops"] = refuse
        return fns
    monkeypatch.setattr(dwconv, "impls", refusing)
    data = dwconv.main(["--device", "cpu", "--tiny", "--reps", "1", "--out", str(tmp_path / "dw.json")])
    assert {r["case"] for r in data["rows"]} == {"dwconv_residual", "dwconv_silu", "dwconv_downsample", "layer_norm",
                                                 "bias_gelu"}
    assert len(data["skipped"]) == len(dwconv.TINY_SHAPES) * 2 * 2
    for s in data["skipped"]:
        assert s["case"] == "silu_mul" and "refused (test)" in s["reason"]
        assert (s["B"], *s["img_hw"], s["D"]) in dwconv.TINY_SHAPES


def test_models_append_only_to_this_runs_json(monkeypatch, tmp_path):
    """--append keeps the kernel rows of a JSON this device, torch and csrc/ wrote, and starts a new JSON over one from
    another run (the committed results of an earlier GPU run, when the kernel bench died before rewriting it): its
    old kernel rows and header were passed off as this run's."""
    monkeypatch.setattr(models, "load_models", lambda: (None, "sola_vision not importable (test)"))
    kernel_row = common.make_row(op="linear_attention", impl="sola_ops", dtype="float32", B=1, H=1, Nq=8, Nk=8, D=8,
                                 ms=1.0, **{"pass": "fwd"})
    device = torch.device("cpu")
    for sha, kept in ((common.csrc_sha256(), True), ("3b314cac" * 8, False)):
        out = tmp_path / f"{kept}.json"
        old = common.header(device, {"copy_GBps": 1.0}, {"mode": "quick"})
        old.update(csrc_sha256=sha, rows=[kernel_row])
        common.write_json(str(out), old)
        data = models.main(["--device", "cpu", "--out", str(out), "--append", "--no-table"])
        assert data["csrc_sha256"] == common.csrc_sha256()
        assert (data["rows"] == [kernel_row]) is kept and data["rows"] in ([kernel_row], [])
        assert {s["op"] for s in data["skipped"]} == {"model_fwd", "model_train"}


def test_kernels_json_is_this_runs_from_the_start(monkeypatch, tmp_path):
    """--out is rewritten before the first case: a run that dies there left an earlier run's JSON (the committed
    bench/results/<gpu>.json) in place, which gpu_check then plotted, tabled and copied out as this run's."""
    out = tmp_path / "k.json"
    common.write_json(str(out), {"device": "NVIDIA H200", "rows": [{"op": "linear_attention"}]})

    def die(self, case, impls):
        raise RuntimeError("killed in the first case (test)")
    monkeypatch.setattr(kernels.Runner, "run_case", die)
    with pytest.raises(RuntimeError, match="first case"):
        kernels.main(["--tiny", "--device", "cpu", "--ops", "linear", "--impls", "reference", "--out", str(out)])
    with open(out) as f:
        data = json.load(f)
    assert data["device"] == common.device_name(torch.device("cpu")) and data["rows"] == []
    assert data["meta"]["cases_done"] == 0


def test_speedup_over_a_budget_cut_group_is_marked():
    """The time budget running out mid-case leaves sola_ops (run first) against the baselines timed before it; its
    ratio is then an upper bound: baselines_partial marks the group and perf_table prints '≤' (it printed the ratio
    over the slower baselines as the speed-up)."""
    case = kernels.Case("linear_attention", "vision", "bfloat16", 8, 2, 64, 64, 16)
    other = kernels.Case("linear_attention", "vision", "bfloat16", 8, 4, 64, 64, 16)
    runner = _runner(budget_s=1.0)

    def row(c, impl, pass_, ms):
        return common.make_row(**c.fields(), impl=impl, **{"pass": pass_}, ms=ms, case=c.set)
    runner.rows = [row(case, "sola_ops", "fwd", 1.0), row(case, "reference", "fwd", 3.0),
                   row(case, "sola_ops", "fwd_bwd", 2.0), row(case, "reference", "fwd_bwd", 5.0),
                   row(case, "einsum_fp32", "fwd_bwd", 4.0), row(other, "sola_ops", "fwd", 1.0),
                   row(other, "reference", "fwd", 2.0)]
    runner.skip("time budget (--budget-s 1) used up", case, "einsum_fp32", "fwd")
    runner.skip("time budget (--budget-s 1) used up", other, "fla", "fwd")  # not the same function: no baseline
    runner.skip("out of memory", other, "einsum_fp32", "fwd")  # cannot run there: the ratio is over those that can
    rows = kernels.mark_partial(common.add_derived(runner.rows, {}), runner.skipped, {"fla"})
    assert [r.get("baselines_partial", False) for r in rows] == [True, True, False, False, False, False, False]
    md = perf_table.render({"rows": rows, "skipped": runner.skipped})
    lines = [ln for ln in md.splitlines() if ln.startswith("| linear")]
    assert "| ≤3.00× |" in lines[0] and "| 2.00× |" in lines[1] and "| 2.00× |" in lines[2]
    assert "| ≤3.00× |" in perf_table.render({"rows": rows}, all_impls=True)


def test_kernels_records_a_fatal_cuda_error(monkeypatch):
    """After a kernel fault every CUDA call fails, torch.cuda.empty_cache included: freeing memory after the failed
    call raised out of measure() and ended the run with a traceback that named no impl or case (the skip and the
    FATAL line were lost). Now the fault is recorded, the run goes on to skip the rest."""
    fault = "CUDA error: an illegal memory access was encountered"

    def empty_cache():
        raise RuntimeError(fault)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)

    def faulty(q, k, v):
        raise RuntimeError(fault)
    case = kernels.Case("softmax_attention", "vision", "bfloat16", 1, 2, 64, 64, 16)
    runner = kernels.Runner(torch.device("cuda"), _runner().args, None)
    runner.measure(case, kernels.Impl("sola_ops", fn=faulty), "fwd", lambda: faulty(None, None, None), None, None)
    assert runner.skipped[0]["impl"] == "sola_ops" and fault in runner.skipped[0]["reason"]
    assert runner.fatal and fault in runner.fatal
    runner.run_case(case, [kernels.Impl("naive", fn=faulty)])  # no CUDA call: skipped for the broken context
    assert [s["reason"].startswith("not run: an earlier CUDA error") for s in runner.skipped[1:]] == [True, True]
