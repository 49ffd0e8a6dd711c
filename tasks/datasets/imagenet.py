"""ImageNet (or any dataset in its layout) as torchvision ImageFolders: root/train, root/val."""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from . import DatasetError, DatasetSplits
from .transforms import imagenet_transform

LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG, the same class folders in both"


def image_folder(path: Path, transform) -> ImageFolder:
    if not path.is_dir():
        raise DatasetError(f"imagenet: {path} is not a directory; expected {LAYOUT}")
    try:
        return ImageFolder(str(path), transform=transform)
    except OSError as err:  # no class folders, or no images in them
        raise DatasetError(f"imagenet: {path}: {err}; expected {LAYOUT}") from None


def build_imagenet(root: str | Path | None, image_size: int, augment: bool) -> DatasetSplits:
    if root is None:
        raise DatasetError(f"imagenet needs a local root (dataset.root=/path/to/imagenet); expected {LAYOUT}")
    root = Path(root).expanduser()
    train = image_folder(root / "train", imagenet_transform(image_size, train=augment))
    val = image_folder(root / "val", imagenet_transform(image_size, train=False))
    # ImageFolder numbers classes by sorted folder name: different folders would mislabel val.
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DatasetError(
            f"imagenet: {root}/train and {root}/val have different class folders "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]}); expected {LAYOUT}"
        )
    return DatasetSplits(train=train, val=val, num_classes=len(train.classes), in_channels=3)
