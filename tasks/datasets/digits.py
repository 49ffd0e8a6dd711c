"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (1797 images,
10 classes, no download), upsampled to image_size x image_size RGB."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from . import DatasetSplits
from .transforms import TensorImageDataset, crop_padding, tensor_transform

VAL_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the split is part of the dataset, never of a run's seed


@functools.lru_cache(maxsize=None)
def digit_tensors(image_size: int) -> dict[str, torch.Tensor]:
    """Train/val images (float in [0, 1], N x 3 x S x S) and labels, and the train split's
    per-channel mean and std. Cached: every run in a process shares one copy; never mutate."""
    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)  # sklearn's range is 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    images = F.interpolate(pixels[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()

    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=VAL_FRACTION, stratify=bunch.target, random_state=SPLIT_SEED
    )
    train_idx, val_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))
    train_images = images[train_idx]
    return {
        "train_images": train_images,
        "train_labels": labels[train_idx],
        "val_images": images[val_idx],
        "val_labels": labels[val_idx],
        "mean": train_images.mean(dim=(0, 2, 3)),
        "std": train_images.std(dim=(0, 2, 3)),
    }


def build_digits(image_size: int, augment: bool) -> DatasetSplits:
    data = digit_tensors(image_size)
    mean, std = data["mean"].tolist(), data["std"].tolist()
    # Random crops only: no horizontal flips, a mirrored digit is another symbol (or none).
    train_transform = (
        tensor_transform(mean, std, crop=image_size, padding=crop_padding(image_size))
        if augment
        else tensor_transform(mean, std)
    )
    return DatasetSplits(
        train=TensorImageDataset(data["train_images"], data["train_labels"], train_transform),
        val=TensorImageDataset(data["val_images"], data["val_labels"], tensor_transform(mean, std)),
        num_classes=10,
        in_channels=3,
    )
