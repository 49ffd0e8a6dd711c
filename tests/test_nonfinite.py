"""trainer.on_nonfinite: stop names the step, the op and the layer; skip skips and counts the step."""
from __future__ import annotations

import pytest
import torch
from conftest import SMALL_RESNET, read_metrics, train_in_process

from tasks.checkpoint import LAST, load_checkpoint
from tasks.classification.training import Loop
from tasks.common.errors import DivergedError


def nan_input_at(call: int):
    """Loop.train_step with a NaN in the batch of its ``call``-th call."""
    original, calls = Loop.train_step, [0]

    def train_step(self, x, y):
        calls[0] += 1
        if calls[0] == call:
            x = x.clone()
            x[0] = float("nan")
        return original(self, x, y)

    return train_step


@pytest.mark.parametrize("numerics,where", [("int8", r"NaN or Inf in \w+ input of layer '\w+"),
                                             ("fp32", "the training loss is nan")])
def test_stop_names_the_step_and_where_and_leaves_no_run_behind(runs_dir, monkeypatch, numerics, where):
    monkeypatch.setattr(Loop, "train_step", nan_input_at(2))
    with pytest.raises(DivergedError, match=rf"training step 2 \(epoch 0\) met a non-finite value: {where}") as info:
        train_in_process(runs_dir, f"numerics={numerics}", *SMALL_RESNET, "trainer.max_steps=3")
    assert "trainer.on_nonfinite=skip" in str(info.value) and "task.lr" in str(info.value)
    assert not [p for p in runs_dir.rglob("*") if p.is_file()]  # it could not be resumed: nothing kept


@pytest.mark.parametrize("numerics", ["int8", "fp32"])
def test_skip_counts_the_step_and_goes_on(runs_dir, monkeypatch, numerics):
    monkeypatch.setattr(Loop, "train_step", nan_input_at(2))
    result, run_dir = train_in_process(runs_dir, f"numerics={numerics}", *SMALL_RESNET, "trainer.max_steps=3",
                                       "trainer.on_nonfinite=skip")
    rows = [r for r in read_metrics(run_dir) if r["train/loss"]]
    assert [(r["step"], r["train/nonfinite_skipped"]) for r in rows] == [("1", "0"), ("3", "1")]
    checkpoint = load_checkpoint(run_dir / LAST)
    assert checkpoint["nonfinite_skipped"] == 1 and checkpoint["step"] == 3
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert result["step"] == 3
