"""Errors that are a user's to fix: train.py reports them as one line, without a traceback."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work (unknown model, device, schedule, out-of-range number, ...)."""


class DivergedError(RuntimeError):
    """Training met a non-finite value: the step, the op and the layer, and what to try."""


def user_errors() -> tuple[type[BaseException], ...]:
    from tasks.checkpoint import CheckpointError
    from tasks.common.distributed import PeerLost
    from tasks.common.run_dir import RunDirError
    from tasks.datasets import DatasetError

    return (ConfigError, DivergedError, CheckpointError, RunDirError, DatasetError, PeerLost)
