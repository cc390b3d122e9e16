"""What sola_vision.train and sola_vision.eval share: model construction, loaders, the evaluation loop."""
import contextlib
from typing import Dict, Optional

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .distributed import DistContext, all_reduce_sum


def check_model_name(name: str) -> None:
    """ValueError unless name is a registered SoLA-Vision model (--model of the train and eval tools)."""
    if name not in timm.list_models("sola_vision*"):
        raise ValueError(f"--model {name!r} is not a registered SoLA-Vision model; choose one of "
                         f"{', '.join(timm.list_models('sola_vision*'))}")


def create_model(name: str, *, num_classes: int, in_chans: int, attn_impl: str = "sola",
                 layer_pattern: Optional[str] = None, drop_path_rate: float = 0.0) -> torch.nn.Module:
    check_model_name(name)
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, attn_impl=attn_impl, drop_path_rate=drop_path_rate)
    if layer_pattern:
        kwargs["layer_pattern"] = layer_pattern
    return timm.create_model(name, **kwargs)


def use_amp(amp: str, device: torch.device) -> bool:
    """--amp auto|bf16|none -> whether to autocast: auto means on CUDA only (on the CPU bf16 autocast is
    slower than fp32, so it runs only when asked for by name)."""
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on the device when `amp`, else plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def train_loader(dataset: Dataset, ctx: DistContext, global_batch: int, seed: int, workers: int) -> DataLoader:
    """Each process takes every world_size-th sample of one seeded permutation (DistributedSampler, also
    with one process), so a step sees the same global batch whatever the number of processes."""
    if global_batch % ctx.world_size:
        raise ValueError(f"--batch-size {global_batch} (the global batch) must be divisible by the number "
                         f"of processes {ctx.world_size}")
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    # Workers start afresh each epoch, seeded from the main process's torch RNG (which a checkpoint saves):
    # persistent workers would carry their random state across epochs, which --resume cannot restore.
    return DataLoader(dataset, batch_size=global_batch // ctx.world_size, sampler=sampler, drop_last=True,
                      num_workers=workers, pin_memory=ctx.device.type == "cuda", persistent_workers=False)


def eval_loader(dataset: Dataset, ctx: DistContext, batch: int, workers: int) -> DataLoader:
    """Disjoint shards without padding (rank, rank + world, ...), so every sample counts exactly once."""
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    return DataLoader(shard, batch_size=max(1, batch // ctx.world_size), shuffle=False, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, ctx: DistContext, num_classes: int, amp: bool,
             confusion: bool = False) -> Dict:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) over all processes' shards; with `confusion`, the
    (num_classes x num_classes) confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    k = min(5, num_classes)
    loss_sum = correct1 = correct5 = count = 0.0
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.float64)
    for images, targets in loader:
        images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, amp):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        topk = logits.topk(k, dim=1).indices
        correct1 += (topk[:, 0] == targets).sum().item()
        correct5 += (topk == targets[:, None]).any(dim=1).sum().item()
        count += len(targets)
        if confusion:
            matrix += torch.bincount((targets * num_classes + topk[:, 0]).cpu(),
                                     minlength=num_classes * num_classes).double()
    loss_sum, correct1, correct5, count = all_reduce_sum(ctx, [loss_sum, correct1, correct5, count])
    if count == 0:
        raise ValueError("evaluation set is empty")
    result = {"val_loss": loss_sum / count, "top1": 100 * correct1 / count, "top5": 100 * correct5 / count,
              "val_samples": int(count)}
    if confusion:
        if ctx.distributed:
            matrix = torch.tensor(all_reduce_sum(ctx, matrix.tolist()), dtype=torch.float64)
        result["confusion"] = matrix.view(num_classes, num_classes).numpy().astype(np.int64)
    return result
