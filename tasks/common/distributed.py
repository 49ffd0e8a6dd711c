"""Data-parallel runs under torchrun: the process group, each process's device, its share of the
data, and sums across processes.

``torchrun --nproc_per_node=N train.py ...`` sets WORLD_SIZE, RANK and LOCAL_RANK (a Slurm job of
several tasks from ``hydra/launcher=slurm`` sets them from Slurm's); without them (or with
WORLD_SIZE=1) a run is the one process it always was. The backend follows the device:
NCCL on CUDA, gloo on CPU. Only rank 0 writes the run directory (metrics, checkpoints, wandb,
coverage), which multi-node runs must therefore have on a shared file system to resume.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from tasks.common.device import resolve_device
from tasks.common.errors import ConfigError


class PeerLost(RuntimeError):
    """Another process of a data-parallel run ended: this one cannot go on alone."""


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer process went away."""
    return isinstance(exc, dist.DistBackendError) or "by peer" in str(exc) or "Connection closed" in str(exc)


@contextlib.contextmanager
def peers_watched(ranks: "Ranks") -> Iterator[None]:
    """Turn a collective's failure after a peer ended into one line saying how to continue."""
    try:
        yield
    except RuntimeError as exc:
        if not ranks.distributed or isinstance(exc, PeerLost) or not lost_peer(exc):
            raise
        raise PeerLost(f"process {ranks.rank} of {ranks.world_size} lost another process of this run (it ended or "
                       "was killed; torchrun names it); continue from the last checkpoint with the same command "
                       "and trainer.resume=true") from exc


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _from_slurm() -> None:
    """A Slurm job of several tasks (Hydra's submitit launcher) sets the variables torchrun would."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # Every GPU stays visible: each process takes cuda:<LOCAL_RANK>, as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launched() -> Ranks:
    """The ranks torchrun (or a Slurm job of several tasks) gave this process; one process otherwise."""
    _from_slurm()
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def start(device_name: str) -> tuple[Ranks, torch.device]:
    """This process's ranks and device; joins the process group when torchrun started several."""
    ranks = launched()
    if not ranks.distributed:
        return ranks, resolve_device(device_name)
    name = str(device_name)
    if name.startswith("cuda:"):
        raise ConfigError(f"trainer.device={name}: under torchrun each process takes cuda:<LOCAL_RANK>; "
                          "use trainer.device=auto or cuda (CUDA_VISIBLE_DEVICES chooses the GPUs)")
    device = resolve_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_in_group(ranks: Ranks, fn, *args):
    """``fn(*args)`` in the process group that ``start`` joined, then the group torn down. A
    collective that fails because a peer ended becomes one line (``peers_watched``); a run that
    ends normally waits for every process first, so that none closes its connections while a
    peer still writes its last files or finishes a collective."""
    try:
        with peers_watched(ranks):
            result = fn(*args)
            if ranks.distributed:
                dist.barrier()
        return result
    finally:
        stop()


def per_rank_batch(batch_size: int, ranks: Ranks) -> int:
    """``trainer.batch_size`` is the global batch: each of N processes takes batch_size / N."""
    if batch_size % ranks.world_size:
        raise ConfigError(f"trainer.batch_size={batch_size} is the global batch and must divide evenly among the "
                          f"{ranks.world_size} processes")
    return batch_size // ranks.world_size


def rank_share(order: list[int], batch_size: int, ranks: Ranks) -> list[int]:
    """This rank's part of each global batch of ``order``: the global batches are those of one
    process with the same seed, whatever the number of processes."""
    if not ranks.distributed:
        return order
    per = per_rank_batch(batch_size, ranks)
    return [i for start in range(0, len(order) - batch_size + 1, batch_size)
            for i in order[start + ranks.rank * per: start + (ranks.rank + 1) * per]]


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all processes (float64), the values themselves for one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
