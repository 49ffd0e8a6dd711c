"""Shared test helpers: tiny train.py runs, in-process (Hydra compose API) or as a subprocess."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# Eager kernels unless a test asks for compiled ones (intrain_core.compiled.compilation): the
# suite's many short runs would each pay the compiler's start-up, and both give the same bits.
os.environ.setdefault("INTRAIN_COMPILE", "0")

# Two xdist workers on two cores: one thread each, or they fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

# Tiny settings: 8x8 digits, batches of 8, one validation batch, CSV logging only.
TINY = [
    "trainer.batch_size=8",
    "trainer.eval_batch_size=64",
    "trainer.limit_val_batches=1",
    "trainer.progress_bar=false",
    "trainer.device=cpu",
    "dataset.image_size=8",
    "logger=csv",
]
# A small timm ResNet (batch norm, residual adds, 0.37M params): the whole int8 pipeline, quickly.
SMALL_RESNET = ["task=resnet18", "task.zoo=timm", "task.model=test_resnet"]


def compose(runs_dir: Path, *overrides: str):
    """The config ``python train.py <overrides>`` would get, with the tiny settings."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose("config", overrides=[f"runs_dir={runs_dir}", *TINY, *overrides])


def run_dir_of(cfg) -> Path:
    """Where train.py puts this run (hydra.run.dir in configs/config.yaml)."""
    return Path(cfg.runs_dir) / cfg.experiment_name / cfg.run_name


def train_in_process(runs_dir: Path, *overrides: str) -> tuple[dict, Path]:
    from tasks.runner import run

    cfg = compose(runs_dir, *overrides)
    run_dir = run_dir_of(cfg)
    return run(cfg, run_dir), run_dir


def train_env() -> dict[str, str]:
    """The environment of a train.py subprocess: as a user's shell, one thread per xdist worker."""
    return {**os.environ, "OMP_NUM_THREADS": "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2",
            "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def train_subprocess(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=train_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"
