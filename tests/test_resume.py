"""A run killed with SIGKILL resumes in a new process, as a user does after a crash, and ends
exactly where the same run trained without interruption ends."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SMALL_RESNET, TINY, read_metrics, train_env, train_subprocess

from tasks.checkpoint import LAST, load_checkpoint

VALUE_COLUMNS = ("step", "epoch", "train/loss", "train/acc1", "lr", "val/loss", "val/acc1", "val/acc5")
EPOCHS, BATCHES = 8, 3  # a checkpoint after every 3 steps, 24 steps in all


def values(rows):
    return [{k: r[k] for k in VALUE_COLUMNS} for r in rows]


def settings(tmp_path, numerics, run_name):
    return [*TINY, *SMALL_RESNET, f"numerics={numerics}", f"trainer.max_epochs={EPOCHS}",
            f"trainer.limit_train_batches={BATCHES}", f"runs_dir={tmp_path / 'runs'}", f"run_name={run_name}"]


def kill_after_first_checkpoint(tmp_path, args, ckpt):
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=train_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not ckpt.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    return process.wait()


@pytest.mark.parametrize("numerics", ["fp32", "int8"])
def test_a_killed_run_resumed_in_a_new_process_ends_bit_identical(tmp_path, numerics):
    whole = train_subprocess(tmp_path, *settings(tmp_path, numerics, "whole"))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    run_dir = tmp_path / "runs" / "resnet18_digits"
    split = settings(tmp_path, numerics, "split")
    assert kill_after_first_checkpoint(tmp_path, split, run_dir / "split" / LAST) == -signal.SIGKILL
    step = load_checkpoint(run_dir / "split" / LAST)["step"]
    assert 0 < step < EPOCHS * BATCHES  # killed mid-run

    resumed = train_subprocess(tmp_path, *split, "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {run_dir / 'split' / LAST} from step {step}" in resumed.stdout + resumed.stderr
    assert values(read_metrics(run_dir / "split")) == values(read_metrics(run_dir / "whole"))
