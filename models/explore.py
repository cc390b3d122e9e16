"""Placement explorer: what softmax layers cost, depending on how many there are and where they sit.

    python -m sola_vision.explore --model sola_vision_tiny --img-size 224 --quick
    python -m sola_vision.explore --model sola_vision_tiny --k 1,2 --stages 3,4 --out bench/results
    python -m sola_vision.explore --patterns LL-LLLL-LLLLLLLS-LLLL LL-LLLL-LLLLLLLL-SLLL --budget-ms 40

Candidates are all placements of k softmax layers among the blocks of the chosen stages (--k, --stages),
or the given --patterns; the variant's registered default pattern and the all-linear pattern are always
added as reference rows. Every candidate is built from the model's own `layer_pattern` argument. Reported:

  params          parameter count (the same for every pattern: both mixers have the same weights)
  GFLOPs          forward FLOPs per image at each --img-sizes size, from torch's FlopCounterMode (2 per
                  multiply-add; the sola_ops formulas registered), counted on the meta device
  softmax share   FLOPs of the softmax-attention ops / the model's forward FLOPs, in %: the quadratic part,
                  which grows with the number of tokens (CSV: softmax_share_pct; softmax_share_attn_pct is
                  the same numerator over the attention ops' FLOPs only)
  fwd ms          median time of one forward pass (eval, no_grad) of a batch
  train ms        median time of one train step (train mode, forward + cross-entropy + backward); the
                  optimizer step is left out, its cost does not depend on the pattern
  fwd/train MB    peak memory one step allocates beyond what was allocated before it (activations,
                  gradients, workspaces); CUDA: the caching allocator's peak, CPU: torch.profiler's
                  memory events
  Pareto          not dominated in (lower cost, higher softmax share) at --img-size, cost = fwd ms when
                  measured, else GFLOPs

Latency uses our kernels (--attn-impl sola), bf16 autocast on CUDA and fp32 on CPU, CUDA events (perf_counter
on CPU), warm-up runs then the median; on CUDA each step is replayed from a CUDA graph (--eager: as Python
runs it), so the GPU's time is measured rather than the host's (CSV column timing). Output: a table on
stdout, DIR/placements_<model>_<device>.csv (one row per pattern and image size) and a .png Pareto plot
(cost vs softmax share, the default placement starred).
"""
import argparse
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import placement as P
from .explore_flops import add_flops
from .explore_measure import add_latency
from .explore_report import (ROLE_DEFAULT, ROLE_LINEAR, Result, device_label, fmt, mark_pareto, plot_pareto,
                             render_table, write_csv)
from .layers import sola_ops
from .sola_vision import SoLAVision


# ---- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sola-explore", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="sola_vision_tiny", help="a registered sola_vision_* variant")
    p.add_argument("--img-size", type=int, default=224,
                   help="main input size: latency, budgets and the Pareto front are taken here")
    p.add_argument("--img-sizes", default="224,512,1024",
                   help="sizes for the FLOP growth (and latency without --quick on CUDA); --img-size is added")
    p.add_argument("--k", default=None, help="numbers of softmax layers to place, e.g. 1,2 (default 1,2; 1 with "
                                             "--quick)")
    p.add_argument("--stages", default=None,
                   help="1-based stages the softmax layers may go in, e.g. 3,4 (default: the stages where the "
                        "variant's default pattern has them)")
    p.add_argument("--patterns", nargs="+", default=None, metavar="PATTERN",
                   help="explicit layer patterns (e.g. LL-LLLL-LLLSLLLS-LLLS) instead of --k/--stages")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch at --img-size (default 64 on CUDA, 1 on CPU); other sizes keep the pixels per "
                        "batch: round(B * (img_size / size)^2), at least 1")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--attn-impl", default="sola", choices=["sola", "torch"],
                   help="attention for the latency runs: our kernels or plain PyTorch")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default CUDA 20, CPU 3; "
                                                          "--quick: 10 / 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="extra warm-up runs after the memory run, which warms up too (default CUDA 2, CPU 0)")
    p.add_argument("--latency-sizes", choices=["main", "all"], default=None,
                   help="where latency is measured: --img-size only, or every size (default: all on CUDA, "
                        "main on CPU and with --quick)")
    p.add_argument("--no-latency", action="store_true", help="params and FLOPs only")
    p.add_argument("--eager", action="store_true",
                   help="CUDA: time the steps as Python runs them; by default each is replayed from a CUDA graph, "
                        "without the Python and kernel-launch overhead that can bound a small model's eager step")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice; 1 with --quick on CPU, which keeps "
                        "timings steady on a shared machine)")
    p.add_argument("--flops", choices=["count", "analytic"], default=None,
                   help="count: FlopCounterMode on every pattern; analytic: one counted all-linear model per "
                        "size plus the exact per-block formulas of the swapped layers (same numbers, faster). "
                        "Default count, analytic with --quick")
    p.add_argument("--quick", action="store_true",
                   help="k=1, fewer timing runs, latency at --img-size only, analytic FLOPs")
    p.add_argument("--max-patterns", type=int, default=200, help="refuse enumerations larger than this")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="list the placements whose forward time at --img-size is at most this")
    p.add_argument("--budget-gflops", type=float, default=None,
                   help="list the placements whose forward GFLOPs per image at --img-size are at most this")
    p.add_argument("--out", default="explore_out", help="folder for the CSV and the PNG")
    p.add_argument("--no-plot", action="store_true", help="CSV only")
    return p


def parse_ints(p: argparse.ArgumentParser, text: str, flag: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError:
        p.error(f"{flag}: expected comma-separated integers such as 1,2, got {text!r}")
    if not values:
        p.error(f"{flag}: expected at least one integer, got {text!r}")
    return values


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validates everything before any model is built; fills in the defaults that depend on the device."""
    try:
        args.depths = P.model_depths(args.model)
    except ValueError as e:
        p.error(f"--model: {e}")
    if args.img_size < 32:
        p.error(f"--img-size must be at least 32 (the model's stride), got {args.img_size}")
    sizes = parse_ints(p, args.img_sizes, "--img-sizes")
    if min(sizes) < 32:
        p.error(f"--img-sizes must all be at least 32 (the model's stride), got {args.img_sizes!r}")
    args.sizes = sorted(set(sizes) | {args.img_size})

    if args.patterns is not None:
        if args.k is not None or args.stages is not None:
            p.error("--patterns replaces the enumeration: give either --patterns or --k/--stages, not both")
        given = []
        for pattern in args.patterns:
            try:
                given.append(P.canonical(pattern, args.depths))
            except ValueError as e:
                p.error(f"--patterns: {e}")
        args.placements = list(dict.fromkeys(given))
    else:
        default_s = sorted({i + 1 for i, _ in P.softmax_blocks(P.default_pattern(args.model))})
        stages = parse_ints(p, args.stages, "--stages") if args.stages else (default_s or (len(args.depths) - 1,
                                                                                           len(args.depths)))
        ks = parse_ints(p, args.k, "--k") if args.k else ((1,) if args.quick else (1, 2))
        try:
            P.check_stages(stages, args.depths)
        except ValueError as e:
            p.error(f"--stages: {e}")
        try:
            n = P.count_placements(args.depths, ks, stages)
        except ValueError as e:
            p.error(f"--k: {e}")
        if args.max_patterns < 1:
            p.error(f"--max-patterns must be at least 1, got {args.max_patterns}")
        if n > args.max_patterns:
            p.error(f"--k {','.join(map(str, ks))} --stages {','.join(map(str, stages))} gives {n} patterns, more "
                    f"than --max-patterns {args.max_patterns}; narrow them or raise --max-patterns")
        args.stages, args.k = stages, ks
        args.placements = P.enumerate_placements(args.depths, ks, stages)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if args.attn_impl == "sola" and sola_ops is None:
        p.error("--attn-impl sola needs the sola_ops extension, which is not importable; build it or use "
                "--attn-impl torch")
    if args.attn_impl == "sola" and cuda and not args.no_latency and not sola_ops.build_info().get("cuda"):
        p.error("--attn-impl sola on CUDA needs a CUDA build of sola_ops (sola_ops.build_info() has no CUDA); "
                "rebuild with nvcc, use --device cpu, or --attn-impl torch")
    if args.batch_size is None:
        args.batch_size = 64 if cuda else 1
    if args.threads is None and args.quick and not cuda:
        args.threads = 1
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.reps is None:
        args.reps = (10 if args.quick else 20) if cuda else (1 if args.quick else 3)
    if args.warmup is None:
        args.warmup = 2 if cuda else 0
    if args.batch_size < 1 or args.reps < 1 or args.warmup < 0 or args.max_patterns < 1:
        p.error("--batch-size, --reps and --max-patterns must be at least 1, --warmup at least 0")
    if args.latency_sizes is None:
        args.latency_sizes = "all" if cuda and not args.quick else "main"
    if args.flops is None:
        args.flops = "analytic" if args.quick else "count"
    for flag, value in (("--budget-ms", args.budget_ms), ("--budget-gflops", args.budget_gflops)):
        if value is not None and not value > 0:  # NaN too
            p.error(f"{flag} must be positive, got {value:g}")
    if args.budget_ms is not None and args.no_latency:
        p.error("--budget-ms needs the latency runs: drop --no-latency")
    # last, so a refused command creates nothing; before any measuring, so a bad --out costs no run
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} exists and is not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out!r}: cannot create the folder ({e.strerror})")
    if not os.access(args.out, os.W_OK):
        p.error(f"--out {args.out!r} is not writable")


# ---- candidates and budgets --------------------------------------------------------------------

def candidates(model: str, depths: Sequence[int], placements: Sequence[str]) -> List[Result]:
    """The two reference rows (all linear, the registered default), then the placements not already there."""
    linear, default = P.linear_pattern(depths), P.default_pattern(model)
    roles = {linear: ROLE_LINEAR}
    roles[default] = ROLE_DEFAULT if default != linear else f"{ROLE_DEFAULT},{ROLE_LINEAR}"
    patterns = list(dict.fromkeys([linear, default, *placements]))
    return [Result(pattern, roles.get(pattern, "")) for pattern in patterns]


def within_budget(results: List[Result], args: argparse.Namespace) -> List[Result]:
    """Placements within --budget-ms / --budget-gflops at --img-size, most softmax layers first, then the
    deepest placement first."""
    size = args.img_size
    keep = []
    for r in results:
        if args.budget_ms is not None and (r.fwd_ms.get(size) is None or r.fwd_ms[size] > args.budget_ms):
            continue
        if args.budget_gflops is not None and r.gflops(size) > args.budget_gflops:
            continue
        keep.append(r)
    return sorted(keep, key=lambda r: P.placement_key(r.pattern))


# ---- main -------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> List[Result]:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return explore(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a bigger process (tests)


def explore(args: argparse.Namespace) -> List[Result]:
    """Measures every candidate, prints the table (and the budget list), writes the CSV and the plot."""
    t0 = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    name, tag = device_label(args.device)
    results = candidates(args.model, args.depths, args.placements)
    log(f"sola_vision.explore: {args.model}, {len(results)} patterns, {name}, torch {torch.__version__}, "
        f"attn_impl {args.attn_impl}, FLOPs {args.flops}")
    models: Dict[str, SoLAVision] = {}
    if not args.no_latency:
        add_latency(results, args, models, log)
    add_flops(results, args, models, log)
    mark_pareto(results, args.img_size)

    params = {r.params for r in results}
    batches = ", ".join(f"{b} at {s}px" for s, b in sorted(results[0].batch.items()))
    log("")
    log(f"{args.model}: params {'/'.join(f'{x / 1e6:.2f}' for x in sorted(params))} M; GFLOPs per image; "
        f"sm% = softmax-attention share of the forward FLOPs; ms / MB per batch ({batches or 'not measured'}); "
        f"Pareto *: no other pattern has a higher softmax share for less {'GFLOPs' if args.no_latency else 'fwd ms'} "
        f"at {args.img_size}px")
    log(render_table(results, args))

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"placements_{args.model}_{tag}")
    write_csv(stem + ".csv", results, args, name)
    written = [stem + ".csv"]
    if not args.no_plot:
        plot_pareto(stem + ".png", results, args, name)
        written.append(stem + ".png")

    if args.budget_ms is not None or args.budget_gflops is not None:
        limits = [f"fwd <= {args.budget_ms:g} ms"] if args.budget_ms is not None else []
        limits += [f"<= {args.budget_gflops:g} GFLOPs"] if args.budget_gflops is not None else []
        fits = within_budget(results, args)
        log(f"\nwithin budget ({', '.join(limits)} at {args.img_size}px): {len(fits)} of {len(results)}, "
            "most softmax layers first, then the deepest")
        for r in fits:
            log(f"  {r.pattern}  S={r.n_softmax}  at {P.describe(r.pattern):<12}  "
                f"{r.gflops(args.img_size):.4g} GFLOPs"
                + ("" if args.no_latency else f"  fwd {fmt(r.fwd_ms.get(args.img_size), '.1f')} ms")
                + (f"  ({r.role})" if r.role else ""))
    log(f"\nwrote {', '.join(written)} in {time.perf_counter() - t0:.1f} s")
    return results


def cli() -> None:
    """The sola-explore console script: main()'s result is for Python callers; returned from here it would be the
    exit status, and a non-empty one means failure."""
    main()


if __name__ == "__main__":
    cli()
