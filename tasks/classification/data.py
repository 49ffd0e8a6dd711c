"""Data order and loaders: the order of an epoch is a function of (seed, epoch) alone."""
from __future__ import annotations

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation: a function of (seed, epoch) alone."""
    return (int(seed) * 1_000_003 + int(epoch) + 1) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


def make_loader(dataset, indices, batch_size, num_workers, device, seed, drop_last):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, drop_last=drop_last,
        pin_memory=device.type == "cuda",
        # A dedicated generator: the loader's base seed never draws from the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )
