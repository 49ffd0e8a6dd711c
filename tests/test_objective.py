"""What train.py hands back to Hydra (a sweeper optimises it): each family's validation metric."""
from __future__ import annotations

import importlib

import pytest
from conftest import SMALL_RESNET, compose, read_metrics, train_in_process

from tasks.common.schema import FAMILIES
from tasks.runner import OBJECTIVES, objective


@pytest.mark.parametrize("task,metric", [("resnet18", "val/acc1"), ("faster_rcnn", "val/bbox_mAP"),
                                         ("deeplabv3", "val/mIoU")])
def test_each_family_returns_its_own_validation_metric(tmp_path, task, metric):
    dataset = {"faster_rcnn": ["dataset=digits_det"], "deeplabv3": ["dataset=digits_seg"]}.get(task, [])
    cfg = compose(tmp_path, f"task={task}", *dataset)
    others = {m: 1.0 for m in OBJECTIVES.values() if m != metric}
    assert objective(cfg, {**others, metric: 42.5, "step": 80}) == 42.5
    assert objective(cfg, {**others, "step": 80}) is None  # no validation ran (a finished run resumed)


def test_every_family_has_an_objective_that_its_runner_logs():
    assert set(OBJECTIVES) == set(FAMILIES)
    for family in ("detection", "segmentation"):
        # mmengine's metric keys reach the run as these columns; the objective must be one of them.
        assert OBJECTIVES[family] in importlib.import_module(f"tasks.{family}").FAMILY.metric_names.values()


def test_a_classification_run_returns_its_last_validation_accuracy(runs_dir):
    result, run_dir = train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=2")
    cfg = compose(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=2")
    accuracies = [row["val/acc1"] for row in read_metrics(run_dir) if row.get("val/acc1")]
    assert objective(cfg, result) == pytest.approx(float(accuracies[-1]))
