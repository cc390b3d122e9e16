"""Output of the placement explorer (sola_vision.explore): the per-pattern Result, the Pareto front, the
plain-text table, the CSV, the PNG plot and the formatting helpers."""
import argparse
import csv
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import placement as P

ROLE_LINEAR, ROLE_DEFAULT = "linear", "default"


@dataclass
class Result:
    """One candidate pattern; per-size dicts are keyed by image size."""
    pattern: str
    role: str = ""  # "linear", "default", "default,linear" or "" (an enumerated / given placement)
    params: Optional[int] = None
    flops: Dict[int, int] = field(default_factory=dict)  # forward FLOPs of one image
    softmax_flops: Dict[int, int] = field(default_factory=dict)  # ... in the softmax-attention ops
    attn_flops: Dict[int, int] = field(default_factory=dict)  # ... in all attention ops
    batch: Dict[int, int] = field(default_factory=dict)
    fwd_ms: Dict[int, float] = field(default_factory=dict)
    train_ms: Dict[int, float] = field(default_factory=dict)
    fwd_mb: Dict[int, float] = field(default_factory=dict)
    train_mb: Dict[int, float] = field(default_factory=dict)
    notes: Dict[int, str] = field(default_factory=dict)
    pareto: bool = False

    @property
    def n_softmax(self) -> int:
        return self.pattern.count("S")

    def gflops(self, size: int) -> float:
        return self.flops[size] / 1e9

    def share(self, size: int) -> float:
        """Softmax share of the forward FLOPs at `size`, in %."""
        return 100.0 * self.softmax_flops[size] / self.flops[size]


# ---- Pareto front ---------------------------------------------------------------------------------

def cost(r: Result, size: int, timed: bool) -> Optional[float]:
    """What the Pareto front minimises: forward ms when the run timed any pattern at this size (None for a
    pattern it could not time, e.g. out of memory), else forward GFLOPs: one unit for every pattern."""
    return r.fwd_ms.get(size) if timed else r.gflops(size)


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[bool]:
    """points: (softmax share, cost); True where no other point has at least the share at most the cost
    and is better in one of them."""
    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])
    return [not any(dominates(q, pt) for q in points) for pt in points]


def mark_pareto(results: List[Result], size: int) -> None:
    timed = any(r.fwd_ms.get(size) is not None for r in results)
    usable = [r for r in results if cost(r, size, timed) is not None]  # the others stay off the front
    for r, on_front in zip(usable, pareto_front([(r.share(size), cost(r, size, timed)) for r in usable])):
        r.pareto = on_front


# ---- output -------------------------------------------------------------------------------------

def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_table(results: List[Result], args: argparse.Namespace) -> str:
    """Plain-text table: one line per pattern, FLOPs and softmax share at every size, latency and memory
    at --img-size (the CSV has every measured size)."""
    main = args.img_size
    cols = [("role", "<"), ("pattern", "<"), ("S", ">"), ("softmax at", "<")]
    cols += [(f"GFLOPs@{s}", ">") for s in args.sizes] + [(f"sm%@{s}", ">") for s in args.sizes]
    if not args.no_latency:
        cols += [("fwd ms", ">"), ("train ms", ">"), ("fwd MB", ">"), ("train MB", ">")]
    cols += [("Pareto", "<")]
    # Decimals per size so that the largest value of a column shows 4 significant digits.
    top = {s: max(max(r.gflops(s) for r in results), 1e-9) for s in args.sizes}
    decimals = {s: max(0, 3 - math.floor(math.log10(top[s]))) for s in args.sizes}
    rows = []
    for r in results:
        row = [r.role, r.pattern, str(r.n_softmax), P.describe(r.pattern)]
        row += [f"{r.gflops(s):.{decimals[s]}f}" for s in args.sizes] + [f"{r.share(s):.2f}" for s in args.sizes]
        if not args.no_latency:
            row += [fmt(r.fwd_ms.get(main), ".1f"), fmt(r.train_ms.get(main), ".1f"),
                    fmt(r.fwd_mb.get(main), ".0f"), fmt(r.train_mb.get(main), ".0f")]
        row += ["*" if r.pareto else ""]
        rows.append(row)
    widths = [max(len(c[0]), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(f"{cell:{a}{w}}" for cell, (_, a), w in zip(cells, cols, widths)).rstrip()

    header = line([c[0] for c in cols])
    return "\n".join([header, "-" * len(header)] + [line(row) for row in rows])


CSV_FIELDS = ["model", "pattern", "role", "n_softmax", "softmax_at", "params", "img_size", "flops_fwd", "gflops_fwd",
              "softmax_share_pct", "softmax_share_attn_pct", "softmax_flops", "attn_flops", "flops_method", "batch",
              "fwd_ms", "train_ms", "fwd_peak_MB", "train_peak_MB", "pareto", "note", "device", "attn_impl", "dtype",
              "timing"]


def timing_of(args: argparse.Namespace) -> str:
    """How the latency columns were timed: "cuda_graph", "eager" (CUDA) or "cpu"."""
    if args.device.type != "cuda":
        return "cpu"
    return "eager" if getattr(args, "eager", False) else "cuda_graph"


def _round(x: Optional[float], digits: int = 5) -> Optional[float]:
    return None if x is None else float(f"{x:.{digits}g}")


def write_csv(path: str, results: List[Result], args: argparse.Namespace, device_name: str) -> None:
    """One row per pattern and image size. FLOPs are per image (flops_fwd exact, gflops_fwd rounded);
    softmax_share_pct = softmax-attention FLOPs / forward FLOPs, softmax_share_attn_pct = softmax-attention
    FLOPs / all attention-op FLOPs, both in %; batch, ms and MB only where measured (per batch); pareto
    refers to --img-size."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            for s in args.sizes:
                attn = r.attn_flops[s]
                w.writerow({
                    "model": args.model, "pattern": r.pattern, "role": r.role, "n_softmax": r.n_softmax,
                    "softmax_at": P.describe(r.pattern), "params": r.params, "img_size": s,
                    "flops_fwd": r.flops[s], "gflops_fwd": _round(r.gflops(s), 6),
                    "softmax_share_pct": _round(r.share(s)),
                    "softmax_share_attn_pct": _round(100 * r.softmax_flops[s] / attn if attn else 0.0),
                    "softmax_flops": r.softmax_flops[s], "attn_flops": attn,
                    "flops_method": "counted" if args.flops == "count" or r.role.endswith(ROLE_LINEAR) else "analytic",
                    "batch": r.batch.get(s), "fwd_ms": _round(r.fwd_ms.get(s)), "train_ms": _round(r.train_ms.get(s)),
                    "fwd_peak_MB": _round(r.fwd_mb.get(s)), "train_peak_MB": _round(r.train_mb.get(s)),
                    "pareto": int(r.pareto) if s == args.img_size else "", "note": r.notes.get(s, ""),
                    "device": device_name, "attn_impl": args.attn_impl,
                    "dtype": "bfloat16" if args.device.type == "cuda" else "float32",
                    "timing": timing_of(args),
                })


def plot_pareto(path: str, results: List[Result], args: argparse.Namespace, device_name: str) -> None:
    """Cost against softmax share: one panel per image size (forward GFLOPs), plus the measured forward and
    train-step times at --img-size; the Pareto front dashed, the default placement starred."""
    from .plots import _pyplot

    plt = _pyplot()
    main = args.img_size
    panels = [(f"forward GFLOPs / image, {s}px", s, lambda r, s=s: r.gflops(s)) for s in args.sizes]
    if not args.no_latency:
        panels += [(f"forward ms, {main}px, batch {args.batch_size}", main, lambda r: r.fwd_ms.get(main)),
                   (f"train step ms, {main}px, batch {args.batch_size}", main, lambda r: r.train_ms.get(main))]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis")
    kmax = max(1, max(r.n_softmax for r in results))
    for ax, (label, size, value) in zip(axes, panels):
        pts = [(r, r.share(size), value(r)) for r in results if value(r) is not None]
        for k in sorted({r.n_softmax for r, _, _ in pts}):
            xy = [(x, y) for r, x, y in pts if r.n_softmax == k and not r.role]
            if xy:
                ax.scatter(*zip(*xy), s=18, color=cmap(0.85 * k / kmax), alpha=0.8, label=f"{k} softmax layer(s)")
        on_front = pareto_front([(x, y) for _, x, y in pts])
        front = sorted((x, y) for (_, x, y), on in zip(pts, on_front) if on)
        if front:
            ax.plot(*zip(*front), "--o", color="grey", lw=1, ms=9, mfc="none",
                    label="Pareto front (share up, cost down)")
        for r, x, y in pts:
            if ROLE_DEFAULT in r.role:
                ax.scatter([x], [y], marker="*", s=220, color="crimson", edgecolor="black", zorder=5,
                           label=f"default {r.pattern}")
            elif r.role == ROLE_LINEAR:
                ax.scatter([x], [y], marker="s", s=50, color="black", zorder=4, label="all linear")
        ax.set(xlabel=f"softmax share of forward FLOPs at {size}px (%)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")  # "best" keeps clear of the points (the all-linear one sits in a corner)
    fig.suptitle(f"{args.model}: cost vs softmax share ({device_name}, attn_impl {args.attn_impl})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_label(device: torch.device) -> Tuple[str, str]:
    """(description, file-name slug)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, slug(name)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})", "cpu"
