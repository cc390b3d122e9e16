"""Renders the README's "Performance" section from results JSONs (bench/results/*.json by default).

    python scripts/perf_table.py                         # every bench/results/*.json, markdown
    python scripts/perf_table.py bench/results/nvidia-h100-80gb-hbm3.json --all-impls
    python scripts/perf_table.py --out /tmp/perf.md

One section per JSON (per GPU): device, date, torch, csrc_sha256 (marked stale when csrc/ has
changed since the run) and the measured peaks, then one table row per (op, pass, dtype, shape):
sola_ops' time and throughput against the fastest baseline on the same inputs, and the model rows
(img/s with attn_impl "sola" vs "torch"), and where variants of ours ran (sola_ops_wgmma, _1group, _twin,
_tf32, _unstaged, _presplit) their times over sola_ops': the numbers that pick each default. --all-impls lists
every impl instead.
"""
import argparse
import glob
import json
import math
import os
import sys
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import common as C  # noqa: E402

OP_SHORT = {"linear_attention": "linear", "softmax_attention": "softmax"}


def _f(x, spec):
    return "–" if x is None else format(x, spec)


def _shape(r):
    n = f"{r['Nq']}" if r["Nq"] == r["Nk"] else f"{r['Nq']}/{r['Nk']}"
    return f"{r['B']}×{r['H']}×{n}×{r['D']}"


def _tput(r):
    if r.get("GBps") is not None:
        return f"{r['GBps']:.0f} GB/s" if r["GBps"] >= 10 else f"{r['GBps']:.2f} GB/s"
    if r.get("TFLOPs") is not None:
        return f"{r['TFLOPs']:.1f} TFLOP/s" if r["TFLOPs"] >= 1 else f"{r['TFLOPs']:.3f} TFLOP/s"
    return "–"


def _speedup(r):
    """'2.31×'; '≤2.31×' when a baseline was not timed (bench/kernels.py's baselines_partial: the ratio is over
    the baselines that were, an upper bound); '–' without a ratio."""
    ratio = r and r.get("ratio_to_best_baseline")
    if not ratio:
        return "–"
    return f"{'≤' if r.get('baselines_partial') else ''}{ratio:.2f}×"


def _groups(rows):
    out = OrderedDict()
    for r in rows:
        out.setdefault(C.group_key(r), []).append(r)
    return out


def _variant_table(kern):
    """Lines of a table of our variants (sola_ops_wgmma, sola_ops_1group, ...: the same op on other kernels,
    timed in the same run) against sola_ops: each variant's time over sola_ops' per case (below 1: the
    variant is faster), then per variant, op and pass the geometric mean and the cases it wins (dtypes
    pooled; a case where the variant runs the default's kernel counts as a ratio near 1). Empty without any."""
    names = sorted({r["impl"] for r in kern if C.is_ours(r["impl"]) and r["impl"] != "sola_ops"},
                   key=lambda n: (C.KERNEL_IMPLS.index(n) if n in C.KERNEL_IMPLS else len(C.KERNEL_IMPLS), n))
    rows, ratios = [], {}
    for _key, grp in _groups(kern).items():
        ours = next((r for r in grp if r["impl"] == "sola_ops" and r.get("ms")), None)
        times = {r["impl"]: r["ms"] for r in grp if r["impl"] in names and r.get("ms")}
        if ours is None or not times:
            continue
        cells = []
        for name in names:
            ratio = times[name] / ours["ms"] if name in times else None
            if ratio is not None:
                ratios.setdefault((name, ours["op"], ours["pass"]), []).append(ratio)
            cells.append(_f(ratio, ".2f"))
        rows.append(f"| {OP_SHORT[ours['op']]} | {ours['pass']} | {C.DTYPE_SHORT.get(ours['dtype'], ours['dtype'])} "
                    f"| {_shape(ours)} | {ours['ms']:.3f} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    lines = ["Variants of ours, time over sola_ops' in the same run (below 1: the variant is faster):",
             "",
             "| op | pass | dtype | B×H×N×D | sola_ops ms | " + " | ".join(names) + " |",
             "|---|---|---|---|---:|" + "---:|" * len(names)] + rows + [""]
    for (name, op, pass_), values in ratios.items():
        geomean = math.exp(sum(math.log(v) for v in values) / len(values))
        wins = sum(v < 1 for v in values)
        lines.append(f"- {name}, {OP_SHORT[op]} {pass_}: geometric mean {geomean:.2f}, "
                     f"faster in {wins} of {len(values)} cases")
    return lines + [""]


def render(data, current_sha=None, all_impls=False, path=None):
    lines = []
    peak = data.get("peak") or {}
    sha = data.get("csrc_sha256") or "?"
    stale = ""
    if current_sha and sha != current_sha:
        stale = " — **stale**: csrc/ has changed since this run"
    lines.append(f"### {data.get('device', '?')}")
    lines.append("")
    src = f" (`{os.path.relpath(path, ROOT)}`)" if path and path.startswith(ROOT + os.sep) else ""
    lines.append(f"{(data.get('date') or '?')[:10]}, torch {data.get('torch', '?')}, csrc_sha256 `{sha[:16]}`{stale}{src}. "
                 f"Measured peaks: copy {_f(peak.get('copy_GBps'), '.0f')} GB/s, "
                 f"{peak.get('matmul_dtype', 'bfloat16')} matmul {_f(peak.get('bf16_matmul_TFLOPs'), '.4g')} TFLOP/s.")
    lines.append("")
    kern = [r for r in data.get("rows", []) if r.get("op") in ("linear_attention", "softmax_attention")]
    models = [r for r in data.get("rows", []) if r.get("op") in ("model_fwd", "model_train")]
    if kern and all_impls:
        lines.append("| op | pass | dtype | B×H×N×D | impl | ms | throughput | % peak | vs best baseline | peak MB |")
        lines.append("|---|---|---|---|---|---:|---:|---:|---:|---:|")
        for r in kern:
            lines.append(f"| {OP_SHORT[r['op']]} | {r['pass']} | {C.DTYPE_SHORT.get(r['dtype'], r['dtype'])} | {_shape(r)} "
                         f"| {r['impl']} | {_f(r['ms'], '.3f')} | {_tput(r)} | {_f(r.get('pct_peak'), '.1f')} "
                         f"| {_speedup(r)} | {_f(r.get('peak_mem_MB'), '.0f')} |")
        lines.append("")
    elif kern:
        lines.append("| op | pass | dtype | B×H×N×D | sola_ops ms | sola_ops throughput | % peak "
                     "| best baseline | baseline ms | speed-up | peak MB (sola_ops / baseline) |")
        lines.append("|---|---|---|---|---:|---:|---:|---|---:|---:|---:|")
        for _key, grp in _groups(kern).items():
            r0 = grp[0]
            ours = next((r for r in grp if r["impl"] == "sola_ops"), None)
            base = [r for r in grp if not C.is_ours(r["impl"]) and r.get("same_function") is not False]
            best = min(base, key=lambda r: r["ms"]) if base else None
            lines.append(
                f"| {OP_SHORT[r0['op']]} | {r0['pass']} | {C.DTYPE_SHORT.get(r0['dtype'], r0['dtype'])} | {_shape(r0)} "
                f"| {_f(ours and ours['ms'], '.3f')} | {_tput(ours) if ours else '–'} | {_f(ours and ours.get('pct_peak'), '.1f')} "
                f"| {best['impl'] if best else '–'} | {_f(best and best['ms'], '.3f')} "
                f"| {_speedup(ours)} "
                f"| {_f(ours and ours.get('peak_mem_MB'), '.0f')} / {_f(best and best.get('peak_mem_MB'), '.0f')} |")
        lines.append("")
        lines += _variant_table(kern)
    if models:
        lines.append("| model | input | batch | step | dtype | CUDA graph | sola img/s | torch img/s | speed-up "
                     "| peak MB (sola / torch) |")
        lines.append("|---|---|---:|---|---|---|---:|---:|---:|---:|")
        for _key, grp in _groups(models).items():
            r0 = grp[0]
            sola = next((r for r in grp if r.get("attn_impl") == "sola"), None)
            torch_ = next((r for r in grp if r.get("attn_impl") == "torch"), None)
            speed = (torch_["ms"] / sola["ms"]) if (sola and torch_) else None
            inp = f"{'features ' if r0.get('features_only') else ''}{r0.get('img_size')} px"
            step = "forward" if r0["op"] == "model_fwd" else "train step"
            graph = "yes" if r0.get("cuda_graph") else "no"
            lines.append(f"| {r0.get('model')} | {inp} | {r0['B']} | {step} | {C.DTYPE_SHORT.get(r0['dtype'], r0['dtype'])} "
                         f"| {graph} | {_f(sola and sola.get('img_per_s'), '.1f')} | {_f(torch_ and torch_.get('img_per_s'), '.1f')} "
                         f"| {_f(speed, '.2f')}{'×' if speed else ''} "
                         f"| {_f(sola and sola.get('peak_mem_MB'), '.0f')} / {_f(torch_ and torch_.get('peak_mem_MB'), '.0f')} |")
        lines.append("")
    not_run = OrderedDict()
    for s in data.get("skipped", []):
        if s.get("B") is None and s.get("impl") != "sola_ops":
            not_run.setdefault(f"{s.get('impl') or s.get('op')}", s.get("reason"))
    if not_run:
        lines.append("Not run: " + "; ".join(f"{k} ({v})" for k, v in not_run.items()) + ".")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Markdown performance tables from bench results JSONs.")
    p.add_argument("json", nargs="*", help="default: bench/results/*.json")
    p.add_argument("--all-impls", action="store_true", help="one row per impl instead of sola_ops vs the best baseline")
    p.add_argument("--out", help="write the markdown here instead of stdout")
    args = p.parse_args(argv)
    # bench/dwconv.py's <gpu>_dwconv.json rows are no kernel or model rows: this table has no place for them
    paths = args.json or sorted(p for p in glob.glob(os.path.join(ROOT, "bench", "results", "*.json"))
                                if not p.endswith("_dwconv.json"))
    if not paths:
        print("no results JSON found (bench/results/*.json)", file=sys.stderr)
        return 1
    current = C.csrc_sha256(ROOT)
    parts = ["## Performance", "",
             "Measured by `scripts/gpu_check.sh` (`bench/kernels.py`, `bench/models.py`); median of >= 20 runs "
             "timed with CUDA events. Linear attention: GB/s of the ideal traffic (read q, k, v and write out "
             "once; fwd+bwd adds reading q, k, v, dout and writing dq, dk, dv). Softmax attention: TFLOP/s with "
             "4·B·H·N²·D for fwd and 3.5× that for fwd+bwd. % peak is against the copy bandwidth / bf16 matmul rate "
             "measured in the same run; speed-up = best baseline's time / sola_ops' time (≤: a baseline ran out of "
             "the time budget, so over those that ran).", ""]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        parts.append(render(data, current, args.all_impls, os.path.abspath(path)))
    text = "\n".join(parts).rstrip() + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
