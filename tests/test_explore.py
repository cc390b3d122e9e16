"""Placement explorer (sola_vision.explore, sola_vision.placement): enumeration counts, FLOP accounting,
CSV / PNG output, argument errors. CPU only, sola_vision_nano at 64-128 px."""
import csv
import math

import pytest
import torch

timm = pytest.importorskip("timm")
from sola_vision import explore, explore_flops, explore_report, parse_layer_pattern  # noqa: E402
from sola_vision import placement as P  # noqa: E402

NANO = "sola_vision_nano"  # depths 1/2/4/2, dims 32/64/128/256, heads 1/2/4/8 (head dim 32)
NANO_LINEAR = "L-LL-LLLL-LL"
NANO_DEFAULT = "L-LL-LLLS-LL"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- enumeration ------------------------------------------------------------------------------

@pytest.mark.parametrize("depths, stages, ks", [
    ((2, 4, 8, 4), (3, 4), (1,)),
    ((2, 4, 8, 4), (3, 4), (2,)),
    ((2, 4, 8, 4), (4, 3), (2, 1)),
    ((2, 4, 8, 4), (1, 2, 3, 4), (0, 3)),
    ((1, 2, 4, 2), (4,), (2,)),
    ((3, 6, 21, 6), (3,), (2,)),
])
def test_enumeration_counts(depths, stages, ks):
    patterns = P.enumerate_placements(depths, ks, stages)
    n = sum(depths[s - 1] for s in set(stages))
    assert len(patterns) == sum(math.comb(n, k) for k in ks) == P.count_placements(depths, ks, stages)
    assert len(set(patterns)) == len(patterns)
    allowed = {s - 1 for s in stages}
    for pattern in patterns:
        assert "-".join(parse_layer_pattern(pattern, depths)) == pattern
        assert pattern.count("S") in ks
        assert {i for i, _ in P.softmax_blocks(pattern)} <= allowed


def test_candidates_add_the_reference_rows_once():
    depths = P.model_depths(NANO)
    rows = explore.candidates(NANO, depths, P.enumerate_placements(depths, (1,), (3,)))
    assert [r.pattern for r in rows[:2]] == [NANO_LINEAR, NANO_DEFAULT]
    assert [r.role for r in rows[:2]] == ["linear", "default"]
    assert len(rows) == 2 + 4 - 1  # the default is one of the four stage-3 placements
    assert len({r.pattern for r in rows}) == len(rows)
    only = explore.candidates("sola_vision_nano_linear", depths, [])
    assert [(r.pattern, r.role) for r in only] == [(NANO_LINEAR, "default,linear")]


def test_describe_and_budget_order():
    assert P.describe("LL-LLLL-LLLSLLLS-LLLS") == "3.4 3.8 4.4"
    assert P.describe("ll-llll-llllllll-llll".upper()) == "-"
    patterns = ["LL-LLLL-SLLLLLLL-LLLL", "LL-LLLL-LLLLLLLL-LLLS", "LL-LLLL-LLLLLLLL-LLLL",
                "LL-LLLL-SLLLLLLL-LLLS", "LL-LLLL-LLLLLLLS-LLLL", "LL-LLLL-LLLLLLLS-LLLS"]
    assert sorted(patterns, key=P.placement_key) == [
        "LL-LLLL-LLLLLLLS-LLLS", "LL-LLLL-SLLLLLLL-LLLS",  # two softmax layers, deepest first
        "LL-LLLL-LLLLLLLL-LLLS", "LL-LLLL-LLLLLLLS-LLLL", "LL-LLLL-SLLLLLLL-LLLL",
        "LL-LLLL-LLLLLLLL-LLLL"]


# ---- FLOPs ------------------------------------------------------------------------------------

def test_flops_one_softmax_layer_vs_all_linear():
    """FlopCounterMode on the real models: one linear block of stage 3 swapped for softmax attention changes
    the count by exactly softmax - linear attention for that block's shape (written out by hand here)."""
    img = 128
    counted = {}
    for pattern in (NANO_LINEAR, "L-LL-LSLL-LL"):
        model = explore_flops.build_model(NANO, pattern, explore_flops.FLOP_IMPL, torch.device("cpu")).to("meta")
        counted[pattern] = explore_flops.count_flops(model, img)[0]
    B, H, N, D = 1, 4, (img // 16) ** 2, 32  # nano stage 3: stride 16, 4 heads of 32
    softmax = 2 * B * H * N * N * D * 2  # q k^T and P v
    linear = 2 * B * H * N * D * D * 2 + 2 * B * H * N * D  # state, numerator, normaliser
    assert counted["L-LL-LSLL-LL"] - counted[NANO_LINEAR] == softmax - linear
    assert softmax != linear


def test_counted_and_analytic_flops_agree(tmp_path, capsys):
    patterns = ["L-LL-SLLL-SS", "S-SL-LLLL-LL"]
    common = ["--model", NANO, "--img-size", "64", "--img-sizes", "64,128", "--no-latency", "--no-plot",
              "--out", str(tmp_path), "--patterns", *patterns]
    counted = explore.main(common + ["--flops", "count"])
    analytic = explore.main(common + ["--flops", "analytic"])
    capsys.readouterr()
    assert [r.pattern for r in counted] == [NANO_LINEAR, NANO_DEFAULT, *patterns]
    for c, a in zip(counted, analytic):
        assert c.flops == a.flops and c.softmax_flops == a.softmax_flops, c.pattern
        assert c.params == a.params
    linear = counted[0]
    assert linear.softmax_flops == {64: 0, 128: 0} and linear.share(128) == 0.0
    # the quadratic share grows with the image size
    assert all(r.share(128) > r.share(64) > 0 for r in counted[1:])


# ---- the command ------------------------------------------------------------------------------

def test_command_writes_table_csv_and_png(tmp_path, capsys):
    results = explore.main(["--model", NANO, "--img-size", "64", "--img-sizes", "64,96", "--k", "1", "--stages", "4",
                            "--reps", "1", "--threads", "1", "--out", str(tmp_path), "--budget-gflops", "1000",
                            "--budget-ms", "1e9"])
    out = capsys.readouterr().out
    assert [r.pattern for r in results] == [NANO_LINEAR, NANO_DEFAULT, "L-LL-LLLL-SL", "L-LL-LLLL-LS"]
    assert "default" in out and "GFLOPs@96" in out and "sm%@64" in out
    assert "within budget" in out and "4 of 4" in out

    csv_path = tmp_path / "placements_sola_vision_nano_cpu.csv"
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == explore_report.CSV_FIELDS
        rows = list(reader)
    assert len(rows) == 4 * 2
    by_key = {(r["pattern"], int(r["img_size"])): r for r in rows}
    default = by_key[(NANO_DEFAULT, 64)]
    assert default["role"] == "default" and default["softmax_at"] == "3.4" and default["n_softmax"] == "1"
    assert float(default["fwd_ms"]) > 0 and float(default["train_ms"]) > 0 and default["batch"] == "1"
    assert by_key[(NANO_DEFAULT, 96)]["fwd_ms"] == ""  # latency at --img-size only on CPU
    assert float(by_key[(NANO_LINEAR, 64)]["softmax_share_pct"]) == 0.0
    assert float(default["softmax_share_pct"]) > 0
    assert int(by_key[(NANO_DEFAULT, 96)]["flops_fwd"]) > int(default["flops_fwd"])
    assert sum(r["pareto"] == "1" for r in rows) >= 1
    with open(tmp_path / "placements_sola_vision_nano_cpu.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_budget_filters_and_orders(tmp_path, capsys):
    args = ["--model", NANO, "--img-size", "128", "--img-sizes", "128", "--no-latency", "--no-plot", "--flops",
            "analytic", "--out", str(tmp_path), "--patterns", "L-LL-SLLL-LL", "L-LL-LLLL-SS", "L-LL-SSLL-LL"]
    results = explore.main(args)
    capsys.readouterr()
    linear = next(r for r in results if r.role == "linear")
    # Nothing dearer than all linear. At 128 px stage 4 has 4x4 tokens, fewer than the head dim (32), where
    # softmax attention (4 N^2 D per head) is cheaper than linear attention (4 N D^2 + 2 N D); stage 3 has 8x8.
    budget = linear.gflops(128)
    explore.main(args + ["--budget-gflops", repr(budget)])
    listed = capsys.readouterr().out.split("within budget", 1)[1].splitlines()[1:]
    listed = [line for line in listed if line.startswith("  ")]
    assert not any(" ms" in line for line in listed)  # --no-latency: no "fwd - ms" column
    listed = [line.split()[0] for line in listed]
    expected = sorted((r.pattern for r in results if r.gflops(128) <= budget), key=P.placement_key)
    assert listed == expected and "L-LL-LLLL-SS" in listed and "L-LL-SSLL-LL" not in listed


@pytest.mark.parametrize("argv, flag, message", [
    (["--model", "sola_vision_huge"], "--model", "unknown model 'sola_vision_huge'"),
    (["--patterns", "LL-LLLL-LLLXLLLS-LLLS"], "--patterns", "unknown letter"),
    (["--patterns", "LL-LLLL-LLLS-LLLS"], "--patterns", "has 4 letter(s)"),
    (["--patterns", "LL-LLLL-LLLLLLLL"], "--patterns", "3 stage(s)"),
    (["--k", "13", "--stages", "3,4"], "--k", "between 0 and 12"),
    (["--k", "one"], "--k", "comma-separated integers"),
    (["--stages", "0,5"], "--stages", "stages 1-4"),
    (["--patterns", "LL-LLLL-LLLLLLLL-LLLL", "--k", "1"], "--patterns", "not both"),
    (["--k", "3", "--stages", "1,2,3,4"], "--max-patterns", "816 patterns"),
    (["--img-size", "16"], "--img-size", "at least 32"),
    (["--budget-ms", "5", "--no-latency"], "--budget-ms", "--no-latency"),
    (["--budget-gflops", "nan"], "--budget-gflops", "must be positive, got nan"),
    (["--max-patterns", "-5"], "--max-patterns", "at least 1, got -5"),
])
def test_bad_arguments_are_rejected(argv, flag, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        explore.main(argv + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # rejected before anything ran


def test_bad_out_is_rejected_before_measuring(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        explore.main(["--model", "sola_vision_nano", "--quick", "--out", str(tmp_path / "afile")])
    assert exc.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err


def test_pareto_front_uses_one_unit():
    """A pattern the run could not time (out of memory) stays off the front; it used to be ranked by its
    GFLOPs against the others' milliseconds and push the cheapest timed pattern off."""
    rows = [explore_report.Result("L-LL-LLLL-LL", "linear"), explore_report.Result("L-LL-LLLS-LL", "default"),
            explore_report.Result("L-LL-SSSS-LL", "")]
    for r, share, ms in zip(rows, (0.0, 0.1, 0.4), (14.0, 15.0, None)):
        r.flops[64], r.softmax_flops[64] = 1e8, share * 1e8
        if ms is not None:
            r.fwd_ms[64] = ms
    explore_report.mark_pareto(rows, 64)
    assert [r.pareto for r in rows] == [True, True, False]


def test_placement_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"k=5: stage\(s\) 4 have 4 block\(s\)"):
        P.enumerate_placements((2, 4, 8, 4), (5,), (4,))
    with pytest.raises(ValueError, match=r"stages \[5\]"):
        P.count_placements((2, 4, 8, 4), (1,), (5,))
    with pytest.raises(ValueError, match="unknown model"):
        P.model_depths("resnet50")
