"""Training a table: one train.py run per (row, preset, seed), started by a launcher (local,
torchrun, slurm), finished runs skipped, killed ones resumed, optionally several at once."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.tables.launchers import Launcher
from tasks.tables.spec import ROOT, Row, Table

DONE = "DONE"  # written into a run directory once its train.py call finished


def train_command(row: Row, preset: str, run_name: str, extra: tuple[str, ...], runs_dir: Path,
                  resume: bool, launcher: Launcher = Launcher()) -> list[str]:
    return launcher.command(row, [f"experiment={row.experiment}", *extra, f"numerics={preset}",
                                  f"runs_dir={runs_dir}", f"experiment_name={row.name}", f"run_name={run_name}",
                                  "trainer.progress_bar=false", *(["trainer.resume=true"] if resume else [])])


def setting(row: Row, extra: tuple[str, ...]) -> str:
    """What a run was trained with, as DONE records it: a finished run of another setting is refused."""
    return " ".join((f"experiment={row.experiment}", *extra))


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "last.ckpt").is_file() or (run_dir / "last_checkpoint").is_file()


def console_log(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".console.log")


def pending_runs(table: Table, runs_dir: Path, launcher: Launcher = Launcher()) -> list[tuple]:
    """(label, run dir, setting, command, resume) of every run not finished yet."""
    pending = []
    for row in table.rows:
        for preset, run_name, extra in table.runs(row):
            run_dir, wanted = table.run_dir(runs_dir, row, run_name), setting(row, extra)
            label = f"[{table.name}] {row.name} {run_name}"
            if (run_dir / DONE).is_file():
                done_with = (run_dir / DONE).read_text().splitlines()[-1]
                if done_with != wanted:
                    raise RuntimeError(f"{run_dir} was trained with '{done_with}', but the table now says "
                                       f"'{wanted}': delete that run directory to train it again")
                print(f"{label}: done already ({run_dir})", flush=True)
                continue
            resume = has_checkpoint(run_dir)
            command = train_command(row, preset, run_name, extra, runs_dir, resume, launcher=launcher)
            pending.append((label, run_dir, wanted, command, resume))
    return pending


def planned_commands(table: Table, runs_dir: Path, launcher: Launcher) -> list[str]:
    """The command of every run ``run_table`` would start now, as shell lines; nothing is started."""
    return [shlex.join(command) for _, _, _, command, _ in pending_runs(table, runs_dir, launcher)]


def run_table(table: Table, runs_dir: Path, jobs: int = 1, launcher: Launcher = Launcher()) -> None:
    """Every (row, preset) in order; finished runs are skipped, killed ones resumed.

    With ``jobs`` > 1, that many runs are started at once (on this machine: the cores split evenly
    between them), each one's console output in ``<run dir>.console.log``. A failed run does not
    stop the others; the failures are reported together at the end.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    launcher.check_jobs(jobs)
    pending = pending_runs(table, runs_dir, launcher)
    if jobs == 1:
        for run in pending:
            train_one(*run)
        return
    env = dict(os.environ)
    if launcher.shares_this_machine:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(pool.submit(train_one, *run, env=env), run) for run in pending]
    failures = [f"{label} ({future.exception()}; log: {console_log(run_dir)})"
                for future, (label, run_dir, *_) in futures if future.exception() is not None]
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(pending)} runs failed: " + "; ".join(failures) +
                           ". The finished runs are kept: fix the cause and run the same command again.")


def train_one(label: str, run_dir: Path, wanted: str, command: list[str], resume: bool,
              env: dict | None = None) -> None:
    """One launcher call; ``env`` given: a parallel job, its output into the console log."""
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep
    print(f"{label}: {'resuming' if resume else 'training'} -> {run_dir}", flush=True)
    start = time.monotonic()
    if env is None:
        subprocess.run(command, cwd=ROOT, check=True)
    else:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(console_log(run_dir), "a") as log:
            subprocess.run(command, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env=env)
    seconds = time.monotonic() - start
    (run_dir / DONE).write_text(f"{seconds:.0f} s\n{wanted}\n")
    if env is not None:
        print(f"{label}: finished in {seconds:.0f} s", flush=True)
