"""Hydra's submitit launcher: a sweep runs as submitit jobs (submitit_local here, Slurm on a cluster)."""
from __future__ import annotations

import subprocess
import sys

from conftest import CONFIGS, ROOT, SMALL_RESNET, TINY


def test_submitit_local_runs_every_job_of_a_sweep(tmp_path):
    command = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "numerics=fp32,int8",
               "trainer.max_steps=5", f"runs_dir={tmp_path}", *TINY, *SMALL_RESNET]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"INTRAIN_COMPILE": "0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for preset in ("fp32", "int8"):
        rows = (tmp_path / "resnet18_digits" / preset / "metrics.csv").read_text().splitlines()
        assert rows[-1].startswith("5,"), rows
    assert (tmp_path / "resnet18_digits" / ".submitit").is_dir()  # the jobs' own logs, beside the runs


def test_slurm_launcher_config_has_the_cluster_keys():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                                           "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min == 4320
