"""What a run writes about itself: metrics.csv, config.yaml, run_info.yaml, train.log, wandb.

``metrics.csv`` has one row per logged training step (``step``, ``epoch``, ``train/loss``,
``train/acc1``, ``lr``, ``time_s``; with ``trainer.on_nonfinite=skip`` also
``train/nonfinite_skipped``, the steps skipped so far) and one row per validation (same ``step`` and ``epoch``,
``val/loss``, ``val/acc1``, ``val/acc5``); a column a row does not fill is empty. wandb is
optional, never prompts and never needs an account: without credentials it runs offline into
``<run dir>/wandb``.
"""
from __future__ import annotations

import csv
import logging
import netrc
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import torch
import yaml
from tqdm import tqdm

log = logging.getLogger("intrain")

COLUMNS = ("step", "epoch", "train/loss", "train/acc1", "lr", "train/nonfinite_skipped", "val/loss", "val/acc1",
           "val/acc5", "time_s")
REPO_ROOT = Path(__file__).resolve().parent.parent


# --- metrics.csv ------------------------------------------------------------------------------
class MetricsCSV:
    """Appends rows to ``metrics.csv``; on resume, first drops rows past the checkpoint's step."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None,
                 columns: tuple[str, ...] = COLUMNS):
        self.path, self.columns = Path(path), tuple(columns)
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        new = not self.path.is_file()
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="raise")
        if new:
            self._writer.writeheader()
            self._file.flush()

    def _truncate_after(self, step: int) -> None:
        """Rows logged after the checkpoint was written would repeat: drop them, atomically. A
        process killed mid-write leaves a last line without its newline: it is dropped too."""
        text = self.path.read_text()
        complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        rows = list(csv.DictReader(complete.splitlines()))
        kept = [r for r in rows if r.get("step") and int(r["step"]) <= step]
        fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest round-trip: resumed runs compare exactly
    return value


# --- run metadata -------------------------------------------------------------------------------
def git_commit(cwd: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def git_dirty(cwd: Path = REPO_ROOT) -> bool | None:
    """Uncommitted changes to tracked files other than results/, which the table aggregation
    itself rewrites between the runs of a queue."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                             cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def write_yaml(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def run_info(device: torch.device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torchvision

    info = {
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    info.update(extra or {})
    return info


def add_file_log(run_dir: Path) -> logging.Handler:
    """``train.log`` in the run dir (appended to on resume)."""
    handler = logging.FileHandler(run_dir / "train.log", mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO or logging.getLogger().level == logging.NOTSET:
        logging.getLogger().setLevel(logging.INFO)
    return handler


def progress_bar(total: int, initial: int, setting: str | bool, desc: str) -> tqdm:
    """tqdm over optimiser steps; ``auto`` shows it only on a terminal."""
    disable = None if str(setting).lower() == "auto" else not _truthy(setting)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable, dynamic_ncols=True, leave=False)


def _truthy(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


# --- wandb ----------------------------------------------------------------------------------------
def wandb_logged_in() -> bool:
    """True when wandb credentials exist locally: WANDB_API_KEY or a netrc entry for its host.

    Reads files only; never contacts a server and never prompts.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str) -> str:
    requested = str(requested).lower()
    if requested not in ("auto", "offline", "online", "disabled"):
        raise ValueError(f"logger.mode={requested!r} is not one of ['auto', 'offline', 'online', 'disabled']")
    if requested == "auto":
        return "online" if wandb_logged_in() else "offline"
    if requested == "online" and not wandb_logged_in():
        raise ValueError("logger.mode=online but no wandb credentials were found (WANDB_API_KEY or ~/.netrc); "
                         "run `wandb login`, or use logger.mode=offline")
    return requested


class WandbRun:
    """A wandb run for one training run: group = experiment, name = numerics preset."""

    def __init__(self, run_dir: Path, logger_cfg: dict[str, Any], config: dict[str, Any], run_id: str | None):
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        import wandb

        self.wandb = wandb
        self.mode = wandb_mode(logger_cfg.get("mode", "auto"))
        self.run = wandb.init(
            project=logger_cfg.get("project") or "intrain",
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group"),
            name=logger_cfg.get("run_name"),
            tags=list(logger_cfg.get("tags") or []),
            config=config,
            dir=str(run_dir),
            mode=self.mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                    disable_code=True, x_save_requirements=False),
        )
        log.info("wandb: %s run %s, group %s (%s)", self.mode, self.run.name, self.run.group, self.run.dir)

    @property
    def id(self) -> str:
        return self.run.id

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "id": self.run.id, "project": self.run.project, "group": self.run.group,
                "name": self.run.name, "dir": str(self.run.dir)}

    def log(self, row: dict[str, Any]) -> None:
        data = {k: v for k, v in row.items() if v is not None and k != "step"}
        self.run.log(data, step=int(row["step"]))

    def log_coverage(self, report: dict[str, Any], files: Iterable[Path]) -> None:
        columns = ["phase", "layer", "op", "arithmetic", "calls", "macs"]
        table = self.wandb.Table(columns=columns, data=[[e[c] for c in columns] for e in report["entries"]])
        self.run.log({"coverage/ops": table}, commit=False)
        self.run.summary["coverage/integer_mac_share"] = report["integer_mac_share"]
        self.run.config.update({"coverage": {"integer_mac_share": report["integer_mac_share"],
                                             "float_ops": report["float_ops"]}}, allow_val_change=True)
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
