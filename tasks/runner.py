"""From task family to runner: ``run(cfg, run_dir)`` hands a resolved config to its task's runner."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tasks.checkpoint import CheckpointError, RunDirError

# task.family -> module with ``run(cfg, run_dir) -> dict``
RUNNERS = {"classification": "tasks.classification", "detection": "tasks.detection",
           "segmentation": "tasks.segmentation"}


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    family = cfg.task.get("family", "classification")
    if family not in RUNNERS:
        raise ValueError(f"task.family={family!r} has no runner; available: {sorted(RUNNERS)}")
    return importlib.import_module(RUNNERS[family]).run(cfg, run_dir)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are a user's to fix: reported as one clear line, without a traceback."""
    from tasks.classification import ConfigError

    errors: list[type[BaseException]] = [CheckpointError, RunDirError, ConfigError]
    try:
        from tasks.datasets import DatasetError

        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)
