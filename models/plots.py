"""PNG plots written next to the checkpoints: training curves and the confusion matrix."""
from typing import Dict, List, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: List[Dict], path: str, title: str = "") -> None:
    """Loss (train, val) and validation accuracy (top-1, top-5) per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (label-smoothed)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [h["top1"] for h in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [h["top5"] for h in history], "s-", label="val top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    size = min(4 + 0.4 * len(class_names), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=list(class_names)).plot(
        ax=ax, colorbar=False, include_values=len(class_names) <= 30)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
