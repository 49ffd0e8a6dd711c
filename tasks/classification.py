"""Image classification: a resolved config in, a trained model and a run directory out.

The model comes from its zoo by name (``torchvision.models.get_model`` or
``timm.create_model``), is converted once with ``intrain_core.convert``, and trains with the
optimizer ``intrain_core.optim.build_optimizer`` picks for the numerics. Data order is a
function of (seed, epoch) alone, and every random stream is saved in the checkpoint, so a
resumed run continues bit-identically.
"""
from __future__ import annotations

import bisect
import copy
import difflib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from intrain_core import Numerics, context_of, convert, coverage
from intrain_core.optim import build_optimizer
from tasks.checkpoint import (
    LAST,
    CheckpointError,
    load_checkpoint,
    prepare_run_dir,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from tasks.run_logging import MetricsCSV, WandbRun, add_file_log, progress_bar, run_info, write_yaml

log = logging.getLogger("intrain")


class ConfigError(ValueError):
    """A config value that cannot work (unknown model, device, schedule, ...)."""


# --- model ------------------------------------------------------------------------------------
def build_model(task: DictConfig | dict, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The task's model from its zoo, with ``num_classes`` outputs and random weights."""
    name, zoo = task["model"], task.get("zoo", "auto")
    kwargs = dict(task.get("model_kwargs") or {})
    if zoo == "auto":
        zoo = "torchvision" if name in _torchvision_models() else "timm"
    if zoo == "torchvision":
        model = _torchvision_model(name, num_classes, in_channels, kwargs, bool(task.get("cifar_stem")))
    elif zoo == "timm":
        model = _timm_model(name, num_classes, in_channels, image_size, task.get("patch_size"), kwargs)
    else:
        raise ConfigError(f"task.zoo={zoo!r} is not one of ['torchvision', 'timm', 'auto']")
    return model


def _torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_model(name, num_classes, in_channels, kwargs, cifar_stem) -> nn.Module:
    import torchvision

    available = _torchvision_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise ConfigError(f"torchvision has no classification model {name!r}"
                          + (f"; did you mean {close}?" if close else "") + " (for a timm model set task.zoo=timm)")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    stem = _first_conv(model)
    if stem is None:
        if cifar_stem or in_channels != 3:
            raise ConfigError(f"task.cifar_stem / {in_channels}-channel input is not supported for torchvision {name!r}")
        return model
    parent, attr, conv = stem
    if cifar_stem or conv.in_channels != in_channels:
        kernel, stride, padding = ((3, 3), (1, 1), (1, 1)) if cifar_stem else (conv.kernel_size, conv.stride, conv.padding)
        if cifar_stem and name.startswith(("mobilenet", "efficientnet", "mnasnet", "regnet")):
            kernel, padding = conv.kernel_size, conv.padding  # 3x3 already: only the stride changes
        setattr(parent, attr, nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None))
    if cifar_stem and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


def _first_conv(model: nn.Module):
    """(parent module, attribute name, conv) of the stem: the first Conv2d in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    return None


def _timm_model(name, num_classes, in_channels, image_size, patch_size, kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ConfigError(f"timm has no model {name!r}" + (f"; did you mean {close}?" if close else ""))
    if patch_size is not None:
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("patch_size", patch_size)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


# --- pretrained weights (task.checkpoint) ---------------------------------------------------------
def load_pretrained(model: nn.Module, path: str | Path, num_classes: int) -> None:
    """Load a local state dict into ``model``; the classifier head is skipped when it does not fit.

    Accepts .pth/.pt (a state dict, or a dict holding one under ``state_dict``/``model``) and
    .safetensors. For timm models the model family's own ``checkpoint_filter_fn`` adapts the
    weights (e.g. resizes ViT position embeddings to the image size). Anything else that does
    not match raises a ``CheckpointError`` naming the file and the keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"task.checkpoint: pretrained weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"task.checkpoint: {path} is corrupt or not a weights file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"task.checkpoint: {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None and type(model).__module__.startswith("timm."):
        try:
            state = filter_fn(state, model)
        except Exception as exc:
            raise CheckpointError(f"task.checkpoint: timm could not adapt {path} to {type(model).__name__}: {exc}") from exc

    own = model.state_dict()
    head = _classifier_prefixes(model, num_classes)
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k.startswith(head)]
    for k in skipped:
        del state[k]
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        problems = []
        for label, keys in (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {keys[:4]})")
        raise CheckpointError(f"task.checkpoint: {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    log.info("loaded pretrained weights from %s%s", path,
             f" (classifier head skipped: {skipped})" if skipped else "")


def _classifier_prefixes(model: nn.Module, num_classes: int) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        names = [names] if isinstance(names, str) else list(names)
    else:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes][-1:]
    return tuple(f"{n}." for n in names)


# --- schedule -----------------------------------------------------------------------------------------
def lr_factor_fn(task, steps_per_epoch: int, total_steps: int):
    """Per-step multiplier of the base lr: linear warmup, then cosine to 0, step decay, or constant."""
    warmup = int(round(float(task.get("warmup_epochs") or 0) * steps_per_epoch))
    schedule = task.get("schedule", "cosine")
    milestones = sorted(int(round(float(m) * steps_per_epoch)) for m in (task.get("milestones") or []))
    gamma = float(task.get("gamma", 0.1))
    if schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"task.schedule={schedule!r} is not one of ['cosine', 'step', 'constant']")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "step":
            return gamma ** bisect.bisect_right(milestones, s)
        return 1.0

    return factor


# --- data ---------------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation: a function of (seed, epoch) alone."""
    return (int(seed) * 1_000_003 + int(epoch) + 1) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


def _loader(dataset, indices, batch_size, num_workers, device, seed, drop_last):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, drop_last=drop_last,
        pin_memory=device.type == "cuda",
        # A dedicated generator: the loader's base seed never draws from the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"trainer.device={name!r} is not a device (cpu, cuda, cuda:N or auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu or auto")
    return device


# --- evaluation ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, device, num_classes, limit=None) -> dict[str, float]:
    """val/loss (plain cross-entropy), val/acc1 and val/acc5 (>= 5 classes), in percent.

    The integer context's generators are restored afterwards: validation never shifts the
    training's random stream, so how often it runs does not change the trajectory.
    """
    ctx = context_of(model)
    saved = ctx.state_dict() if ctx is not None else None
    was_training = model.training
    model.eval()
    total = loss_sum = correct1 = correct5 = 0
    try:
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            top = out.topk(min(5, num_classes), dim=1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
        if ctx is not None:
            ctx.load_state_dict({"generators": saved["generators"], "counters": dict(ctx.counters)})
    if total == 0:
        raise ConfigError("the validation set is empty (check trainer.limit_val_batches and the dataset)")
    metrics = {"val/loss": loss_sum / total, "val/acc1": 100.0 * correct1 / total}
    if num_classes >= 5:
        metrics["val/acc5"] = 100.0 * correct5 / total
    return metrics


# --- the run --------------------------------------------------------------------------------------------
# Keys that must match between a checkpoint and the config resuming it.
IDENTITY_KEYS = ("task", "numerics", "dataset.name", "dataset.image_size", "dataset.augment", "trainer.batch_size",
                 "trainer.seed", "trainer.limit_train_batches", "experiment_name", "run_name")


def _config_diff(saved: dict, current: dict) -> list[str]:
    diffs = []
    for key in IDENTITY_KEYS:
        a, b = _get(saved, key), _get(current, key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            else:
                diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train and validate as ``cfg`` says, writing everything into ``run_dir``; return final metrics.

    Every check that can fail on a user's input (run dir, checkpoint, dataset, model, device)
    runs before anything is written.
    """
    from tasks.datasets import build_datasets

    run_dir = Path(run_dir)
    t, tr, ds = cfg.task, cfg.trainer, cfg.dataset
    config = OmegaConf.to_container(cfg, resolve=True)
    numerics = Numerics.from_dict(config["numerics"])
    device = resolve_device(tr.device)
    seed = int(tr.seed)

    # Refuse to touch someone else's run before anything is written or loaded.
    ckpt_path = prepare_run_dir(run_dir, bool(tr.resume))
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path else None
    if checkpoint is not None:
        diffs = _config_diff(checkpoint["config"], config)
        if diffs:
            raise CheckpointError(f"trainer.resume=true, but this config differs from the one {ckpt_path} was "
                                  f"trained with: {'; '.join(diffs)}")

    splits = build_datasets(ds.name, root=ds.root, image_size=int(ds.image_size), augment=bool(ds.augment))
    batch_size = int(tr.batch_size)
    steps_per_epoch = len(splits.train) // batch_size
    if tr.limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, int(tr.limit_train_batches))
    if steps_per_epoch < 1:
        raise ConfigError(f"trainer.batch_size={batch_size} leaves no full batch in the {len(splits.train)} "
                          f"training images of {ds.name}")
    total_steps = int(tr.max_steps) if tr.max_steps is not None else int(tr.max_epochs) * steps_per_epoch

    seed_everything(seed)
    model = build_model(t, splits.num_classes, splits.in_channels, int(ds.image_size))
    if t.checkpoint and checkpoint is None:
        load_pretrained(model, t.checkpoint, splits.num_classes)

    run_dir.mkdir(parents=True, exist_ok=True)
    handler = add_file_log(run_dir)
    try:
        return _train(cfg, config, run_dir, numerics, device, checkpoint, ckpt_path, splits, model,
                      steps_per_epoch, total_steps)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _train(cfg, config, run_dir, numerics, device, checkpoint, ckpt_path, splits, model, steps_per_epoch,
           total_steps) -> dict[str, Any]:
    t, tr = cfg.task, cfg.trainer
    seed, batch_size = int(tr.seed), int(tr.batch_size)
    max_epochs = math.ceil(total_steps / steps_per_epoch)
    if tr.deterministic and device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    model = convert(model.to(device), numerics)
    ctx = context_of(model)
    optimizer = build_optimizer(model.parameters(), numerics, lr=float(t.lr), momentum=float(t.momentum),
                                weight_decay=float(t.weight_decay), nesterov=bool(t.nesterov))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(t, steps_per_epoch, total_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=float(t.label_smoothing or 0.0))

    step, elapsed0, wandb_id = 0, 0.0, None
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if ctx is not None:
                ctx.load_state_dict(checkpoint["integer_context"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this model/optimizer: {exc}") from exc
        set_rng_state(checkpoint["rng"])
        step, elapsed0 = int(checkpoint["step"]), float(checkpoint.get("elapsed_s", 0.0))
        wandb_id = checkpoint.get("wandb_id")
        log.info("resuming %s from step %d (epoch %d, batch %d)", ckpt_path, step, checkpoint["epoch"],
                 checkpoint["batch_in_epoch"])

    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s (%s, %.2fM params) on %s, numerics %s, %d steps/epoch x %d epochs, run dir %s",
             cfg.experiment_name, t.model, t.get("zoo", "auto"), n_params / 1e6, device, numerics.name,
             steps_per_epoch, max_epochs, run_dir)

    report = None
    info = run_info(device, {"experiment_name": cfg.experiment_name, "run_name": cfg.run_name,
                             "resumed_from_step": step if checkpoint is not None else None})
    log.info("git commit %s%s", info["git_commit"], " (with uncommitted changes)" if info["git_dirty"] else "")
    if checkpoint is None:
        write_yaml(run_dir / "config.yaml", config)  # the config a resume must match is in the checkpoint
        if numerics.integer:
            report = _coverage(model, optimizer, criterion, splits.train, device, batch_size, run_dir)

    wandb_run = None
    if cfg.logger.get("wandb"):
        wandb_run = WandbRun(run_dir, OmegaConf.to_container(cfg.logger, resolve=True), config, wandb_id)
        wandb_id = wandb_run.id
        if report is not None:
            wandb_run.log_coverage(report, [run_dir / "coverage.txt", run_dir / "coverage.json"])
        info["wandb"] = wandb_run.describe()
    write_yaml(run_dir / ("run_info.yaml" if checkpoint is None else f"run_info.resume-{step}.yaml"), info)

    metrics_csv = MetricsCSV(run_dir / "metrics.csv", resume_step=step if checkpoint is not None else None)
    val_loader = _loader(splits.val, list(range(len(splits.val))), int(tr.eval_batch_size), int(tr.num_workers),
                         device, seed, drop_last=False)
    limit_val = int(tr.limit_val_batches) if tr.limit_val_batches is not None else None

    def save(epoch, batch_in_epoch):
        save_checkpoint(run_dir / LAST, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "integer_context": ctx.state_dict() if ctx is not None else None,
            "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "rng": rng_state(),
            "config": config, "elapsed_s": elapsed0 + time.monotonic() - start, "wandb_id": wandb_id,
        })

    def validate(epoch):
        row = {"step": step, "epoch": epoch, **evaluate(model, val_loader, device, splits.num_classes, limit_val)}
        row["time_s"] = round(elapsed0 + time.monotonic() - start, 3)
        metrics_csv.write(row)
        if wandb_run:
            wandb_run.log(row)
        acc5 = f", acc5 {row['val/acc5']:.2f}%" if "val/acc5" in row else ""
        log.info("epoch %d step %d: val loss %.4f, acc1 %.2f%%%s", epoch, step, row["val/loss"], row["val/acc1"], acc5)
        return row

    start = time.monotonic()
    last_val: dict[str, Any] = {}
    epochs_this_call = 0
    stop_after = int(tr.stop_after_epochs) if tr.get("stop_after_epochs") is not None else None
    bar = progress_bar(total_steps, step, tr.progress_bar, f"{numerics.name} {t.model}")
    model.train()
    try:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            if skip == 0:
                seed_everything(epoch_seed(seed, epoch))  # mid-epoch, the checkpoint restored the RNGs
            order = epoch_order(len(splits.train), seed, epoch)[skip * batch_size: steps_per_epoch * batch_size]
            loader = _loader(splits.train, order, batch_size, int(tr.num_workers), device, epoch_seed(seed, epoch),
                             drop_last=True)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss = criterion(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step += 1
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"the training loss is {loss_value} at step {step} (epoch {epoch}); "
                                             f"stopping. The last checkpoint is {run_dir / LAST}")
                if step % int(tr.log_every_n_steps) == 0 or step == total_steps:
                    row = {"step": step, "epoch": epoch, "train/loss": loss_value,
                           "train/acc1": 100.0 * (out.argmax(1) == y).float().mean().item(), "lr": lr,
                           "time_s": round(elapsed0 + time.monotonic() - start, 3)}
                    metrics_csv.write(row)
                    if wandb_run:
                        wandb_run.log(row)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", refresh=False)
                if step >= total_steps:
                    break
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            finished = epoch - 1 if batch_in_epoch == 0 else epoch
            save(epoch, batch_in_epoch)  # before validation, which never moves the training's RNG
            last_val = validate(finished)
            if batch_in_epoch == 0:
                epochs_this_call += 1
            if stop_after is not None and epochs_this_call >= stop_after and step < total_steps:
                log.info("stopping after %d epoch(s) as trainer.stop_after_epochs says; continue with "
                         "trainer.resume=true", epochs_this_call)
                break
    finally:
        bar.close()
        metrics_csv.close()
        if wandb_run:
            wandb_run.summary({k: v for k, v in last_val.items() if k != "step"})
            wandb_run.finish(exit_code=0 if sys.exc_info()[0] is None else 1)
    if step >= total_steps and not last_val:
        log.info("run %s is already complete (%d steps); nothing to do", run_dir, step)
    return {**last_val, "step": step, "run_dir": str(run_dir)}


def _coverage(model, optimizer, criterion, train_set, device, batch_size, run_dir) -> dict[str, Any]:
    """Coverage of one training step, written to coverage.txt/.json. The step is then undone
    (weights, BN statistics, optimiser state, global RNGs); the rounding streams go on after its draws."""
    n = min(batch_size, 32, len(train_set))
    samples = [train_set[i] for i in range(n)]
    x = torch.stack([s[0] for s in samples]).to(device)
    y = torch.as_tensor([int(s[1]) for s in samples]).to(device)
    ctx = context_of(model)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), ctx.state_dict(), rng_state())
    report = coverage(model, x, loss_fn=lambda out: criterion(out, y), optimizer=optimizer)
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    ctx.load_state_dict(saved[2])
    set_rng_state(saved[3])
    (run_dir / "coverage.txt").write_text(report.table() + "\n")
    data = report.to_dict()
    (run_dir / "coverage.json").write_text(json.dumps(data, indent=2) + "\n")
    log.info("integer MAC share %.4f%% (coverage report: %s)", 100 * report.integer_mac_share, run_dir / "coverage.txt")
    return data
