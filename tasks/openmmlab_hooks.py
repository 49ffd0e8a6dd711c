"""intrain inside mmengine, through its extension points only (no OpenMMLab code is edited).

- ``IntSGD`` is registered in mmengine's optimiser registry: ``optimizer=dict(type='IntSGD', ...)``.
- ``IntegerNumericsHook`` calls ``intrain_core.convert`` on the runner's model before training
  or evaluation, writes the coverage report, and keeps the integer RNG state in checkpoints.
- ``RunLogHook`` writes the same ``metrics.csv`` (and wandb run) as classification runs, and
  logs a progress line every ``progress_every`` iterations (stdout and ``train.log``).
- ``AtomicLocalBackend`` makes mmengine's checkpoint writes atomic (temp file, fsync, rename).
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mmengine.dist import is_main_process
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, OPTIMIZERS
from mmengine.runner import EpochBasedTrainLoop

from intrain_core import Numerics, context_of, convert, coverage
from intrain_core.distributed import register_integer_allreduce, uses_integer_allreduce
from intrain_core.optim import IntSGD
from tasks.checkpoint import rng_state, set_rng_state
from tasks.run_logging import MetricsCSV, WandbRun

log = logging.getLogger("intrain")

ATOMIC_BACKEND = "intrain_atomic_local"
if "IntSGD" not in OPTIMIZERS.module_dict:
    OPTIMIZERS.register_module(name="IntSGD", module=IntSGD)


class AtomicLocalBackend(LocalBackend):
    """A killed run leaves the previous checkpoint whole, never half of a new one."""

    def put(self, obj: bytes, filepath) -> None:
        _atomic_write(Path(filepath), obj)

    def put_text(self, obj: str, filepath, encoding: str = "utf-8") -> None:
        _atomic_write(Path(filepath), obj.encode(encoding))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


def _model_of(runner) -> torch.nn.Module:
    model = runner.model
    return getattr(model, "module", model)  # unwrap (Distributed)DataParallel


def _record_compiled_op(ctx, layer: str, module, args, output) -> None:
    """mmcv's compiled ops (RoIAlign, ...) run in float: named in the coverage report.

    RoIAlign interpolates bilinearly: 4 products per sampling point, sampling_ratio**2 points
    per output element (at least one where the ratio is adaptive, 0).
    """
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return
    op = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", type(module).__name__).lower()
    points = max(1, int(getattr(module, "sampling_ratio", 0) or 0)) ** 2
    macs = output.numel() * 4 * points if hasattr(module, "sampling_ratio") else 0
    ctx.record(op, "forward", False, macs, layer)
    if output.requires_grad:
        ctx.record(op, "backward", False, macs, layer)


def _resolve(dotted: str | None):
    """A function from its dotted name (configs are text: mm_config.py names the filter)."""
    if dotted is None:
        return None
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@HOOKS.register_module(force=True)
class IntegerNumericsHook(Hook):
    """Converts the model to ``numerics`` once, after weights are initialised or resumed."""

    priority = "VERY_HIGH"

    def __init__(self, numerics: dict, run_dir: str, coverage_samples: int = 2, restore_context: bool = True,
                 op_filter: str | None = None):
        self.numerics = Numerics.from_dict(dict(numerics))
        self.op_filter = _resolve(op_filter)
        self.run_dir = Path(run_dir)
        self.coverage_samples = coverage_samples
        # Only a resume continues the checkpoint's rounding streams; weights that start a new run
        # (task.checkpoint) leave this run's own, seeded by numerics.seed.
        self.restore_context = restore_context
        self._resumed_context: dict | None = None
        # Decided before any process writes: every process runs the coverage step (it moves the
        # rounding stream, which must move alike on all; a SyncBatchNorm in it synchronises).
        self._coverage = not (self.run_dir / "coverage.json").exists()

    def _convert(self, runner) -> None:
        model = _model_of(runner)
        if context_of(model) is not None:
            return
        convert(model, self.numerics, op_filter=self.op_filter)
        ctx = context_of(model)
        for name, module in model.named_modules():
            if type(module).__module__.startswith("mmcv.ops"):  # compiled kernels: no torch function to see
                module.register_forward_hook(functools.partial(_record_compiled_op, ctx, name))
        if self._resumed_context is not None:
            ctx.load_state_dict(self._resumed_context)
        if isinstance(runner.model, torch.nn.parallel.DistributedDataParallel) and uses_integer_allreduce(self.numerics):
            register_integer_allreduce(runner.model)

    def before_train(self, runner) -> None:
        self._convert(runner)
        if self._resumed_context is None and self._coverage:
            self._write_coverage(runner)

    def before_val(self, runner) -> None:
        self._convert(runner)

    def before_test(self, runner) -> None:
        self._convert(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        ctx = context_of(_model_of(runner))
        if ctx is not None:
            checkpoint["intrain_integer_context"] = ctx.state_dict()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.restore_context:
            return
        self._resumed_context = checkpoint.get("intrain_integer_context")
        ctx = context_of(_model_of(runner))
        if ctx is not None and self._resumed_context is not None:
            ctx.load_state_dict(self._resumed_context)

    def _write_coverage(self, runner) -> None:
        """One real training step's op report. The step is undone (weights, BN statistics, optimiser
        state, global RNGs), but the integer rounding streams go on after its draws: a run whose
        folder already has coverage.json skips the step and draws a different stream."""
        from mmengine.dataset import pseudo_collate

        model = _model_of(runner)
        dataset = runner.train_dataloader.dataset
        optimizer = runner.optim_wrapper.optimizer
        ctx = context_of(model)
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), ctx.state_dict(),
                 rng_state())
        batch = pseudo_collate([dataset[i] for i in range(min(self.coverage_samples, len(dataset)))])
        data = model.data_preprocessor(batch, True)
        report = coverage(model, {**data, "mode": "loss"}, loss_fn=lambda losses: model.parse_losses(losses)[0],
                          optimizer=optimizer)
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        ctx.load_state_dict(saved[2])
        set_rng_state(saved[3])
        if not is_main_process():
            return
        (self.run_dir / "coverage.txt").write_text(report.table() + "\n")
        (self.run_dir / "coverage.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        log.info("integer MAC share %.4f%% (coverage report: %s)", 100 * report.integer_mac_share,
                 self.run_dir / "coverage.txt")


@HOOKS.register_module(force=True)
class RunLogHook(Hook):
    """``metrics.csv`` rows (and wandb points) in the classification runner's format.

    ``metric_names`` maps mmengine's metric keys (``coco/bbox_mAP``, ``mIoU``) to columns
    (``val/bbox_mAP``); ``metric_scale`` turns fractions into percent, like accuracies.
    ``progress_every`` (0: a tenth of the run, at most 50) spaces the progress lines; mmengine's
    own logger stays at WARNING, so these lines are what a run without a terminal shows.
    """

    priority = "NORMAL"  # before ParamSchedulerHook (LOW): the lr logged is the lr used

    def __init__(self, run_dir: str, columns: list[str], metric_names: dict, metric_scale: dict,
                 log_every_n_steps: int = 1, resume_step: int | None = None, wandb: dict | None = None,
                 config: dict | None = None, metric_when_empty: dict | None = None, progress_every: int = 0):
        self.run_dir = Path(run_dir)
        self.columns = tuple(columns)
        self.metric_names, self.metric_scale = dict(metric_names), dict(metric_scale)
        self.metric_when_empty = dict(metric_when_empty or {})
        self.every = max(1, int(log_every_n_steps))
        self.resume_step = resume_step
        self.wandb_cfg, self.config = wandb, config
        self.csv: MetricsCSV | None = None
        self.wandb_run: WandbRun | None = None
        self.start = time.monotonic()
        self.progress_every = int(progress_every)
        self._mark: tuple[int, float] = (0, self.start)  # (iteration, time) of the last progress line

    def before_run(self, runner) -> None:
        if not is_main_process():  # only rank 0 writes the run directory
            return
        self.csv = MetricsCSV(self.run_dir / "metrics.csv", resume_step=self.resume_step, columns=self.columns)
        if self.wandb_cfg:
            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            self.wandb_run = WandbRun(self.run_dir, self.wandb_cfg, self.config or {}, run_id)
            id_file.write_text(self.wandb_run.id + "\n")

    def before_train(self, runner) -> None:
        if self.progress_every <= 0:
            self.progress_every = max(1, min(50, runner.max_iters // 10))
        self._mark = (runner.iter, time.monotonic())
        report = self.run_dir / "coverage.json"
        if self.wandb_run is not None and report.is_file():
            self.wandb_run.log_coverage(json.loads(report.read_text()),
                                        [self.run_dir / "coverage.txt", report])

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs: dict | None = None) -> None:
        step = runner.iter + 1
        loss = float(outputs["loss"].detach()) if outputs and "loss" in outputs else math.nan
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss} at step {step} (epoch {runner.epoch}); stopping. "
                                     f"The last checkpoint is in {self.run_dir}")
        if step % self.every == 0 or step == runner.max_iters:
            lr = runner.optim_wrapper.get_lr()["lr"][0]
            self._write({"step": step, "epoch": runner.epoch, "train/loss": loss, "lr": lr})
        if step % self.progress_every == 0 or step == runner.max_iters:
            self._progress(runner, step, loss)

    def _progress(self, runner, step: int, loss: float) -> None:
        now = time.monotonic()
        per_step = (now - self._mark[1]) / max(1, step - self._mark[0])
        self._mark = (step, now)
        left = (runner.max_iters - step) * per_step
        loop = runner.train_loop
        epoch = f" (epoch {runner.epoch + 1}/{loop.max_epochs})" if isinstance(loop, EpochBasedTrainLoop) else ""
        log.info("step %d/%d%s: loss %.4f, lr %.3g, %.2f s/step, training left about %s", step, runner.max_iters,
                 epoch, loss, runner.optim_wrapper.get_lr()["lr"][0], per_step, _duration(left))

    def before_val_epoch(self, runner) -> None:
        batches = len(runner.val_dataloader)
        log.info("step %d: validating (%d batch%s)", runner.iter, batches, "" if batches == 1 else "es")

    def after_val_epoch(self, runner, metrics: dict | None = None) -> None:
        self._mark = (runner.iter, time.monotonic())  # the next s/step leaves validation out
        row = {"step": runner.iter, "epoch": max(0, runner.epoch - 1) if runner.epoch else 0}
        if not metrics and self.metric_when_empty:
            # mmdet's CocoMetric returns nothing when the model detects nothing: that is an AP of 0.
            log.warning("step %d: no detections on the validation set; recording AP 0", runner.iter)
            metrics = dict(self.metric_when_empty)
        for key, value in (metrics or {}).items():
            column = self.metric_names.get(key)
            if column is not None:
                row[column] = float(value) * self.metric_scale.get(key, 1.0)
        self._write(row)
        log.info("step %d: %s", runner.iter, ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("val/")))

    def _write(self, row: dict[str, Any]) -> None:
        if self.csv is None:
            return
        row["time_s"] = round(time.monotonic() - self.start, 3)
        self.csv.write(row)
        if self.wandb_run is not None:
            self.wandb_run.log(row)

    def after_run(self, runner) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
