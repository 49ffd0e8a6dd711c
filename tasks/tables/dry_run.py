"""A table's rows built without data: every row's experiment composed with each preset, validated
against the schemas, and its model and optimiser built."""
from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tasks.tables.spec import Table, compose_row

PLACEHOLDER = "/dry-run"  # stands for a value read from the environment (data root, weights): never read


def dry_run(table: Table, runs_dir: Path) -> list[str]:
    """Compose and validate the config, build model and optimiser, for every row and preset."""
    built = []
    for row in table.rows:
        for preset in table.presets:
            cfg = compose_row(row.experiment, f"numerics={preset}", f"runs_dir={runs_dir}",
                              f"experiment_name={row.name}", f"run_name={preset}")
            without_environment(cfg)
            built.append(build(cfg, runs_dir / row.name / preset))
    return built


def without_environment(cfg: DictConfig) -> None:
    """Every ``${oc.env:...}`` value of ``cfg`` becomes the placeholder, so no variable need be set."""
    def paths(node, prefix=()):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, str) and "${oc.env:" in value:
                yield (*prefix, key)
            yield from paths(value, (*prefix, key))

    for path in list(paths(OmegaConf.to_container(cfg, resolve=False))):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = PLACEHOLDER


def build(cfg: DictConfig, run_dir: Path) -> str:
    """Validate ``cfg`` and build its model and optimiser; one line saying what was built."""
    from intrain_core import Numerics
    from tasks.common.schema import validate

    validate(cfg)
    numerics = Numerics.from_dict(OmegaConf.to_container(cfg.numerics, resolve=True))
    if cfg.task.family == "classification":
        return build_classification(cfg, numerics)
    return build_openmmlab(cfg, run_dir)


def build_classification(cfg: DictConfig, numerics) -> str:
    from intrain_core.optim import build_optimizer
    from tasks.classification import build_model

    classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "digits": 10}[cfg.dataset.name]
    model = build_model(cfg.task, classes, 3, int(cfg.dataset.image_size))
    optimizer = build_optimizer(model.parameters(), numerics, lr=float(cfg.task.lr), momentum=0.9)
    return f"{cfg.task.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {type(optimizer).__name__}"


def build_openmmlab(cfg: DictConfig, run_dir: Path) -> str:
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    import tasks.openmmlab_hooks  # noqa: F401  (IntSGD in mmengine's registry)
    from tasks.openmmlab import build_mm_config

    family = importlib.import_module(f"tasks.{cfg.task.family}").FAMILY
    mm = build_mm_config(cfg, run_dir, family, None, check_data=False)
    init_default_scope(family.package)
    model = importlib.import_module(f"{family.package}.registry").MODELS.build(mm.model)
    wrapper = build_optim_wrapper(model, mm.optim_wrapper)
    return f"{cfg.task.mm_config}: {type(wrapper.optimizer).__name__}"
