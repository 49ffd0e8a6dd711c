"""Detection and segmentation under torchrun: 2 CPU processes through mmengine's DDP wrapper."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, read_metrics

pytest.importorskip("mmdet", reason="OpenMMLab is installed by `make install-openmmlab`")
pytest.importorskip("mmseg")


@pytest.mark.parametrize("task,dataset", [("faster_rcnn", "digits_det"), ("deeplabv3", "digits_seg")])
def test_two_processes_take_an_integer_step(tmp_path, task, dataset):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               f"task={task}", f"dataset={dataset}", "numerics=int8", "dataset.image_size=64", "dataset.num_train=8",
               "dataset.num_val=4", "trainer.batch_size=2", "trainer.eval_batch_size=2", "task.warmup_iters=0",
               "trainer.max_steps=1", "trainer.progress_bar=false", "logger=csv", f"runs_dir={tmp_path}"]
    env = {"INTRAIN_COMPILE": "0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "INTRAIN_DATA_CACHE": str(tmp_path / "data")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_dir = tmp_path / f"{task}_{dataset}" / "int8"
    report = json.loads((run_dir / "coverage.json").read_text())
    assert report["integer_mac_share"] >= 0.99
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if r.get("train/loss")] == ["1"]  # one writer: one row per step
    assert (run_dir / "last_checkpoint").is_file()
