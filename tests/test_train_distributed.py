"""train.py under torchrun: 2 CPU processes (gloo), DDP with the integer all-reduce."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, SMALL_RESNET, TINY

STEPS = ["trainer.max_steps=4", "trainer.log_every_n_steps=1"]


def torchrun(runs_dir, *overrides, processes=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "train.py", f"runs_dir={runs_dir}", *TINY, *SMALL_RESNET, *overrides]
    env = {"INTRAIN_COMPILE": "0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(f)]


def test_two_processes_train_and_repeat_bit_identically(tmp_path):
    runs = []
    for name in ("a", "b"):
        done = torchrun(tmp_path / name, "numerics=int8", *STEPS)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(tmp_path / name / "resnet18_digits" / "int8")
    rows = metrics(runs[0])
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "4"] and rows[-1]["val/acc1"]
    assert rows == metrics(runs[1])
    weights = [torch.load(r / "last.ckpt", weights_only=False) for r in runs]
    assert weights[0]["world_size"] == 2
    for key, value in weights[0]["model"].items():
        assert torch.equal(value, weights[1]["model"][key]), key
    # Only rank 0 wrote: one log line of the run's header, one set of files.
    assert (runs[0] / "train.log").read_text().count("x 2 processes") == 1
    assert sorted(p.name for p in runs[0].iterdir()) == sorted(
        ["config.yaml", "coverage.json", "coverage.txt", "last.ckpt", "metrics.csv", "run_info.yaml", "train.log"])


def test_resume_with_the_same_or_another_number_of_processes(tmp_path):
    done = torchrun(tmp_path, "numerics=int8", *STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "resnet18_digits" / "int8"
    resumed = torchrun(tmp_path, "numerics=int8", "trainer.max_steps=6", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == ["1", "2", "3", "4", "4", "5", "6", "6"]
    one = subprocess.run([sys.executable, "train.py", f"runs_dir={tmp_path}", *TINY, *SMALL_RESNET, "numerics=int8",
                          "trainer.max_steps=8", "trainer.resume=true"], cwd=ROOT, capture_output=True, text=True,
                         env={"INTRAIN_COMPILE": "0", "PATH": "/usr/bin:/bin"}, timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    assert "trained by 2 process(es) and continues with 1" in one.stdout + one.stderr
    assert [r["step"] for r in metrics(run_dir)][-3:] == ["7", "8", "8"]
    assert torch.load(run_dir / "last.ckpt", weights_only=False)["world_size"] == 1


def test_global_batch_must_divide_among_processes(tmp_path):
    done = torchrun(tmp_path, "numerics=fp32", "trainer.batch_size=9", "trainer.max_steps=1")
    assert done.returncode != 0
    assert "trainer.batch_size=9 is the global batch and must divide evenly among the 2 processes" in done.stdout


def test_a_killed_process_ends_the_run_in_one_line_and_resume_continues_it(tmp_path):
    overrides = ["numerics=int8", "trainer.max_steps=400", "trainer.limit_train_batches=2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               f"runs_dir={tmp_path}", *TINY, *SMALL_RESNET, *overrides]
    env = {"INTRAIN_COMPILE": "0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "resnet18_digits" / "int8"
    deadline = time.monotonic() + 300
    while not (run_dir / "last.ckpt").is_file() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(1)
    assert (run_dir / "last.ckpt").is_file()
    rank1 = [p for p in os.listdir("/proc") if p.isdigit() and _is_rank(int(p), 1, str(tmp_path))]
    assert len(rank1) == 1
    os.kill(int(rank1[0]), signal.SIGKILL)
    output, _ = run.communicate(timeout=300)
    assert run.returncode != 0
    # torchrun names the dead rank; the survivor either said so in one line or was stopped first.
    assert "rank      : 1 (local_rank: 1)" in output and "exitcode  : -9" in output, output[-3000:]
    assert "[rank0]: Traceback" not in output, output[-3000:]
    survivor = [line for line in output.splitlines() if line.startswith("Error:")]
    assert survivor in ([], ["Error: process 0 of 2 lost another process of this run (it ended or was killed; "
                             "torchrun names it); continue from the last checkpoint with the same command and "
                             "trainer.resume=true"]), survivor
    step = torch.load(run_dir / "last.ckpt", weights_only=False)["step"]
    resumed = torchrun(tmp_path, "numerics=int8", f"trainer.max_steps={step + 2}", "trainer.limit_train_batches=2",
                       "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert metrics(run_dir)[-1]["step"] == str(step + 2)


def _is_rank(pid: int, rank: int, marker: str) -> bool:
    """Whether ``pid`` is the train.py process of ``rank`` in the run whose command holds ``marker``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
        with open(f"/proc/{pid}/environ", "rb") as f:
            environment = f.read().split(b"\0")
    except OSError:
        return False
    return marker.encode() in command and b"train.py" in command and f"RANK={rank}".encode() in environment
