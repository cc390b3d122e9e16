"""Datasets for training and evaluation: the embedded digits set and ImageFolder trees.

    --data digits   scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download),
                    upscaled to the model's input size, one grey channel; a fixed 80/20 train/val split.
    --data PATH     an ImageFolder tree PATH/train/<class>/*.jpg and PATH/val/<class>/*.jpg, read with timm's
                    ImageDataset and create_transform (RandomResizedCrop + flip for training, resize + center
                    crop for validation, ImageNet mean/std), three RGB channels.
"""
import os
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

DIGITS = "digits"
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the split never changes with the training seed, so val numbers stay comparable


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    class_names: List[str] = field(default_factory=list)


def default_workers(data: str) -> int:
    """Loader workers: none for the in-memory digits, 4 to decode image files."""
    return 0 if data == DIGITS else 4


def build_datasets(data: str, img_size: int) -> DataSplits:
    """Train and val datasets for `data` ("digits" or an ImageFolder root) at `img_size` pixels."""
    if img_size < 8:
        raise ValueError(f"img_size must be at least 8 pixels, got {img_size}")
    if data == DIGITS:
        return _digits(img_size)
    return _image_folder(data, img_size)


def _digits(img_size: int) -> DataSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_val = int(round(len(labels) * DIGITS_VAL_FRACTION))
    val_idx, train_idx = order[:n_val], order[n_val:]
    # Normalise with the train split's statistics (fixed, since the split is).
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return DataSplits(TensorDataset(images[train_idx], labels[train_idx]),
                      TensorDataset(images[val_idx], labels[val_idx]),
                      num_classes=10, in_chans=1, class_names=[str(d) for d in range(10)])


def _image_folder(root: str, img_size: int) -> DataSplits:
    from timm.data import ImageDataset, create_transform
    from timm.data.readers.reader_image_folder import find_images_and_targets

    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root!r}: not 'digits' and not a directory")
    splits = {}
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--data {root!r}: expected an ImageFolder tree with train/ and val/ "
                                    f"sub-folders, but {path!r} is missing")
        images, _ = find_images_and_targets(path)
        if not images:
            raise ValueError(f"--data {root!r}: no images found under {path!r} (expected {split}/<class>/<image>)")
        splits[split] = path
    _, class_to_idx = find_images_and_targets(splits["train"])
    _, val_classes = find_images_and_targets(splits["val"])
    unknown = sorted(set(val_classes) - set(class_to_idx))
    if unknown:  # ImageDataset would silently drop their images from the validation set
        raise ValueError(f"--data {root!r}: val/ has classes with no training images under train/: {unknown}")
    train = ImageDataset(splits["train"], class_map=class_to_idx,
                         transform=create_transform(img_size, is_training=True))
    val = ImageDataset(splits["val"], class_map=class_to_idx,
                       transform=create_transform(img_size, is_training=False))
    names = sorted(class_to_idx, key=class_to_idx.get)
    return DataSplits(train, val, num_classes=len(names), in_chans=3, class_names=names)
