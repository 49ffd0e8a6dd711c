"""Run a function on N gloo ranks (``torch.multiprocessing.spawn``) and collect what each returns."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn, world_size: int, folder: str, args) -> None:
    torch.set_num_threads(1)  # N ranks on 2 cores
    os.environ.setdefault("INTRAIN_COMPILE", "0")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args) -> list:
    """``fn(rank, world_size, *args)`` on each of ``world_size`` gloo ranks; their results by rank."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_entry, args=(fn, world_size, folder, args), nprocs=world_size, join=True)
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
