"""The classification run: restore, train one epoch, validate, save, until the schedule ends.

Data order is a function of (seed, epoch) alone and every random stream is saved in the
checkpoint, so a run resumed in a new process continues bit-identically.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from intrain_core import Numerics, context_of, convert
from intrain_core.distributed import register_integer_allreduce, uses_integer_allreduce
from intrain_core.optim import build_optimizer
from tasks.checkpoint import CheckpointError, config_diff, load_checkpoint, rng_state, save_checkpoint, \
    seed_everything, set_rng_state
from tasks.classification.data import epoch_order, epoch_seed, make_loader
from tasks.classification.evaluation import evaluate
from tasks.classification.models import build_model
from tasks.classification.pretrained import load_pretrained
from tasks.classification.schedule import lr_factor_fn
from tasks.common.coverage_step import coverage_step
from tasks.common import distributed
from tasks.common.errors import ConfigError
from tasks.common.nonfinite import NonFiniteGuard
from tasks.common.run_dir import LAST, open_run_dir, prepare_run_dir, write_run_info
from tasks.run_logging import MetricsCSV, WandbRun, progress_bar, write_yaml

log = logging.getLogger("intrain")

# Keys that must match between a checkpoint and the config resuming it.
IDENTITY_KEYS = ("task", "numerics", "dataset.name", "dataset.image_size", "dataset.augment", "trainer.batch_size",
                 "trainer.seed", "trainer.limit_train_batches", "experiment_name", "run_name")


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train and validate as ``cfg`` says, writing everything into ``run_dir``; return final metrics.

    Every check that can fail on a user's input (run dir, checkpoint, dataset, model, device)
    runs before anything is written. Under torchrun every process runs this; ``trainer.batch_size``
    is the global batch (tasks/common/distributed.py).
    """
    run_dir = Path(run_dir)
    ranks, device = distributed.start(cfg.trainer.device)
    return distributed.run_in_group(ranks, _run, cfg, run_dir, ranks, device)


def _run(cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks, device: torch.device) -> dict[str, Any]:
    from tasks.datasets import build_datasets

    tr, ds = cfg.trainer, cfg.dataset
    config = OmegaConf.to_container(cfg, resolve=True)
    distributed.per_rank_batch(int(tr.batch_size), ranks)
    # Every rank checks (they see the same files); only rank 0 writes, after all have checked.
    ckpt_path = prepare_run_dir(run_dir, bool(tr.resume))
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path else None
    if checkpoint is not None:
        diffs = config_diff(checkpoint["config"], config, IDENTITY_KEYS)
        if diffs:
            raise CheckpointError(f"trainer.resume=true, but this config differs from the one {ckpt_path} was "
                                  f"trained with: {'; '.join(diffs)}")
        trained_with = int(checkpoint.get("world_size", 1))
        if trained_with != ranks.world_size and ranks.main:
            # Every state is the same on all processes and the global batches do not depend on
            # their number; only which process maps which images changes.
            log.warning("%s was trained by %d process(es) and continues with %d: the same global batches, but "
                        "not bit-identical to continuing with %d", ckpt_path, trained_with, ranks.world_size,
                        trained_with)
    if ranks.distributed:
        torch.distributed.barrier()

    splits = build_datasets(ds.name, root=ds.root, image_size=int(ds.image_size), augment=bool(ds.augment))
    steps_per_epoch = len(splits.train) // int(tr.batch_size)
    if tr.limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, int(tr.limit_train_batches))
    if steps_per_epoch < 1:
        raise ConfigError(f"trainer.batch_size={tr.batch_size} leaves no full batch in the {len(splits.train)} "
                          f"training images of {ds.name}")
    total_steps = int(tr.max_steps) if tr.max_steps is not None else int(tr.max_epochs) * steps_per_epoch

    seed_everything(int(tr.seed))
    model = build_model(cfg.task, splits.num_classes, splits.in_channels, int(ds.image_size))
    if cfg.task.checkpoint and checkpoint is None:
        load_pretrained(model, cfg.task.checkpoint, splits.num_classes)

    writes = open_run_dir(run_dir, new_run=checkpoint is None) if ranks.main else contextlib.nullcontext()
    with writes:
        loop = Loop.build(cfg, config, run_dir, device, splits, model, steps_per_epoch, total_steps, ranks)
        if checkpoint is not None:
            loop.restore(checkpoint, ckpt_path)
        return loop.run(checkpoint)


@dataclass
class Loop:
    """One run's training state, and the four things done with it."""

    cfg: DictConfig
    config: dict
    run_dir: Path
    device: torch.device
    splits: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    numerics: Numerics
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    elapsed0: float = 0.0
    wandb_id: str | None = None
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    started: float = field(default_factory=time.monotonic)
    ranks: distributed.Ranks = field(default_factory=distributed.Ranks)
    trained: nn.Module | None = None  # what the training forward calls: the model, or its DDP wrapper

    @classmethod
    def build(cls, cfg, config, run_dir, device, splits, model, steps_per_epoch, total_steps,
              ranks: distributed.Ranks = distributed.Ranks()) -> "Loop":
        t = cfg.task
        if cfg.trainer.deterministic and device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        numerics = Numerics.from_dict(config["numerics"])
        model = convert(model.to(device), numerics)
        optimizer = build_optimizer(model.parameters(), numerics, lr=float(t.lr), momentum=float(t.momentum),
                                    weight_decay=float(t.weight_decay), nesterov=bool(t.nesterov))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(t, steps_per_epoch, total_steps))
        criterion = nn.CrossEntropyLoss(label_smoothing=float(t.label_smoothing or 0.0))
        trained = model
        if ranks.distributed:
            trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
            if uses_integer_allreduce(numerics):
                register_integer_allreduce(trained)
        return cls(cfg, config, run_dir, device, splits, model, optimizer, scheduler, criterion, numerics,
                   steps_per_epoch, total_steps, guard=NonFiniteGuard(str(cfg.trainer.on_nonfinite), float(t.lr)),
                   ranks=ranks, trained=trained)

    # --- restore --------------------------------------------------------------------------------------
    def restore(self, checkpoint: dict, path: Path) -> None:
        ctx = context_of(self.model)
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if ctx is not None:
                ctx.load_state_dict(checkpoint["integer_context"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {exc}") from exc
        set_rng_state(checkpoint["rng"])
        self.step, self.elapsed0 = int(checkpoint["step"]), float(checkpoint.get("elapsed_s", 0.0))
        self.wandb_id = checkpoint.get("wandb_id")
        self.guard.skipped = int(checkpoint.get("nonfinite_skipped", 0))
        if self.ranks.main:
            log.info("resuming %s from step %d (epoch %d, batch %d)", path, self.step, checkpoint["epoch"],
                     checkpoint["batch_in_epoch"])

    # --- the whole run --------------------------------------------------------------------------------
    def run(self, checkpoint: dict | None) -> dict[str, Any]:
        tr = self.cfg.trainer
        self._announce()
        report = self._start_outputs() if checkpoint is None and self.ranks.main else None
        wandb_run = self._wandb(report) if self.ranks.main else None
        if self.ranks.main:
            write_run_info(self.run_dir, self.device, self.step if checkpoint is not None else None,
                           {"experiment_name": self.cfg.experiment_name, "run_name": self.cfg.run_name,
                            "world_size": self.ranks.world_size,
                            **({"wandb": wandb_run.describe()} if wandb_run else {})})
        self.metrics = (MetricsCSV(self.run_dir / "metrics.csv", resume_step=self.step if checkpoint else None)
                        if self.ranks.main else None)
        self.wandb_run = wandb_run
        self.started = time.monotonic()
        stop_after = int(tr.stop_after_epochs) if tr.get("stop_after_epochs") is not None else None
        bar = progress_bar(self.total_steps, self.step, tr.progress_bar, f"{self.numerics.name} {self.cfg.task.model}")
        last_val: dict[str, Any] = {}
        epochs = 0
        try:
            while self.step < self.total_steps:
                self.train_epoch(bar)
                epoch, batch_in_epoch = divmod(self.step, self.steps_per_epoch)
                # Taken before validation, written after its row: a run killed in between resumes
                # from the previous checkpoint and validates again, so no row is ever missing.
                state = self.state(epoch, batch_in_epoch)
                last_val = self.validate(epoch - 1 if batch_in_epoch == 0 else epoch)
                self.save(state)
                epochs += batch_in_epoch == 0
                if stop_after is not None and epochs >= stop_after and self.step < self.total_steps:
                    log.info("stopping after %d epoch(s) as trainer.stop_after_epochs says; continue with "
                             "trainer.resume=true", epochs)
                    break
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            if wandb_run:
                wandb_run.summary({k: v for k, v in last_val.items() if k != "step"})
                wandb_run.finish(exit_code=0 if sys.exc_info()[0] is None else 1)
        if self.step >= self.total_steps and not last_val:
            log.info("run %s is already complete (%d steps); nothing to do", self.run_dir, self.step)
        return {**last_val, "step": self.step, "run_dir": str(self.run_dir)}

    def _announce(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        t = self.cfg.task
        if not self.ranks.main:
            return
        processes = f" x {self.ranks.world_size} processes" if self.ranks.distributed else ""
        log.info("%s: %s (%s, %.2fM params) on %s%s, numerics %s, %d steps/epoch x %d epochs, run dir %s",
                 self.cfg.experiment_name, t.model, t.get("zoo", "auto"), n_params / 1e6, self.device, processes,
                 self.numerics.name, self.steps_per_epoch, math.ceil(self.total_steps / self.steps_per_epoch),
                 self.run_dir)

    def _start_outputs(self) -> dict[str, Any] | None:
        """A new run's config.yaml and, for integer numerics, its coverage report."""
        write_yaml(self.run_dir / "config.yaml", self.config)  # the config a resume must match is in the checkpoint
        if not self.numerics.integer:
            return None
        train_set = self.splits.train
        samples = [train_set[i] for i in range(min(int(self.cfg.trainer.batch_size), 32, len(train_set)))]
        x = torch.stack([s[0] for s in samples]).to(self.device)
        y = torch.as_tensor([int(s[1]) for s in samples]).to(self.device)
        return coverage_step(self.model, x, lambda out: self.criterion(out, y), self.optimizer, self.run_dir)

    def _wandb(self, report: dict[str, Any] | None) -> WandbRun | None:
        if not self.cfg.logger.get("wandb"):
            return None
        wandb_run = WandbRun(self.run_dir, OmegaConf.to_container(self.cfg.logger, resolve=True), self.config,
                             self.wandb_id)
        self.wandb_id = wandb_run.id
        if report is not None:
            wandb_run.log_coverage(report, [self.run_dir / "coverage.txt", self.run_dir / "coverage.json"])
        return wandb_run

    # --- train one epoch ------------------------------------------------------------------------------
    def train_epoch(self, bar) -> None:
        """The rest of the current epoch (from a mid-epoch checkpoint: its remaining batches)."""
        tr, seed, batch_size = self.cfg.trainer, int(self.cfg.trainer.seed), int(self.cfg.trainer.batch_size)
        epoch, skip = divmod(self.step, self.steps_per_epoch)
        if skip == 0:
            seed_everything(epoch_seed(seed, epoch))  # mid-epoch, the checkpoint restored the RNGs
        order = epoch_order(len(self.splits.train), seed, epoch)[skip * batch_size: self.steps_per_epoch * batch_size]
        order = distributed.rank_share(order, batch_size, self.ranks)
        loader = make_loader(self.splits.train, order, distributed.per_rank_batch(batch_size, self.ranks),
                             int(tr.num_workers), self.device, epoch_seed(seed, epoch), drop_last=True)
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            lr = self.optimizer.param_groups[0]["lr"]
            result = self.guard.attempt(self.step + 1, epoch, self._last_checkpoint(), self.model,
                                        lambda: self.train_step(x, y))
            self.scheduler.step()
            self.step += 1
            if result is not None:
                out, loss = result
                if self.step % int(tr.log_every_n_steps) == 0 or self.step == self.total_steps:
                    correct, count = distributed.sum_over_ranks([(out.argmax(1) == y).sum().item(), y.numel()],
                                                                self.device)
                    self._log({"step": self.step, "epoch": epoch, "train/loss": loss, "lr": lr,
                               "train/acc1": 100.0 * correct / count, **self.guard.columns()})
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if self.step >= self.total_steps:
                break

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Forward, backward and update; a non-finite loss (or, when skipping, gradient) stops here."""
        out = self.trained(x)
        loss = self.criterion(out, y)
        # The mean over processes: every rank sees the same value (and stops on the same step).
        loss_value = distributed.sum_over_ranks([loss.item()], self.device)[0] / self.ranks.world_size
        self.guard.check_loss(loss_value, self.model)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.guard.check_gradients(self.model)
        self.optimizer.step()
        return out, loss_value

    def _last_checkpoint(self) -> Path | None:
        path = self.run_dir / LAST
        return path if path.is_file() else None

    def _log(self, row: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        row["time_s"] = round(self.elapsed0 + time.monotonic() - self.started, 3)
        self.metrics.write(row)
        if self.wandb_run:
            self.wandb_run.log(row)

    # --- validate -------------------------------------------------------------------------------------
    def validate(self, epoch: int) -> dict[str, Any]:
        tr = self.cfg.trainer
        # Each process scores every world_size-th image in batches of eval_batch_size / world_size,
        # so that limit_val_batches covers the same images as one process; the sums are added.
        shard = list(range(self.ranks.rank, len(self.splits.val), self.ranks.world_size))
        batch = max(1, int(tr.eval_batch_size) // self.ranks.world_size)
        loader = make_loader(self.splits.val, shard, batch, int(tr.num_workers), self.device, int(tr.seed),
                             drop_last=False)
        limit = int(tr.limit_val_batches) if tr.limit_val_batches is not None else None
        reduce = (lambda sums: distributed.sum_over_ranks(sums, self.device)) if self.ranks.distributed else None
        with self.guard.validation(self.step):
            metrics = evaluate(self.model, loader, self.device, self.splits.num_classes, limit, reduce)
        row = {"step": self.step, "epoch": epoch, **metrics}
        self._log(row)
        acc5 = f", acc5 {row['val/acc5']:.2f}%" if "val/acc5" in row else ""
        if self.ranks.main:
            log.info("epoch %d step %d: val loss %.4f, acc1 %.2f%%%s", epoch, self.step, row["val/loss"],
                     row["val/acc1"], acc5)
        return row

    # --- save -----------------------------------------------------------------------------------------
    def state(self, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        """Everything a resume needs, copied now (validation may run before it is written)."""
        ctx = context_of(self.model)
        return copy.deepcopy({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "integer_context": ctx.state_dict() if ctx is not None else None,
            "epoch": epoch, "step": self.step, "batch_in_epoch": batch_in_epoch, "rng": rng_state(),
            "config": self.config, "elapsed_s": self.elapsed0 + time.monotonic() - self.started,
            "wandb_id": self.wandb_id, "nonfinite_skipped": self.guard.skipped,
            "world_size": self.ranks.world_size,
        })

    def save(self, state: dict[str, Any]) -> None:
        if self.ranks.main:
            save_checkpoint(self.run_dir / LAST, state)
