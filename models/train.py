"""Train a SoLA-Vision model (also installed as the `sola-train` command).

    python -m sola_vision.train                                        # sola_vision_nano on the digits
    python -m sola_vision.train --model sola_vision_tiny --data /data/imagenette --img-size 224 --epochs 100
    python -m sola_vision.train --output runs/x --resume               # continue runs/x where it stopped
    torchrun --nproc_per_node 8 -m sola_vision.train --data /data/in1k --batch-size 1024 --sync-bn

AdamW (no weight decay on norms and biases), linear warm-up then cosine decay per step, label smoothing,
gradient clipping, bf16 autocast on GPU. `--batch-size` is the global batch over all processes. After
every epoch the output folder gets last.safetensors + last_state.pt (atomic writes), best.safetensors,
metrics.jsonl (one JSON object per epoch) and curves.png.
"""
import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from . import checkpoint as ckpt
from .data import DIGITS, build_datasets, default_workers
from .distributed import (DistContext, all_gather_objects, all_reduce_sum, barrier, convert_sync_batchnorm,
                          init_distributed, shutdown)
from .engine import autocast, check_model_name, create_model, eval_loader, evaluate, train_loader, use_amp
from .plots import plot_training_curves
from .sola_vision import VARIANTS, parse_layer_pattern

METRICS_FILE, CURVES_FILE = "metrics.jsonl", "curves.png"
# What a resumed run must share with the run it continues (the schedule, the data order and what is
# trained on); --attn-impl, --amp, --device, --workers and --no-progress may change.
RUN_DEFINING_ARGS = ("data", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay",
                     "label_smoothing", "clip_grad", "drop_path", "train_samples", "seed", "sync_bn")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sola-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="sola_vision_nano", help="a registered sola_vision_* model")
    p.add_argument("--data", default=DIGITS, help="'digits' (embedded) or an ImageFolder root with train/ and val/")
    p.add_argument("--img-size", type=int, default=None, help="input size in pixels (default 32 digits, 224 else)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64, help="global batch over all processes")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    p.add_argument("--layer-pattern", default=None, help="e.g. L-LL-LLLS-LL (default: the model's own)")
    p.add_argument("--attn-impl", default="sola", choices=["sola", "torch"],
                   help="sola_ops kernels or plain PyTorch attention, same model")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"],
                   help="bf16 autocast: auto = on CUDA only; bf16 = on the CPU too (slower there than fp32)")
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over the global batch (DDP)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default 0 digits, 4 else)")
    p.add_argument("--train-samples", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="output folder (default runs/<model>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last_state.pt")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (one line per epoch instead)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.min_lr < 0 or args.warmup_epochs < 0 or args.weight_decay < 0 or args.clip_grad < 0:
        p.error("--lr must be > 0 and --min-lr, --warmup-epochs, --weight-decay, --clip-grad >= 0")
    if args.min_lr > args.lr:
        p.error(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} is more than --epochs {args.epochs}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if not 0 <= args.label_smoothing < 1 or not 0 <= args.drop_path < 1:
        p.error("--label-smoothing and --drop-path must be in [0, 1)")
    if args.train_samples is not None and args.train_samples < 1:
        p.error(f"--train-samples must be at least 1, got {args.train_samples}")
    try:
        check_model_name(args.model)
    except ValueError as e:
        p.error(str(e))
    if args.layer_pattern:
        try:
            parse_layer_pattern(args.layer_pattern, VARIANTS[args.model]["depths"])
        except ValueError as e:
            p.error(f"--layer-pattern: {e}")
    if args.img_size is None:
        args.img_size = 32 if args.data == DIGITS else 224
    if args.workers is None:
        args.workers = default_workers(args.data)
    if args.output is None:
        data_name = os.path.basename(os.path.normpath(args.data))
        args.output = os.path.join("runs", f"{args.model}-{data_name}")


class Trainer:
    def __init__(self, args: argparse.Namespace, ctx: DistContext):
        self.args, self.ctx = args, ctx
        self.amp = use_amp(args.amp, ctx.device)
        # timm's augmentations draw from Python's random, others from numpy's: all three seeded (and saved)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        data = build_datasets(args.data, args.img_size)
        train_set = data.train
        if args.train_samples is not None:
            train_set = Subset(train_set, range(min(args.train_samples, len(train_set))))
        self.data = data
        self.train_loader = train_loader(train_set, ctx, args.batch_size, args.seed, args.workers)
        if len(self.train_loader) == 0:
            raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training "
                             "samples: no full batch to train on")
        self.val_loader = eval_loader(data.val, ctx, 2 * args.batch_size, args.workers)

        model = create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans,
                             attn_impl=args.attn_impl, layer_pattern=args.layer_pattern,
                             drop_path_rate=args.drop_path)
        self.model_info = {"model": args.model, "num_classes": data.num_classes, "in_chans": data.in_chans,
                           "layer_pattern": model.layer_pattern, "img_size": args.img_size,
                           "data": args.data if args.data == DIGITS else os.path.abspath(args.data),  # for eval
                           "class_names": data.class_names}
        if args.sync_bn and ctx.distributed:
            model = convert_sync_batchnorm(model, ctx.device)
        self.model = model.to(ctx.device)
        self.optimizer = create_optimizer_v2(self.model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)
        steps_per_epoch = len(self.train_loader)
        warmup = int(round(args.warmup_epochs * steps_per_epoch))
        total = args.epochs * steps_per_epoch
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(1, total - warmup), lr_min=args.min_lr,
                                           warmup_t=warmup, warmup_lr_init=args.min_lr, warmup_prefix=True,
                                           t_in_epochs=False)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        # Depthwise conv weights (C, 1, 3, 3) get gradients whose stride on the size-1 dim differs from the
        # parameter's: the same memory layout, but DDP warns about it on every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.ddp = DistributedDataParallel(self.model) if ctx.distributed else self.model
        self.start_epoch, self.num_updates, self.history, self.best_top1 = 0, 0, [], -1.0

    # ---- checkpoints ---------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.args.output, name)

    def save(self, epoch: int, is_best: bool) -> None:
        rngs = all_gather_objects(self.ctx, ckpt.rng_state())  # every process's RNG, for exact resume
        if self.ctx.is_main:
            info = dict(self.model_info, epoch=epoch, top1=self.history[-1]["top1"])
            weights = ckpt.model_bytes(self.model, info)
            state = ckpt.train_state_bytes({
                "epoch": epoch, "num_updates": self.num_updates, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rngs, "history": self.history,
                "best_top1": self.best_top1, "args": vars(self.args)})
            # both written, then both renamed: a kill leaves one checkpoint, not two epochs' halves
            ckpt.atomic_write_many([(self.path(ckpt.MODEL_FILE), weights), (self.path(ckpt.STATE_FILE), state)])
            if is_best:
                ckpt.atomic_write(self.path(ckpt.BEST_FILE), weights)
            lines = "".join(json.dumps(h) + "\n" for h in self.history)
            ckpt.atomic_write(self.path(METRICS_FILE), lines.encode())
            plot_training_curves(self.history, self.path(CURVES_FILE),
                                 f"{self.args.model} on {self.args.data} ({self.args.attn_impl} attention)")
        barrier(self.ctx)

    def resume(self) -> None:
        state = ckpt.load_train_state(self.path(ckpt.STATE_FILE))
        weights, info = ckpt.load_model_file(self.path(ckpt.MODEL_FILE))
        if info.get("epoch") != state["epoch"]:
            raise ValueError(f"{self.path(ckpt.MODEL_FILE)} is from epoch {info.get('epoch')} but "
                             f"{self.path(ckpt.STATE_FILE)} from epoch {state['epoch']}: not one checkpoint")
        for key in ("model", "num_classes", "in_chans", "layer_pattern", "img_size"):
            if info.get(key) != self.model_info[key]:
                raise ValueError(f"--resume: the checkpoint has {key}={info.get(key)!r}, this run "
                                 f"{self.model_info[key]!r}; pass the same options as the first run")
        changed = [f"--{k.replace('_', '-')} {state['args'].get(k)!r} -> {getattr(self.args, k)!r}"
                   for k in RUN_DEFINING_ARGS if state["args"].get(k) != getattr(self.args, k)]
        if changed:
            raise ValueError(f"--resume continues a run with its own settings, but these differ: {', '.join(changed)}; "
                             "pass the first run's values (or start a new --output)")
        if len(state["rng"]) != self.ctx.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {len(state['rng'])} processes, this run "
                             f"has {self.ctx.world_size}; resume with the same number of processes")
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.num_updates = state["epoch"], state["num_updates"]
        self.history, self.best_top1 = state["history"], state["best_top1"]
        ckpt.set_rng_state(state["rng"][self.ctx.rank])

    # ---- loop ----------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> Dict:
        self.ddp.train()
        self.train_loader.sampler.set_epoch(epoch)
        loss_sum, steps, samples = 0.0, 0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.args.epochs}", leave=False,
                   disable=self.args.no_progress or not self.ctx.is_main, dynamic_ncols=True)
        start = time.perf_counter()
        for images, targets in bar:
            self.scheduler.step_update(self.num_updates)
            images = images.to(self.ctx.device, non_blocking=True)
            targets = targets.to(self.ctx.device, non_blocking=True)
            with autocast(self.ctx.device, self.amp):
                loss = self.criterion(self.ddp(images), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
            self.optimizer.step()
            self.num_updates += 1
            loss_sum, steps, samples = loss_sum + loss.item(), steps + 1, samples + len(targets)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum / steps:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{samples * self.ctx.world_size / elapsed:.0f}")
        elapsed = time.perf_counter() - start
        loss_sum, samples = all_reduce_sum(self.ctx, [loss_sum, samples])
        return {"train_loss": loss_sum / (steps * self.ctx.world_size), "lr": self.optimizer.param_groups[0]["lr"],
                "img_per_s": samples / elapsed, "epoch_s": elapsed}

    def fit(self) -> Dict:
        for epoch in range(self.start_epoch, self.args.epochs):
            metrics = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            if self.ctx.distributed and not self.args.sync_bn:
                # each process's BatchNorm running stats saw only its own batches: their mean on every process,
                # so validation, the saved checkpoint (process 0's) and a resumed run all use the same model
                distribute_bn(self.model, self.ctx.world_size, reduce=True)
            metrics.update(evaluate(self.model, self.val_loader, self.ctx, self.data.num_classes, self.amp))
            if not math.isfinite(metrics["train_loss"]):
                raise FloatingPointError(f"training diverged at epoch {epoch + 1}: loss {metrics['train_loss']}")
            self.history.append(metrics)
            is_best = metrics["top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, metrics["top1"])
            self.save(epoch + 1, is_best)
            if self.ctx.is_main:
                print(f"epoch {epoch + 1}/{self.args.epochs}  train loss {metrics['train_loss']:.4f}  "
                      f"val loss {metrics['val_loss']:.4f}  top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                      f"lr {metrics['lr']:.2e}  {metrics['img_per_s']:.0f} img/s  {metrics['epoch_s']:.1f} s",
                      flush=True)
        return {"history": self.history, "best_top1": self.best_top1, "output": self.args.output}


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    ctx = init_distributed(args.device)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN picks its conv algorithms once, as timm's train.py
    try:
        os.makedirs(args.output, exist_ok=True)
        trainer = Trainer(args, ctx)
        if ctx.is_main:
            ckpt.remove_stale_temporaries(args.output,
                                          (ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.BEST_FILE, METRICS_FILE))
        if args.resume:
            trainer.resume()
            if trainer.start_epoch >= args.epochs and ctx.is_main:
                print(f"{args.output}: all {args.epochs} epochs are done; nothing to resume", flush=True)
        elif ctx.is_main and os.path.exists(trainer.path(ckpt.STATE_FILE)):
            print(f"note: {args.output} holds an earlier run; it is overwritten (use --resume to continue it)",
                  file=sys.stderr)
        if ctx.is_main:
            params = sum(p.numel() for p in trainer.model.parameters())
            print(f"{args.model} ({trainer.model.layer_pattern}, {params / 1e6:.2f}M params, {args.attn_impl} "
                  f"attention) on {args.data} at {args.img_size}px: {len(trainer.train_loader.sampler) * ctx.world_size}"
                  f" train / {len(trainer.data.val)} val images, {ctx.world_size} process(es) on {ctx.device.type}, "
                  f"from epoch {trainer.start_epoch + 1}", flush=True)
        return trainer.fit()
    finally:
        shutdown(ctx)


def cli() -> None:
    """The sola-train console script: main()'s result is for Python callers; returned from here it would be the
    exit status, and a non-empty one means failure."""
    main()


if __name__ == "__main__":
    cli()
