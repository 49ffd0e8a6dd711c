"""Detection and segmentation through OpenMMLab: a Hydra config in, an mmengine Runner out.

The model, losses, data pipeline and evaluation come from a config file shipped inside the
installed mmdet/mmseg package (``task.mm_config``, e.g.
``mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py``); this module only overrides what the
run asks for (data root, schedule, batch size, image size, backbone depth, optimiser) and adds
intrain's hooks. The family-specific parts (datasets, class counts, metrics) are a ``Family``
given by ``tasks/detection.py`` and ``tasks/segmentation.py``.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

import torch

from tasks.checkpoint import CheckpointError
from tasks.common import distributed
from tasks.common.errors import ConfigError
from tasks.common.run_dir import open_run_dir, prepare_run_dir, write_run_info
from tasks.run_logging import write_yaml

log = logging.getLogger("intrain")

MM_LAST = "last_checkpoint"  # mmengine's pointer to the newest checkpoint in the work dir


@dataclass(frozen=True)
class Family:
    package: str  # "mmdet" | "mmseg"
    datasets: tuple[str, ...]  # dataset names this family can train on
    set_num_classes: Callable[[Any, int], None]
    set_depth: Callable[[Any, int], None]
    embedded_data: Callable[[Any, DictConfig], None]  # digits_det / digits_seg into the config
    columns: tuple[str, ...]
    metric_names: dict[str, str]  # mmengine metric key -> metrics.csv column
    metric_scale: dict[str, float]
    metric_when_empty: dict[str, float]  # what an evaluator's empty result means (no detections: AP 0)
    op_filter: str | None = None  # dotted name of convert's op_filter for this family


def require_openmmlab(task: str, package: str) -> None:
    """OpenMMLab is a separate install layer (classification never needs it): without it, a
    detection or segmentation run stops here, in one line, before anything is written."""
    import importlib

    for name in ("mmengine", "mmcv", "mmcv.ops", package):
        try:
            importlib.import_module(name)
        except (ImportError, AssertionError) as exc:  # mmdet/mmseg assert a compatible mmcv version
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"task={task} needs OpenMMLab, which is not installed here ({name}: {reason}); "
                              "run `make install-openmmlab` (builds mmcv once, about 20 minutes on 2 cores)") from None


def zoo_config_path(package: str, name: str) -> Path:
    """The config file ``name`` (``faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py``) inside ``package``."""
    import importlib

    name = name.split("::", 1)[1] if "::" in name else name
    root = Path(importlib.import_module(package).__file__).parent / ".mim" / "configs"
    path = root / name
    if not path.is_file():
        known = [str(p.relative_to(root)) for p in root.rglob("*.py") if "_base_" not in p.parts]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        raise ConfigError(f"task.mm_config={name!r} is not a config of the installed {package} (looked in {root})"
                          + (f"; did you mean {close}?" if close else ""))
    return path


def train_backbone_from_scratch(backbone) -> None:
    """Without pretrained weights, the zoo's frozen stem (frozen_stages) and eval-mode BN (norm_eval)
    would freeze random filters and leave activations unnormalised, so every stage trains and BN
    uses batch statistics, as in mmdet's own from-scratch configs."""
    if "frozen_stages" in backbone:
        backbone.frozen_stages = -1
    if "norm_eval" in backbone:
        backbone.norm_eval = False


def walk(node, fn) -> None:
    """Call ``fn`` on every dict in a nested config (pipelines, wrapped datasets, ...)."""
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            walk(value, fn)
    elif isinstance(node, (list, tuple)):
        for value in node:
            walk(value, fn)


def build_mm_config(cfg: DictConfig, run_dir: Path, family: Family, resume_step: int | None,
                    check_data: bool = True):
    """The mmengine config of this run; ``check_data=False`` (dry runs) skips the data folders."""
    from mmengine.config import Config, ConfigDict

    t, tr, ds = cfg.task, cfg.trainer, cfg.dataset
    if ds.name not in family.datasets:
        raise ConfigError(f"task={t.name} trains on {family.package} datasets, not dataset={ds.name}; "
                          f"choose one of {list(family.datasets)} (e.g. dataset={family.datasets[0]})")
    if _device_unsupported(str(tr.device)):
        raise ConfigError(f"trainer.device={tr.device}: mmengine places the model itself (CUDA when visible); "
                          "use trainer.device=auto, and CUDA_VISIBLE_DEVICES='' (or =N) to choose")
    mm = Config.fromfile(str(zoo_config_path(family.package, t.mm_config)))
    numerics = OmegaConf.to_container(cfg.numerics, resolve=True)
    _set_model(mm, cfg, family)
    _set_data(mm, cfg, family, check_data)
    by_epoch = _set_schedule(mm, cfg)
    _set_optimizer(mm, t, numerics)
    _set_hooks(mm, cfg, run_dir, family, resume_step, numerics, by_epoch)
    mm.work_dir = str(run_dir)
    mm.randomness = dict(seed=int(tr.seed), deterministic=bool(tr.deterministic) and _cuda(tr))
    mm.env_cfg = ConfigDict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                            dist_cfg=dict(backend="nccl"))
    ranks = distributed.launched()
    mm.launcher = "pytorch" if ranks.distributed else "none"
    if ranks.distributed:
        _set_distributed(mm, cfg, ranks)
    # A resume reads <run dir>/last_checkpoint; pretrained weights only start a new run.
    mm.load_from = str(Path(t.checkpoint).expanduser()) if t.get("checkpoint") and not tr.resume else None
    mm.resume = bool(tr.resume)
    mm.log_level = "WARNING"
    if t.get("mm_options"):  # any other key of the mm config, dotted: {model.neck.out_channels: 128}
        mm.merge_from_dict(OmegaConf.to_container(t.mm_options, resolve=True))
    return mm


def _set_distributed(mm, cfg: DictConfig, ranks: distributed.Ranks) -> None:
    """torchrun: mmengine's DDP wrapper on every process, ``trainer.batch_size`` the global batch.
    The process group is ours (tasks/common/distributed.py), so mmengine does not start one."""
    from mmengine.config import ConfigDict

    mm.train_dataloader.batch_size = distributed.per_rank_batch(int(cfg.trainer.batch_size), ranks)
    if not _cuda(cfg.trainer):
        # DDP refuses SyncBatchNorm and device_ids on CPU modules: batch statistics per process.
        walk(mm.model, lambda d: d.update(type="BN") if d.get("type") == "SyncBN" else None)
        mm.model_wrapper_cfg = ConfigDict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                          find_unused_parameters=bool(mm.get("find_unused_parameters", False)))


def _set_model(mm, cfg: DictConfig, family: Family) -> None:
    """No hub downloads (init_cfg/pretrained), the backbone depth, the class count."""
    t = cfg.task
    mm.model.pop("pretrained", None)
    walk(mm.model, lambda d: d.pop("init_cfg", None) if d.get("init_cfg", {}) and
         str(d["init_cfg"].get("type", "")) == "Pretrained" else None)
    if not t.get("checkpoint"):
        train_backbone_from_scratch(mm.model.backbone)
    if t.get("depth"):
        family.set_depth(mm.model, int(t.depth))
    family.set_num_classes(mm.model, int(cfg.dataset.num_classes))


def _set_data(mm, cfg: DictConfig, family: Family, check_data: bool) -> None:
    tr, ds = cfg.trainer, cfg.dataset
    if ds.name.startswith("digits"):
        if check_data:
            family.embedded_data(mm, cfg)
    else:
        _real_dataset(mm, ds, check_data)
    for key, size in (("train_dataloader", tr.batch_size), ("val_dataloader", tr.eval_batch_size),
                      ("test_dataloader", tr.eval_batch_size)):
        loader = mm[key]
        loader.batch_size = int(size)
        loader.num_workers = int(tr.num_workers)
        loader.persistent_workers = int(tr.num_workers) > 0
    mm.test_dataloader, mm.test_evaluator = mm.val_dataloader, mm.val_evaluator


def _set_schedule(mm, cfg: DictConfig) -> bool:
    """The training loop (iterations or epochs), validation and lr schedule; True when by epoch."""
    from mmengine.config import ConfigDict

    t, tr = cfg.task, cfg.trainer
    warmup = int(t.get("warmup_iters") or 0)
    if tr.max_steps is not None:
        total = int(tr.max_steps)
        every = int(tr.get("val_every_n_steps") or max(1, total // 4))
        mm.train_cfg = ConfigDict(type="IterBasedTrainLoop", max_iters=total, val_interval=every)
        by_epoch = False
    else:
        total = int(tr.max_epochs)
        mm.train_cfg = ConfigDict(type="EpochBasedTrainLoop", max_epochs=total, val_interval=1)
        by_epoch = True
    mm.val_cfg, mm.test_cfg = ConfigDict(type="ValLoop"), ConfigDict(type="TestLoop")
    if t.schedule != "zoo":
        mm.param_scheduler = _schedule(t, total, by_epoch, warmup)
    return by_epoch


def _set_optimizer(mm, t: DictConfig, numerics: dict) -> None:
    """The numerics pick SGD or IntSGD; no clipping (the paper adds none)."""
    from mmengine.config import ConfigDict

    integer_sgd = numerics["integer"] and numerics.get("optimizer", "intsgd") == "intsgd"
    optimizer = dict(type="IntSGD" if integer_sgd else "SGD", lr=float(t.lr), momentum=float(t.momentum),
                     weight_decay=float(t.weight_decay))
    if integer_sgd:
        optimizer["numerics"] = numerics
    mm.optim_wrapper = ConfigDict(type="OptimWrapper", optimizer=optimizer, clip_grad=None)
    mm.pop("auto_scale_lr", None)


def _set_hooks(mm, cfg: DictConfig, run_dir: Path, family: Family, resume_step: int | None, numerics: dict,
               by_epoch: bool) -> None:
    """Logging, checkpoints, the run's metrics and, for integer numerics, the conversion."""
    from mmengine.config import ConfigDict

    tr, ds = cfg.trainer, cfg.dataset
    mm.default_hooks.logger = ConfigDict(type="LoggerHook", interval=20)
    mm.default_hooks.checkpoint = ConfigDict(
        type="CheckpointHook", interval=1 if by_epoch else int(mm.train_cfg.val_interval), by_epoch=by_epoch,
        max_keep_ckpts=1, save_last=True, backend_args=dict(backend="intrain_atomic_local"))
    mm.default_hooks.pop("visualization", None)
    hooks = [dict(type="RunLogHook", run_dir=str(run_dir), columns=list(family.columns),
                  metric_names=family.metric_names, metric_scale=family.metric_scale,
                  metric_when_empty=family.metric_when_empty if ds.name.startswith("digits") or ds.name == "coco"
                  else {},
                  log_every_n_steps=int(tr.log_every_n_steps), resume_step=resume_step,
                  wandb=OmegaConf.to_container(cfg.logger, resolve=True) if cfg.logger.get("wandb") else None,
                  config=OmegaConf.to_container(cfg, resolve=True))]
    if numerics["integer"]:
        hooks.insert(0, dict(type="IntegerNumericsHook", numerics=numerics, run_dir=str(run_dir),
                             restore_context=bool(tr.resume), op_filter=family.op_filter))
    mm.custom_hooks = hooks


def _device_unsupported(device: str) -> bool:
    """mmengine puts the model on the first visible CUDA device, else the CPU."""
    import torch

    cuda = torch.cuda.is_available()
    return (device == "cpu" and cuda) or (device.startswith("cuda") and (not cuda or device not in ("cuda", "cuda:0")))


def _cuda(tr) -> bool:
    import torch

    return str(tr.device).startswith("cuda") or (str(tr.device) == "auto" and torch.cuda.is_available())


def _schedule(t, total: int, by_epoch: bool, warmup: int) -> list[dict]:
    schedulers = []
    if warmup:
        schedulers.append(dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0, end=warmup))
    if t.schedule == "cosine":
        schedulers.append(dict(type="CosineAnnealingLR", T_max=total, by_epoch=by_epoch, begin=0, end=total,
                               eta_min=0.0, convert_to_iter_based=by_epoch))
    elif t.schedule == "step":
        schedulers.append(dict(type="MultiStepLR", milestones=list(t.milestones), gamma=float(t.gamma),
                               by_epoch=by_epoch, begin=0, end=total))
    elif t.schedule != "constant":
        raise ConfigError(f"task.schedule={t.schedule!r} is not one of ['zoo', 'cosine', 'step', 'constant']")
    return schedulers


def _real_dataset(mm, ds, check_data: bool = True) -> None:
    """COCO, VOC, Cityscapes, ADE20K from a local folder: the zoo's dataset config, re-rooted."""
    from mmengine.config import Config

    root = Path(str(ds.root or "")).expanduser()
    if check_data and (not ds.root or not root.is_dir()):
        raise _dataset_error(f"dataset={ds.name} needs dataset.root=<folder>; {root if ds.root else 'none given'} "
                             f"is not a folder. Expected layout: {ds.layout}")
    missing = [p for p in ds.get("required", []) if not (root / p).exists()]
    if check_data and missing:
        raise _dataset_error(f"dataset={ds.name} at {root} lacks {missing}. Expected layout: {ds.layout}")
    if ds.get("mm_dataset"):
        package, name = str(ds.mm_dataset).split("::", 1)
        base = Config.fromfile(str(zoo_config_path(package, name)))
        for key in ("train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator", "test_evaluator"):
            if key in base:
                mm[key] = base[key]

    # The zoo's data root (e.g. "data/coco/") prefixes its evaluators' annotation paths too.
    zoo_roots = set()
    walk(mm.get("val_dataloader", {}), lambda d: zoo_roots.add(d["data_root"]) if "data_root" in d else None)

    def reroot(d):
        if "data_root" in d:
            d["data_root"] = str(root) + "/"
        if "ann_file" in d and d.get("type") in ("CocoMetric", "VOCMetric") and not os.path.isabs(d["ann_file"]):
            relative = next((d["ann_file"][len(r):] for r in zoo_roots if d["ann_file"].startswith(r)), d["ann_file"])
            d["ann_file"] = str(root / relative)
        d.pop("backend_args", None)
        if ds.get("image_size") and d.get("type") in ("Resize", "RandomResize") and "scale" in d:
            d["scale"] = (int(ds.image_size), int(ds.image_size))  # the zoo's scale otherwise
        if ds.get("image_size") and d.get("type") == "RandomCrop":
            d["crop_size"] = (int(ds.image_size), int(ds.image_size))

    for key in ("train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator", "test_evaluator"):
        if key in mm:
            walk(mm[key], reroot)
    if "data_root" in mm:  # the zoo files' own variable, kept in the dumped config
        mm.data_root = str(root) + "/"
    if ds.get("image_size") and "size" in mm.model.get("data_preprocessor", {}):
        mm.model.data_preprocessor.size = (int(ds.image_size), int(ds.image_size))


def _dataset_error(message: str) -> Exception:
    from tasks.datasets import DatasetError

    return DatasetError(message)


def run(cfg: DictConfig, run_dir: str | Path, family: Family) -> dict[str, Any]:
    """Train (and validate) ``cfg.task`` on ``cfg.dataset`` with mmengine; return the last metrics."""
    require_openmmlab(str(cfg.task.name), family.package)
    import tasks.openmmlab_hooks  # noqa: F401  (registers IntSGD, the hooks and the atomic backend)

    run_dir = Path(run_dir)
    tr = cfg.trainer
    ranks, _ = distributed.start(tr.device)  # torchrun: every process, gloo on CPU and NCCL on CUDA
    return distributed.run_in_group(ranks, _run, cfg, run_dir, family, ranks)


def _run(cfg: DictConfig, run_dir: Path, family: Family, ranks: distributed.Ranks) -> dict[str, Any]:
    from mmengine.runner import Runner

    tr = cfg.trainer
    # Every process checks (they see the same files); only rank 0 writes, after all have checked.
    prepare_run_dir(run_dir, bool(tr.resume), checkpoint_name=MM_LAST)
    resume_step = _resume_step(run_dir) if tr.resume else None
    mm = build_mm_config(cfg, run_dir, family, resume_step)
    if ranks.distributed:
        torch.distributed.barrier()
    writes = (open_run_dir(run_dir, new_run=resume_step is None, checkpoint_name=MM_LAST, outputs=("mm_config.py",))
              if ranks.main else contextlib.nullcontext())
    with writes:
        if ranks.main and resume_step is None:
            write_yaml(run_dir / "config.yaml", OmegaConf.to_container(cfg, resolve=True))
            mm.dump(str(run_dir / "mm_config.py"))
        if ranks.main:
            write_run_info(run_dir, _device(tr), resume_step, {"experiment_name": cfg.experiment_name,
                                                               "run_name": cfg.run_name, "world_size": ranks.world_size,
                                                               "mm_config": str(cfg.task.mm_config)})
        log.info("%s: %s on %s, numerics %s, run dir %s", cfg.experiment_name, cfg.task.mm_config, cfg.dataset.name,
                 cfg.numerics.name, run_dir)
        runner = Runner.from_cfg(mm)
        with _full_unpickling(resume_step is not None):
            runner.train()
        metrics = _last_metrics(run_dir) if ranks.main else {}  # rank 0 writes metrics.csv
        return {**metrics, "step": runner.iter, "run_dir": str(run_dir)}


@contextlib.contextmanager
def _full_unpickling(enabled: bool):
    """mmengine's resume calls ``torch.load`` without ``weights_only``, and its checkpoints hold
    numpy arrays and logging objects that torch's safe loader refuses. They are this run's own
    files (written by it, in its run directory), so the resume may unpickle them fully."""
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(key)
    if enabled:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if enabled:
            os.environ.pop(key) if previous is None else os.environ.__setitem__(key, previous)


def _device(tr):
    import torch

    return torch.device("cuda" if _cuda(tr) else "cpu")


def _resume_step(run_dir: Path) -> int:
    """The iteration of the checkpoint ``last_checkpoint`` names (metrics past it are dropped)."""
    import torch

    path = Path((run_dir / MM_LAST).read_text().strip())
    try:
        meta = torch.load(path, map_location="cpu", weights_only=False)["meta"]
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} (named by {run_dir / MM_LAST}) is corrupt or missing and "
                              f"cannot be resumed ({type(exc).__name__}: {exc}). Nothing was overwritten.") from exc
    return int(meta["iter"])


def _last_metrics(run_dir: Path) -> dict[str, float]:
    from tasks.curves import load_run

    run = load_run(run_dir)
    return {m: run.final(m) for m in run.val_metrics}
