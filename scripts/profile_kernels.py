"""Per-kernel Nsight Compute numbers for a few benchmark shapes: what bounds each sola_ops kernel.

    python scripts/profile_kernels.py                    # every case, one ncu run each (~10 s a case)
    python scripts/profile_kernels.py --cases linear_vision,softmax_long

For each case ncu profiles one forward and one forward+backward call (after warm-up runs, between
cudaProfilerStart/Stop) and this prints one line per kernel launch: duration, DRAM and SM throughput
as % of peak, achieved occupancy, registers per thread, grid and block, and where ncu has the counters,
issue slots and tensor pipes busy and shared-memory bank conflicts. The first GPU run (H200,
2026-12-04) found linear attention at 10-23% of the copy bandwidth and softmax attention at
0.5-0.9x cuDNN: this says which kernel and which limit. Needs a GPU and ncu on PATH.
"""
import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from collections import OrderedDict

# name: (op, dtype, B, H, N, D), shapes from bench/kernels.py's quick set, and optionally the environment of a
# variant: the linear row kernels' (SOLA_LINEAR_ROWS: bench/kernels.py's sola_ops_unstaged / sola_ops_presplit),
# the products on tf32 (SOLA_LINEAR_MMA: sola_ops_tf32),
# the softmax forward and backward on Hopper's wgmma (SOLA_FLASH_WGMMA: sola_ops_wgmma). The block
# ops take x (B, H, N, D) as the model runs them (fp32 parameters): "layer_norm" over D; "dwconv" on
# (B, H, W = N, C = D) tokens, the CPE (x + conv(x)), or at stride 2 with its ReLU (the downsample's).
CASES = OrderedDict([
    ("linear_vision", ("linear", "bfloat16", 128, 2, 3136, 32)),
    ("linear_vision_unstaged", ("linear", "bfloat16", 128, 2, 3136, 32, {"SOLA_LINEAR_ROWS": "unstaged"})),
    ("linear_vision_tf32", ("linear", "bfloat16", 128, 2, 3136, 32, {"SOLA_LINEAR_MMA": "tf32"})),
    ("linear_vision_fp32", ("linear", "float32", 128, 2, 3136, 32)),
    ("linear_sweep", ("linear", "bfloat16", 8, 16, 16384, 64)),
    ("linear_sweep_unstaged", ("linear", "bfloat16", 8, 16, 16384, 64, {"SOLA_LINEAR_ROWS": "unstaged"})),
    ("linear_sweep_presplit", ("linear", "bfloat16", 8, 16, 16384, 64, {"SOLA_LINEAR_ROWS": "staged_presplit"})),
    ("softmax_vision", ("softmax", "bfloat16", 128, 4, 784, 64)),
    ("softmax_vision_d32", ("softmax", "bfloat16", 128, 2, 3136, 32)),
    ("softmax_vision_wgmma", ("softmax", "bfloat16", 128, 4, 784, 64, {"SOLA_FLASH_WGMMA": "1"})),
    ("softmax_vision_d32_wgmma", ("softmax", "bfloat16", 128, 2, 3136, 32, {"SOLA_FLASH_WGMMA": "1"})),
    ("softmax_long", ("softmax", "bfloat16", 8, 16, 4096, 64)),
    ("softmax_long_wgmma", ("softmax", "bfloat16", 8, 16, 4096, 64, {"SOLA_FLASH_WGMMA": "1"})),
    ("softmax_vision_fp32", ("softmax", "float32", 128, 4, 784, 64)),  # 3xTF32 (session 27)
    ("layer_norm_stage1", ("layer_norm", "bfloat16", 128, 56, 56, 64)),  # session 28
    ("dwconv_stage1", ("dwconv", "bfloat16", 128, 56, 56, 64)),
    ("dwconv_downsample", ("dwconv_s2", "bfloat16", 128, 56, 56, 512)),
])
METRICS = OrderedDict([
    ("gpu__time_duration.sum", "ns"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram%"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "sm%"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occ%"),
    ("launch__registers_per_thread", "regs"),
    ("launch__grid_size", "grid"),
    ("launch__block_size", "block"),
])
# What bounds a compute kernel (bench/softmax_attention_notes.md asks first whether the flash forward is
# issue-bound): issue slots busy, the tensor pipe busy (mma.sync, wgmma), shared-memory bank conflicts.
# Kept where this ncu lists the counter (`ncu --query-metrics`), so an unknown name cannot void the run.
EXTRA_METRICS = OrderedDict([
    ("smsp__issue_active.avg.pct_of_peak_sustained_active", "issue%"),
    ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", "hmma%"),
    ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", "gmma%"),
    ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum", "smem_cfl"),
])


def case_env(case):
    """The environment variables that pick the case's variant ({} for the defaults)."""
    return CASES[case][6] if len(CASES[case]) > 6 else {}


def drive(case):
    """Runs under ncu: warm-up, then the profiled calls."""
    import torch

    import sola_ops
    op, dtype, B, H, N, D = CASES[case][:6]
    os.environ.update(case_env(case))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=getattr(torch, dtype), generator=gen)
               for _ in range(3))
    w, b = torch.randn(D, device="cuda") + 1, torch.randn(D, device="cuda")  # fp32 parameters
    w3 = torch.randn(D, 1, 3, 3, device="cuda")
    fn = {"linear": sola_ops.linear_attention, "softmax": sola_ops.softmax_attention,
          "layer_norm": lambda x, *_: sola_ops.layer_norm(x, w, b),
          "dwconv": lambda x, *_: sola_ops.depthwise_conv3x3(x, w3, b, residual=True),
          "dwconv_s2": lambda x, *_: sola_ops.depthwise_conv3x3(x, w3, b, activation="relu", stride=2)}[op]
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

    def fwd_bwd():
        out = fn(qg, kg, vg)  # gradients returned, not accumulated into .grad (no add kernels in the list)
        torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out), allow_unused=True)
    for _ in range(2):
        with torch.no_grad():
            fn(q, k, v)
        fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    with torch.no_grad():
        fn(q, k, v)
    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def metrics_listed(ncu):
    """METRICS and those of EXTRA_METRICS whose counter this ncu lists for the device."""
    try:
        listed = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        listed = ""
    counters = {line.split()[0] for line in listed.splitlines() if line.strip()}
    extra = OrderedDict((m, c) for m, c in EXTRA_METRICS.items() if m.split(".")[0] in counters)
    left_out = [c for m, c in EXTRA_METRICS.items() if m not in extra]
    if left_out:
        print(f"profile_kernels: this ncu lists no counter for {', '.join(left_out)}")
    return OrderedDict(list(METRICS.items()) + list(extra.items()))


def profile(case, ncu, metrics):
    """Prints the case's kernels; returns the metrics that ncu took (the next cases ask for those)."""
    # --clock-control none: the GPU's own clocks, as bench/kernels.py timed it (ncu locks base clocks otherwise)
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--csv", "--print-units", "base",
           "--metrics", ",".join(metrics), sys.executable, os.path.abspath(__file__), "--drive", case]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        print("  ncu gave no answer in 60 s")
        return metrics
    rows = OrderedDict()  # launch ID -> {column: value}
    text = out.stdout[out.stdout.find('"ID"'):] if '"ID"' in out.stdout else ""
    for r in csv.DictReader(io.StringIO(text)):
        if not r.get("Kernel Name") or not r.get("Metric Name"):
            continue  # ncu's own "==PROF==" lines between or after the CSV rows
        launch = rows.setdefault(r["ID"], {"kernel": r["Kernel Name"]})
        if r["Metric Name"] in metrics:
            launch[metrics[r["Metric Name"]]] = r["Metric Value"]
    if not rows and len(metrics) > len(METRICS):  # a counter listed whose rollup this ncu refuses
        print(f"  ncu gave no kernels with the extra metrics: {(out.stderr or out.stdout)[-300:]}; again without")
        return profile(case, ncu, METRICS)
    if not rows:
        print(f"  ncu gave no kernels (exit {out.returncode}): {(out.stderr or out.stdout)[-600:]}")
        return metrics
    print(f"  {'kernel':<58} " + " ".join(f"{c:>9}" for c in metrics.values()))
    for launch in rows.values():
        name = launch["kernel"].split("(")[0]
        name = name if len(name) <= 58 else name[:27] + "..." + name[-28:]
        print(f"  {name:<58} " + " ".join(f"{launch.get(c, '-'):>9}" for c in metrics.values()))
    return metrics


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of: {', '.join(CASES)}")
    p.add_argument("--drive", help=argparse.SUPPRESS)  # internal: the process ncu profiles
    args = p.parse_args()
    if args.drive:
        drive(args.drive)
        return 0
    ncu = shutil.which("ncu")
    if ncu is None:
        print("profile_kernels: ncu is not on PATH", file=sys.stderr)
        return 1
    cases = args.cases.split(",")
    for case in cases:
        if case not in CASES:
            print(f"profile_kernels: unknown case {case!r}; known: {', '.join(CASES)}", file=sys.stderr)
            return 1
    metrics = metrics_listed(ncu)
    for case in cases:
        op, dtype, B, H, N, D = CASES[case][:6]
        env = "".join(f", {name}={value}" for name, value in case_env(case).items())
        print(f"=== {case}: {op} {dtype} B={B} H={H} N={N} D={D}{env}, one fwd then one fwd+bwd", flush=True)
        metrics = profile(case, ncu, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
