"""Checkpoints: atomic writes, clear errors for corrupt files, strict resume, no overwrites."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import SMALL_RESNET, read_metrics, train_in_process

from tasks.checkpoint import LAST, CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tasks.common.run_dir import RunDirError, prepare_run_dir
from tasks.run_logging import MetricsCSV

MINIMAL = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "epoch": 1, "step": 5,
           "batch_in_epoch": 0, "rng": {}, "config": {"a": 1}}


def test_save_is_atomic_and_round_trips(tmp_path):
    path = save_checkpoint(tmp_path / LAST, MINIMAL)
    assert [p.name for p in tmp_path.iterdir()] == [LAST]  # no temporary file left behind
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.ones(3)) and state["step"] == 5


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / LAST, MINIMAL)
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / LAST, {**MINIMAL, "model": lambda: None})  # cannot be pickled
    assert load_checkpoint(tmp_path / LAST)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_ours"])
def test_corrupt_checkpoint_says_so_and_names_the_file(tmp_path, damage):
    path = save_checkpoint(tmp_path / LAST, MINIMAL)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_new_run_refuses_an_existing_run_dir(tmp_path):
    (tmp_path / "metrics.csv").write_text("step\n1\n")
    with pytest.raises(RunDirError, match="trainer.resume=true|delete it") as info:
        prepare_run_dir(tmp_path, resume=False)
    assert str(tmp_path) in str(info.value) and "run_name" in str(info.value)
    assert (tmp_path / "metrics.csv").read_text() == "step\n1\n"


def test_resume_requires_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        prepare_run_dir(tmp_path, resume=True)
    assert prepare_run_dir(tmp_path / "fresh", resume=False) is None


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path / LAST, {**MINIMAL, "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / LAST)["rng"])  # weights_only=True load
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_metrics_csv_drops_rows_past_the_checkpoint_on_resume(tmp_path):
    m = MetricsCSV(tmp_path / "metrics.csv")
    for step in (1, 2, 3):
        m.write({"step": step, "epoch": 0, "train/loss": 1.0 / step})
    m.close()
    m = MetricsCSV(tmp_path / "metrics.csv", resume_step=2)
    m.write({"step": 3, "epoch": 0, "train/loss": 0.25})
    m.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[-1]["train/loss"] == "0.25"


# --- through the runner -------------------------------------------------------------------------
def test_corrupt_last_ckpt_stops_a_resume_and_touches_nothing(runs_dir):
    _, run_dir = train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=2")
    ckpt = run_dir / LAST
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="corrupt") as info:
        train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=4", "trainer.resume=true")
    assert str(ckpt) in str(info.value)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_resume_with_a_different_config_is_refused(runs_dir):
    train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=2")
    with pytest.raises(CheckpointError, match="task.lr"):
        train_in_process(runs_dir, "numerics=fp32", *SMALL_RESNET, "trainer.max_steps=4", "trainer.resume=true",
                         "task.lr=0.5")
