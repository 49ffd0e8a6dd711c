"""From task family to runner: ``run(cfg, run_dir)`` validates a composed config and hands it to
its task family's runner."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tasks.common.schema import FAMILIES, validate

# task.family -> module with ``run(cfg, run_dir) -> dict``
RUNNERS = {family: f"tasks.{family}" for family in FAMILIES}
# task.family -> the validation metric a sweeper optimises (higher is better)
OBJECTIVES = {"classification": "val/acc1", "detection": "val/bbox_mAP", "segmentation": "val/mIoU"}


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    validate(cfg)
    return importlib.import_module(RUNNERS[cfg.task.family]).run(cfg, run_dir)


def objective(cfg: DictConfig, result: dict[str, Any]) -> float | None:
    """The run's final value of its family's validation metric, for Hydra's sweepers."""
    value = result.get(OBJECTIVES[cfg.task.family])
    return float(value) if value is not None else None
