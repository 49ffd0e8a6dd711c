"""CIFAR-10 and CIFAR-100 from the local python-pickle folders; never downloaded."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import DatasetError, DatasetSplits
from .transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, TensorImageDataset, tensor_transform

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
NATIVE_SIZE = 32


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    val_file: str
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.val_file)


LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
        10,
        CIFAR10_MEAN,
        CIFAR10_STD,
    ),
    "cifar100": CifarLayout("cifar-100-python", ("train",), "test", "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD),
}


def where_to_get(name: str, layout: CifarLayout) -> str:
    return (
        f"expected {layout.folder}/ holding {', '.join(layout.files)} "
        f"(the 'python version' of {name.upper()} from {CIFAR_URL}, extracted)"
    )


def find_folder(name: str, root: str | Path | None) -> Path:
    """The batch folder: ``root`` itself or ``root/<folder>``, with every batch file present."""
    layout = LAYOUTS[name]
    if root is None:
        raise DatasetError(f"{name} needs a local root (dataset.root=/path/to/cifar); {where_to_get(name, layout)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{name}: {root} is not a directory; {where_to_get(name, layout)}")
    folder = root / layout.folder if (root / layout.folder).is_dir() else root
    missing = [str(folder / f) for f in layout.files if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{name}: missing {', '.join(missing)}; {where_to_get(name, layout)}")
    return folder


def read_batch(path: Path, layout: CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch as (uint8 N x 3 x 32 x 32 images, int64 labels)."""
    hint = f"re-extract it from {CIFAR_URL}"
    try:
        # The CIFAR python format is a pickle: point root only at files you trust.
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # any unpickling failure means the same thing: a bad file
        raise DatasetError(f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err}); {hint}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(batch).__name__}; {hint}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or layout.label_key not in batch:
        raise DatasetError(f"{path}: expected keys b'data' and b'{layout.label_key}', got {sorted(batch)}; {hint}")

    data = np.asarray(batch["data"])
    labels = np.asarray(batch[layout.label_key])
    pixels = 3 * NATIVE_SIZE * NATIVE_SIZE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DatasetError(f"{path}: expected data as uint8 N x {pixels}, got {data.dtype} {data.shape}; {hint}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: expected {len(data)} integer labels, got {labels.dtype} {labels.shape}; {hint}")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DatasetError(f"{path}: labels must lie in [0, {layout.num_classes}), got {labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def build_cifar(name: str, root: str | Path | None, image_size: int, augment: bool) -> DatasetSplits:
    layout = LAYOUTS[name]
    folder = find_folder(name, root)
    train_parts = [read_batch(folder / f, layout) for f in layout.train_files]
    train_images = torch.cat([images for images, _ in train_parts])
    train_labels = torch.cat([labels for _, labels in train_parts])
    val_images, val_labels = read_batch(folder / layout.val_file, layout)

    # Crop at the native 32x32, then resize (e.g. to 224 for ViTs fine-tuned on CIFAR).
    resize = None if image_size == NATIVE_SIZE else image_size
    eval_transform = tensor_transform(layout.mean, layout.std, resize=resize)
    train_transform = (
        tensor_transform(layout.mean, layout.std, crop=NATIVE_SIZE, padding=4, flip=True, resize=resize)
        if augment
        else eval_transform
    )
    return DatasetSplits(
        train=TensorImageDataset(train_images, train_labels, train_transform),
        val=TensorImageDataset(val_images, val_labels, eval_transform),
        num_classes=layout.num_classes,
        in_channels=3,
    )
