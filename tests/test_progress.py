"""Progress reaches a user without a terminal: the lines a run logs go to stdout and train.log."""
from __future__ import annotations

import re

import pytest
from conftest import SMALL_RESNET, TINY, train_subprocess


def _lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


def test_classification_logs_each_epoch_to_stdout_and_train_log(tmp_path):
    runs = tmp_path / "runs"
    result = train_subprocess(tmp_path, *TINY, *SMALL_RESNET, "numerics=fp32", "trainer.max_epochs=2",
                              "trainer.limit_train_batches=2", f"runs_dir={runs}")
    assert result.returncode == 0, result.stdout + result.stderr
    log = (runs / "resnet18_digits" / "fp32" / "train.log").read_text()
    for text in (result.stdout, log):
        assert len(_lines(text, r"epoch \d+ step \d+: val loss")) == 2, text


def test_detection_logs_iteration_progress_to_stdout_and_train_log(tmp_path):
    pytest.importorskip("mmdet", reason="OpenMMLab is installed by `make install-openmmlab`")
    runs = tmp_path / "runs"
    result = train_subprocess(tmp_path, *TINY, "task=faster_rcnn", "dataset=digits_det", "numerics=fp32",
                              "dataset.image_size=64", "dataset.num_train=8", "dataset.num_val=4",
                              "trainer.batch_size=2", "trainer.eval_batch_size=4", "trainer.max_steps=2",
                              "task.warmup_iters=0", f"runs_dir={runs}")
    assert result.returncode == 0, result.stdout + result.stderr
    log = (runs / "faster_rcnn_digits_det" / "fp32" / "train.log").read_text()
    for text in (result.stdout, log):
        # max_steps=2: a line every step (a tenth of the run, at least 1), then the validation
        assert len(_lines(text, r"step [12]/2: loss [\d.]+, lr .* s/step")) == 2, text
        assert _lines(text, r"step 2: validating"), text
