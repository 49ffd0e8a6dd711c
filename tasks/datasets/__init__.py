"""Datasets by name: ``build_datasets(name, root, image_size, augment)`` is the one door.

Every item is ``(float32 tensor C x H x W, normalised; int label)``. Nothing is downloaded:
``digits`` is built from scikit-learn's bundled images, the others are read from ``root``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")


class DatasetError(ValueError):
    """A dataset that cannot be built as asked: unknown name, missing or malformed files."""


@dataclass(frozen=True)
class DatasetSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int


def build_datasets(name: str, root: str | None = None, image_size: int = 32, augment: bool = True) -> DatasetSplits:
    """The train and validation splits of dataset ``name``; ``augment`` only affects train."""
    if image_size < 1:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    # Imported here: the loaders import DatasetError from this module.
    if name == "digits":
        from .digits import build_digits

        return build_digits(image_size, augment)
    if name in ("cifar10", "cifar100"):
        from .cifar import build_cifar

        return build_cifar(name, root, image_size, augment)
    if name == "imagenet":
        from .imagenet import build_imagenet

        return build_imagenet(root, image_size, augment)
    raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
