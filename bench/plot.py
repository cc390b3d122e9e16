"""PNG plots of a results JSON from bench/kernels.py / bench/models.py, written next to the JSON.

    python bench/plot.py bench/results/nvidia-h100-80gb-hbm3.json [more.json ...]

For each JSON <dir>/<stem>.json it writes, where the rows exist:
  <stem>_linear_sweep.png    linear attention vs N (the "sweep" set): ms and GB/s per impl
  <stem>_softmax_long.png    softmax attention vs N (the "long" set): ms and TFLOP/s per impl
  <stem>_linear_vision.png   bars: ms per impl on the vision and high-res shapes
  <stem>_softmax_vision.png  the same for softmax attention
  <stem>_models.png          img/s of SoLA-Vision with attn_impl "sola" vs "torch"
One row of panels per (pass, dtype, B, H, D) group; at most five files per JSON.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OP_SHORT = {"linear_attention": "linear", "softmax_attention": "softmax"}
SWEEP_SETS = ("sweep", "long")
BAR_SETS = ("vision", "highres")
DT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
# one colour and marker per impl, the same in every plot
IMPL_STYLE = {
    "sola_ops": ("tab:red", "o"), "sola_ops_wgmma": ("tab:pink", "*"), "sola_ops_unstaged": ("tab:brown", "x"),
    "sola_ops_presplit": ("black", "+"), "sola_ops_1group": ("darkred", "1"), "sola_ops_twin": ("teal", "3"),
    "sola_ops_tf32": ("gold", "2"),
    "reference": ("tab:blue", "s"), "einsum_fp32": ("tab:cyan", "^"),
    "flash_bla": ("tab:green", "D"), "fla": ("tab:olive", "v"), "sdpa_flash": ("tab:green", "D"),
    "sdpa_cudnn": ("tab:purple", "P"), "sdpa_efficient": ("tab:orange", "X"), "sdpa_math": ("tab:blue", "s"),
    "naive": ("tab:gray", "^"), "torch": ("tab:blue", "s"),
}


def style(impl):
    return IMPL_STYLE.get(impl, ("black", "."))


def impl_order(impls):
    known = list(IMPL_STYLE)
    return sorted(impls, key=lambda i: (known.index(i) if i in known else len(known), i))


def title_of(data):
    sha = (data.get("csrc_sha256") or "?")[:12]
    return f"{data.get('device', '?')} | torch {data.get('torch', '?')} | {data.get('date', '?')} | csrc {sha}"


def _sweep_plot(data, op, set_, rows, path):
    groups = defaultdict(list)
    for r in rows:
        groups[(r["pass"], r["dtype"], r["B"], r["H"], r["D"])].append(r)
    keys = sorted(groups, key=lambda k: (k[0] != "fwd", k[1], k[2], k[3], k[4]))
    metric, unit = ("GBps", "GB/s") if op == "linear_attention" else ("TFLOPs", "TFLOP/s")
    peak = (data.get("peak") or {}).get("copy_GBps" if metric == "GBps" else "bf16_matmul_TFLOPs")
    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 3.6 * len(keys)), squeeze=False, constrained_layout=True)
    for ax_row, key in zip(axes, keys):
        pass_, dtype, B, H, D = key
        by_impl = defaultdict(list)
        for r in groups[key]:
            by_impl[r["impl"]].append(r)
        for impl in impl_order(by_impl):
            pts = sorted(by_impl[impl], key=lambda r: r["Nk"])
            xs = [r["Nk"] for r in pts]
            c, m = style(impl)
            ls = "--" if any(r.get("same_function") is False for r in pts) else "-"
            ax_row[0].plot(xs, [r["ms"] for r in pts], marker=m, color=c, ls=ls, label=impl)
            ax_row[1].plot(xs, [r[metric] for r in pts], marker=m, color=c, ls=ls, label=impl)
        label = f"{OP_SHORT[op]} {pass_} {DT.get(dtype, dtype)} B={B} H={H} D={D}"
        ax_row[0].set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="ms (median)", title=label)
        ax_row[1].set(xscale="log", xlabel="N (tokens)", ylabel=unit, title=f"{label}: {unit}")
        if peak:
            ax_row[1].axhline(peak, color="black", lw=0.8, ls=":")
            ax_row[1].annotate(f"measured peak {peak:.4g}", (0.01, 0.97), xycoords="axes fraction", va="top", fontsize=8)
        for ax in ax_row:
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xticks(sorted({r["Nk"] for r in groups[key]}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(_n_label))
            ax.minorticks_off() if ax is ax_row[1] else None
        ax_row[0].legend(fontsize=8)
    fig.suptitle(f"{OP_SHORT[op]} attention, {set_} set\n{title_of(data)}", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _n_label(x, _pos):
    x = int(round(x))
    return f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)


def _bar_plot(data, op, rows, path):
    groups = defaultdict(list)
    for r in rows:
        groups[(r["pass"], r["dtype"])].append(r)
    keys = sorted(groups, key=lambda k: (k[1], k[0] != "fwd"))
    fig, axes = plt.subplots(len(keys), 1, figsize=(13, 3.8 * len(keys)), squeeze=False, constrained_layout=True)
    for (ax,), key in zip(axes, keys):
        pass_, dtype = key
        shapes = []
        for r in groups[key]:
            s = (r["B"], r["H"], r["Nq"], r["Nk"], r["D"])
            if s not in shapes:
                shapes.append(s)
        impls = impl_order({r["impl"] for r in groups[key]})
        width = 0.8 / max(1, len(impls))
        cell = {(r["impl"], (r["B"], r["H"], r["Nq"], r["Nk"], r["D"])): r for r in groups[key]}
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, s in enumerate(shapes):
                r = cell.get((impl, s))
                if r is not None:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r["ms"])
            c, _ = style(impl)
            bars = ax.bar(xs, ys, width, color=c, label=impl)
            if impl == "sola_ops":
                for b, s in zip(bars, [s for s in shapes if (impl, s) in cell]):
                    ratio = cell[(impl, s)].get("ratio_to_best_baseline")
                    if ratio is not None:
                        ax.annotate(f"{ratio:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"B{B} H{H}\nN{Nq}" + ("" if Nq == Nk else f"/{Nk}") + f" D{D}"
                            for B, H, Nq, Nk, D in shapes], fontsize=8)
        ax.set(yscale="log", ylabel="ms (median)",
               title=f"{OP_SHORT[op]} {pass_} {DT.get(dtype, dtype)}  (label on sola_ops: speed-up over the best baseline)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=min(6, len(impls)))
    fig.suptitle(f"{OP_SHORT[op]} attention, vision and high-res shapes\n{title_of(data)}", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _model_config(r):
    """A model row's bar group: (model, img_size, batch, features_only, cuda_graph)."""
    return r.get("model"), r.get("img_size"), r["B"], bool(r.get("features_only")), bool(r.get("cuda_graph"))


def _model_plot(data, rows, path):
    ops = [o for o in ("model_fwd", "model_train") if any(r["op"] == o for r in rows)]
    fig, axes = plt.subplots(1, len(ops), figsize=(6.5 * len(ops), 4.2), squeeze=False, constrained_layout=True)
    for ax, op in zip(axes[0], ops):
        sel = [r for r in rows if r["op"] == op]
        configs = list(dict.fromkeys(_model_config(r) for r in sel))
        impls = sorted({r.get("attn_impl") for r in sel})
        width = 0.8 / max(1, len(impls))
        for j, ai in enumerate(impls):
            xs, ys = [], []
            for i, cfg in enumerate(configs):
                for r in sel:
                    if r.get("attn_impl") == ai and _model_config(r) == cfg:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r["img_per_s"])
            c = "tab:red" if ai == "sola" else "tab:blue"
            ax.bar(xs, ys, width, color=c, label=f"attn_impl={ai}")
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([f"{m}\n{'features ' if fo else ''}{s}px b{b}{' graph' if g else ''}"
                            for m, s, b, fo, g in configs], fontsize=8)
        ax.set(ylabel="img/s", title=op)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SoLA-Vision throughput\n{title_of(data)}", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot(json_path, out_dir=None):
    """Writes the PNGs of one results JSON; returns their paths."""
    with open(json_path) as f:
        data = json.load(f)
    rows = [r for r in data.get("rows", []) if r.get("ms") is not None]
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    stem = os.path.splitext(os.path.basename(json_path))[0]
    written = []
    for op in ("linear_attention", "softmax_attention"):
        for set_ in SWEEP_SETS:
            sel = [r for r in rows if r["op"] == op and r.get("case") == set_]
            if sel:
                path = os.path.join(out_dir, f"{stem}_{OP_SHORT[op]}_{set_}.png")
                _sweep_plot(data, op, set_, sel, path)
                written.append(path)
        sel = [r for r in rows if r["op"] == op and r.get("case") in BAR_SETS]
        if sel:
            path = os.path.join(out_dir, f"{stem}_{OP_SHORT[op]}_vision.png")
            _bar_plot(data, op, sel, path)
            written.append(path)
    sel = [r for r in rows if r["op"] in ("model_fwd", "model_train") and r.get("img_per_s") is not None]
    if sel:
        path = os.path.join(out_dir, f"{stem}_models.png")
        _model_plot(data, sel, path)
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description="PNG plots of bench results JSON files (written next to each JSON).")
    p.add_argument("json", nargs="+")
    p.add_argument("--out-dir", help="write the PNGs here instead of next to the JSON")
    args = p.parse_args(argv)
    total = 0
    for path in args.json:
        written = plot(path, args.out_dir)
        for w in written:
            print(w)
        if not written:
            print(f"{path}: no rows to plot", file=sys.stderr)
        total += len(written)
    return 0 if total else 1


if __name__ == "__main__":
    sys.exit(main())
