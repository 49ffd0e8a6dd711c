"""Score a finished detection or segmentation run's last checkpoint on its validation set again,
under a given numerics preset (an integer preset: under a given rounding seed), with mmengine.

The run's own ``mm_config.py`` is loaded with the checkpoint ``last_checkpoint`` names; the
scoring writes only into a scratch folder, removed at exit (mmengine's loggers outlive the runner).
"""
from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

from intrain_core import Numerics
from tasks.checkpoint import CheckpointError
from tasks.openmmlab import MM_LAST, require_openmmlab

# mmengine metric key -> (the run's metrics.csv column, factor to percent)
METRICS = {"detection": ("coco/bbox_mAP", "val/bbox_mAP", 100.0), "segmentation": ("mIoU", "val/mIoU", 1.0)}


def _family(name: str):
    from tasks import detection, segmentation

    return {"detection": detection.FAMILY, "segmentation": segmentation.FAMILY}[name]


def score(run_dir: Path, family: str, numerics: Numerics) -> dict[str, float]:
    """``{column: value in percent}`` of ``run_dir``'s last checkpoint scored under ``numerics``."""
    require_openmmlab(family, "mmdet" if family == "detection" else "mmseg")
    import tasks.openmmlab_hooks  # noqa: F401  (registers IntSGD and the hooks)
    from mmengine.config import Config
    from mmengine.runner import Runner

    if not (run_dir / MM_LAST).is_file() or not (run_dir / "mm_config.py").is_file():
        raise CheckpointError(f"{run_dir} has no {MM_LAST} and mm_config.py: not a finished {family} run")
    cfg = Config.fromfile(str(run_dir / "mm_config.py"))
    for module in cfg.get("custom_imports", {}).get("imports", []):
        importlib.import_module(module)
    scratch = tempfile.mkdtemp(prefix="rescore-")
    atexit.register(shutil.rmtree, scratch, True)
    cfg.work_dir, cfg.load_from, cfg.resume = scratch, (run_dir / MM_LAST).read_text().strip(), False
    cfg.experiment_name = Path(scratch).name  # mmengine keeps per-name singletons: one name per score
    cfg.custom_hooks = []
    if numerics.integer:
        cfg.custom_hooks = [dict(type="IntegerNumericsHook", numerics=numerics.to_dict(), run_dir=scratch,
                                 restore_context=False, op_filter=_family(family).op_filter)]
    key, column, scale = METRICS[family]
    # mmengine loads its checkpoints (numpy and logging objects) with full unpickling: this run's own files.
    with mock.patch.dict(os.environ, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}):
        metrics = Runner.from_cfg(cfg).test()
    if not metrics and family == "detection":
        return {column: 0.0}  # CocoMetric reports nothing when nothing is detected: an AP of 0, as in training
    return {column: scale * float(metrics[key])}
