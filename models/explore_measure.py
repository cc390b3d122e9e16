"""Latency and peak memory of the placement explorer (sola_vision.explore): the forward and train steps of
each pattern's model, timed (CUDA events or perf_counter) and their peak allocation measured."""
import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import placement as P
from .engine import autocast
from .explore_flops import build_model
from .explore_report import Result, fmt, timing_of
from .sola_vision import SoLAVision


# ---- latency and memory -----------------------------------------------------------------------

def batch_for(size: int, main_size: int, main_batch: int) -> int:
    """Same pixels per batch as main_batch images of main_size (at least one image)."""
    return max(1, round(main_batch * (main_size / size) ** 2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over `reps` runs after `warmup` runs: CUDA events on CUDA (the runs queue
    back to back), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_graphed(step: Callable, device: torch.device) -> Callable:
    """step() captured in a CUDA graph (after warm-up runs on a side stream, as torch.cuda.graph asks);
    returns the graph's replay: the same kernels without Python's and the launches' overhead, which on an
    H200 box (2026-12-04) took most of an eager step of the tiny model (26-44 ms for the forward of 64
    images at 224 px, whichever layers were softmax)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize(device)
    return graph.replay


@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto logs a line to the C-level stderr at every profiler start and stop: hide those (only around the
    start and the stop, so that the step's own warnings still show)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_mb(fn: Callable) -> Optional[float]:
    """Runs fn once under torch.profiler with memory events; the peak of the running sum of allocations minus
    frees, in MB (None when this torch's profiler does not expose the events)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_native_stderr():
            prof.stop()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
    except Exception:  # noqa: BLE001 - a private corner of the profiler: no number rather than a crash
        return None
    return peak / 2**20


def peak_mb(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak memory one call of fn allocates beyond what was allocated before it, in MB (fn runs once)."""
    if device.type != "cuda":
        return cpu_peak_mb(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def make_steps(model: SoLAVision, size: int, batch: int, device: torch.device) -> Dict[str, Callable]:
    """The two measured steps on random images: "fwd" (run it in eval mode) under no_grad, and "train" (run
    it in train mode): forward, cross-entropy, backward."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=gen, device=device)

    def fwd():
        with torch.no_grad(), autocast(device, amp=True):
            model(x)

    def train():
        model.zero_grad(set_to_none=True)  # gradients are allocated inside the step, as in training
        with autocast(device, amp=True):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()

    return {"fwd": fwd, "train": train}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(r: Result, model: SoLAVision, size: int, args: argparse.Namespace) -> None:
    """Peak memory (one run, which also warms up), then the median time, of both steps at `size`."""
    batch = batch_for(size, args.img_size, args.batch_size)
    r.batch[size] = batch
    try:
        for name, step in make_steps(model, size, batch, args.device).items():
            model.train(name == "train")  # set once, outside the timed runs
            mem = peak_mb(step, args.device)
            if timing_of(args) == "cuda_graph":
                try:
                    step = cuda_graphed(step, args.device)
                except RuntimeError as e:  # a step that cannot be captured is still timed, eagerly
                    if is_oom(e):
                        raise
                    why = f"{name} timed eagerly: CUDA graph capture failed ({str(e).splitlines()[0][:80]})"
                    r.notes[size] = f"{r.notes[size]}; {why}" if size in r.notes else why
            ms = time_ms(step, args.device, args.warmup, args.reps)
            getattr(r, f"{name}_ms")[size], getattr(r, f"{name}_mb")[size] = ms, mem
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        r.notes[size] = "out of memory"
    finally:
        model.zero_grad(set_to_none=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()


def warm_up(model: SoLAVision, sizes: Sequence[int], args: argparse.Namespace) -> None:
    """One untimed forward at each size and a train step at --img-size, so that one-time allocations (RoPE
    tables cached per size, cuBLAS / cuDNN workspaces) stay out of the first row's memory."""
    for size in sizes:
        steps = make_steps(model, size, batch_for(size, args.img_size, args.batch_size), args.device)
        for name in ("fwd", "train") if size == args.img_size else ("fwd",):
            model.train(name == "train")
            try:
                steps[name]()
            except (torch.OutOfMemoryError, RuntimeError) as e:  # out of memory: the measured rows say so
                if not is_oom(e):
                    raise
    model.zero_grad(set_to_none=True)
    if args.device.type == "cuda":
        torch.cuda.empty_cache()


def add_latency(results: List[Result], args: argparse.Namespace, models: Dict[str, SoLAVision], log) -> None:
    """Builds each pattern's model on the device and measures it; the models that add_flops counts (all of
    them with --flops count, else the all-linear one) are kept in `models`, moved to the meta device."""
    sizes = args.sizes if args.latency_sizes == "all" else [args.img_size]
    warm = build_model(args.model, results[0].pattern, args.attn_impl, args.device)
    warm_up(warm, sizes, args)
    for n, r in enumerate(results, 1):
        model = warm if n == 1 else build_model(args.model, r.pattern, args.attn_impl, args.device)
        warm = None
        r.params = sum(p.numel() for p in model.parameters())
        for size in sizes:
            measure(r, model, size, args)
        main = args.img_size
        log(f"  [{n}/{len(results)}] {r.pattern}  fwd {fmt(r.fwd_ms.get(main), '.1f')} ms  train "
            f"{fmt(r.train_ms.get(main), '.1f')} ms at {main}px" + (f"  ({r.notes[main]})" if main in r.notes else ""))
        if args.flops == "count" or r.pattern == P.linear_pattern(args.depths):
            models[r.pattern] = model.to("meta")  # reused by add_flops without a second build
        del model
