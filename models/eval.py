"""Evaluate a checkpoint written by sola_vision.train (also installed as the `sola-eval` command).

    python -m sola_vision.eval runs/sola_vision_nano-digits                    # folder: its best.safetensors
    python -m sola_vision.eval runs/x/last.safetensors --data /data/imagenette  # another val set
    torchrun --nproc_per_node 8 -m sola_vision.eval CKPT --data /data/in1k

Prints top-1 / top-5 accuracy on the validation split and writes a confusion matrix PNG.
"""
import argparse
import json
import os
from typing import Dict, List, Optional

from . import checkpoint as ckpt
from .data import build_datasets, default_workers
from .distributed import init_distributed, shutdown
from .engine import eval_loader, evaluate, use_amp
from .plots import plot_confusion_matrix


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sola-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoint", help="a .safetensors checkpoint, or a training output folder (uses best.safetensors)")
    p.add_argument("--data", default=None, help="'digits' or an ImageFolder root (default: the training data)")
    p.add_argument("--img-size", type=int, default=None, help="default: the training image size")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--attn-impl", default="sola", choices=["sola", "torch"])
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"],
                   help="bf16 autocast: auto = on CUDA only; bf16 = on the CPU too")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--confusion-png", default=None, help="default: confusion_matrix.png next to the checkpoint")
    return p


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.img_size is not None and args.img_size < 8:
        parser.error(f"--img-size must be at least 8, got {args.img_size}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    path = ckpt.resolve_checkpoint(args.checkpoint, ckpt.BEST_FILE)
    model, info = ckpt.load_trained_model(path, args.attn_impl)
    data_arg = args.data or info["data"]
    img_size = args.img_size if args.img_size is not None else info["img_size"]
    ctx = init_distributed(args.device)
    try:
        data = build_datasets(data_arg, img_size)
        if (data.num_classes, data.in_chans) != (info["num_classes"], info["in_chans"]):
            raise ValueError(f"--data {data_arg!r} has {data.num_classes} classes and {data.in_chans} channels, the "
                             f"checkpoint's model {info['num_classes']} and {info['in_chans']}")
        if "class_names" in info and list(data.class_names) != list(info["class_names"]):
            raise ValueError(f"--data {data_arg!r} has the classes {list(data.class_names)}, the checkpoint's model "
                             f"was trained on {list(info['class_names'])} (its outputs are in that order)")
        model.to(ctx.device)
        workers = args.workers if args.workers is not None else default_workers(data_arg)
        amp = use_amp(args.amp, ctx.device)
        result = evaluate(model, eval_loader(data.val, ctx, args.batch_size, workers), ctx, data.num_classes, amp,
                          confusion=True)
        png = args.confusion_png or os.path.join(os.path.dirname(os.path.abspath(path)), "confusion_matrix.png")
        if ctx.is_main:
            plot_confusion_matrix(result["confusion"], data.class_names, png,
                                  f"{info['model']} on {data_arg}: top-1 {result['top1']:.2f}%")
            summary = {k: result[k] for k in ("top1", "top5", "val_loss", "val_samples")}
            print(f"{path} (epoch {info.get('epoch')}) on {data_arg} val at {img_size}px: "
                  f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['val_loss']:.4f}  "
                  f"({result['val_samples']} images)")
            print(f"confusion matrix: {png}")
            print(json.dumps(summary))
        result["confusion_png"] = png
        return result
    finally:
        shutdown(ctx)


def cli() -> None:
    """The sola-eval console script: main()'s result is for Python callers; returned from here it would be the
    exit status, and a non-empty one means failure."""
    main()


if __name__ == "__main__":
    cli()
