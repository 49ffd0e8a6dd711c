"""Per-item transforms on image tensors, the normalisation constants, and the in-memory
dataset that applies them."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_padding(image_size: int) -> int:
    """The random-crop padding: the CIFAR recipe's 4 pixels at 32x32, scaled with the image."""
    return max(1, round(4 * image_size / 32))


def tensor_transform(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop: int | None = None,
    padding: int = 0,
    flip: bool = False,
    resize: int | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random crop (zero padding, before normalisation: pads with black), optional horizontal
    flip, optional resize to ``resize`` x ``resize``, then normalisation."""
    steps: list[Callable] = []
    if crop is not None:
        steps.append(T.RandomCrop(crop, padding=padding))
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if resize is not None:
        steps.append(T.Resize((resize, resize), antialias=True))
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def imagenet_transform(image_size: int, train: bool) -> Callable:
    """The standard ImageNet recipe on PIL images: RandomResizedCrop + flip for training;
    resize to image_size * 256/224 then center crop for evaluation."""
    if train:
        head = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TensorImageDataset(Dataset):
    """Images held in memory as N x C x H x W (uint8, or float in [0, 1]), transformed per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        return self.transform(image), int(self.labels[index])
