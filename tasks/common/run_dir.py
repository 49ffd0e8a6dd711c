"""The run directory: nothing of an existing run is overwritten, and a new run that a user error
stops before its first checkpoint leaves nothing behind (it could not be resumed anyway)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from tasks.checkpoint import LAST, CheckpointError
from tasks.common.errors import user_errors
from tasks.run_logging import add_file_log, run_info, write_yaml

# What a run writes into its directory; any of them present means the directory holds a run.
RUN_OUTPUTS = ("metrics.csv", LAST, "config.yaml", "run_info.yaml", "coverage.txt", "coverage.json", "wandb")
LOG = "train.log"


class RunDirError(RuntimeError):
    """A new run pointed at a directory that already holds one."""


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool, checkpoint_name: str = LAST) -> Path | None:
    """Check that a run may use ``run_dir``; return the checkpoint to resume from, if any.

    A new run refuses a directory that already holds a run's outputs; ``resume`` requires its
    checkpoint (``last.ckpt``; mmengine runs: ``last_checkpoint``). Nothing is written here.
    """
    run_dir = Path(run_dir)
    ckpt = run_dir / checkpoint_name
    if resume:
        if not ckpt.is_file():
            raise CheckpointError(
                f"trainer.resume=true but there is no checkpoint to resume from at {ckpt}; "
                "run without trainer.resume=true to start this run"
            )
        return ckpt
    found = [name for name in (*RUN_OUTPUTS, checkpoint_name) if (run_dir / name).exists()]
    if found:
        how = ("Pass trainer.resume=true to continue it" if ckpt.is_file() else
               "It has no checkpoint to resume from (it stopped before its first epoch ended): delete it to start over")
        raise RunDirError(
            f"run directory {run_dir} already holds a run ({', '.join(found)}); nothing was overwritten. "
            f"{how}, or choose another run name (run_name=... or experiment_name=...)"
        )
    return None


@contextlib.contextmanager
def open_run_dir(run_dir: Path, new_run: bool, checkpoint_name: str = LAST,
                 outputs: tuple[str, ...] = ()) -> Iterator[Path]:
    """Create ``run_dir`` with its ``train.log`` for the run inside the block.

    A new run that a user error stops before ``checkpoint_name`` exists has its outputs
    (``RUN_OUTPUTS``, ``outputs``, the log) removed, and the directory too when that empties it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = add_file_log(run_dir)
    try:
        yield run_dir
    except user_errors():
        if new_run and not (run_dir / checkpoint_name).exists():
            logging.getLogger().removeHandler(handler)
            handler.close()
            for name in (*RUN_OUTPUTS, *outputs, LOG):
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def write_run_info(run_dir: Path, device: torch.device, resumed_from_step: int | None,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """``run_info.yaml`` (a resume: ``run_info.resume-<step>.yaml``): commit, command, host, versions."""
    info = run_info(device, {**extra, "resumed_from_step": resumed_from_step})
    name = "run_info.yaml" if resumed_from_step is None else f"run_info.resume-{resumed_from_step}.yaml"
    write_yaml(run_dir / name, info)
    return info


def discard_empty_dirs(run_dir: str | os.PathLike, runs_dir: str | os.PathLike) -> None:
    """Remove ``run_dir`` and its parents up to ``runs_dir`` while they are empty (Hydra creates the
    run directory before the run starts; a run refused at once must not leave it behind)."""
    path, stop = Path(run_dir).resolve(), Path(runs_dir).resolve()
    while path == stop or stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent
