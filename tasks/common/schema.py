"""Config schemas: the type and allowed range of every ``trainer``, ``numerics``, ``logger`` key and
of the common ``task`` and ``dataset`` keys, checked right after Hydra composes the config.

Each schema is a dataclass registered in Hydra's ConfigStore (group ``schema``); a field's
``metadata`` holds its range (``min``, ``gt``, ``max``, ``lt``, ``choices``, ``pattern``).
``numerics`` is ``intrain_core.Numerics`` itself: its types come from the dataclass and its ranges
from ``Numerics.__post_init__``. ``validate`` raises a ``ConfigError`` of one line naming the key,
the value and what is allowed; nothing has been written when it does.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from intrain_core import Numerics
from tasks.common.errors import ConfigError

FAMILIES = ("classification", "detection", "segmentation")


def _range(default: Any = None, **limits: Any) -> Any:
    mutable = isinstance(default, (list, dict))
    factory = {"default_factory": lambda: type(default)(default)} if mutable else {"default": default}
    return field(metadata=limits, **factory)


@dataclass
class TrainerSchema:
    max_epochs: int = _range(5, min=1)
    max_steps: Optional[int] = _range(None, min=1)
    batch_size: int = _range(32, min=1)
    eval_batch_size: int = _range(256, min=1)
    seed: int = _range(0, min=0)
    device: str = _range("auto", pattern=(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"))
    resume: bool = False
    num_workers: int = _range(0, min=0)
    log_every_n_steps: int = _range(1, min=1)
    val_every_n_steps: Optional[int] = _range(None, min=1)
    limit_train_batches: Optional[int] = _range(None, min=1)
    limit_val_batches: Optional[int] = _range(None, min=1)
    progress_bar: Any = _range("auto", choices=("auto", True, False))
    deterministic: bool = True
    stop_after_epochs: Optional[int] = _range(None, min=1)
    on_nonfinite: str = _range("stop", choices=("stop", "skip"))


@dataclass
class TaskSchema:
    """Keys every task family reads."""

    name: str = "custom"
    family: str = _range("classification", choices=FAMILIES)
    checkpoint: Optional[str] = None
    lr: float = _range(0.01, min=0.0)
    momentum: float = _range(0.9, min=0.0, max=1.0)
    weight_decay: float = _range(0.0, min=0.0)
    schedule: str = _range("cosine", choices=("cosine", "step", "constant", "zoo"))
    milestones: list[float] = _range([])
    gamma: float = _range(0.1, gt=0.0)


@dataclass
class ClassificationTaskSchema(TaskSchema):
    zoo: str = _range("auto", choices=("torchvision", "timm", "auto"))
    model: str = "resnet18"
    cifar_stem: bool = False
    patch_size: Optional[int] = _range(None, min=1)
    model_kwargs: dict = _range({})
    nesterov: bool = False
    warmup_epochs: float = _range(0.0, min=0.0)
    label_smoothing: float = _range(0.0, min=0.0, lt=1.0)


@dataclass
class OpenMMLabTaskSchema(TaskSchema):
    mm_config: str = ""
    depth: Optional[int] = _range(None, min=1)
    mm_options: Optional[dict] = None
    warmup_iters: int = _range(0, min=0)


@dataclass
class DatasetSchema:
    name: str = "digits"
    root: Optional[str] = None
    image_size: Optional[int] = _range(32, min=1)  # null: the dataset's own sizes (COCO, VOC)
    augment: bool = True
    num_classes: int = _range(10, min=1)
    num_train: int = _range(400, min=1)
    num_val: int = _range(100, min=1)
    background_weight: float = _range(1.0, min=0.0)


@dataclass
class LoggerSchema:
    name: str = "csv"
    wandb: bool = False
    mode: str = _range("auto", choices=("auto", "offline", "online", "disabled"))
    project: str = "intrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    run_name: Optional[str] = None
    tags: list[str] = _range([])


SCHEMAS = {"trainer": TrainerSchema, "numerics": Numerics, "task": TaskSchema, "dataset": DatasetSchema,
           "logger": LoggerSchema}
# Sections whose every key is known: any other key is refused.
CLOSED = ("trainer", "numerics", "logger")


def register() -> None:
    """The schemas in Hydra's ConfigStore as ``schema/<section>`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for section, schema in SCHEMAS.items():
        store.store(group="schema", name=section, node=schema)


def validate(cfg: DictConfig) -> None:
    """Refuse a composed config whose values have a wrong type or leave their range."""
    for section in SCHEMAS:
        node = cfg.get(section)
        if node is None:
            continue
        missing = [k for k in node if OmegaConf.is_missing(node, k)]
        if missing:
            raise ConfigError(f"{section}.{missing[0]} is required: pass {section}.{missing[0]}=...")
        try:
            values = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{section}: {str(exc).splitlines()[0]}") from exc
        check_section(section, values, _schema_of(section, values))
    numerics = OmegaConf.to_container(cfg.numerics, resolve=True)
    try:
        Numerics.from_dict(numerics)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _schema_of(section: str, values: dict) -> type:
    if section != "task":
        return SCHEMAS[section]
    check_section("task", {"family": values.get("family", "classification")}, TaskSchema)
    return ClassificationTaskSchema if values.get("family", "classification") == "classification" else OpenMMLabTaskSchema


def check_section(section: str, values: dict, schema: type) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        if key not in fields:
            if section in CLOSED:
                raise ConfigError(f"{section}.{key} is not a {section} key; valid keys: {sorted(fields)}")
            continue
        meta = fields[key].metadata
        if not (_has_type(value, hints[key]) and _in_range(value, meta)):
            raise ConfigError(f"{section}.{key}={_show(value)}: must be {_describe(hints[key], meta)}")


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Union:
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    raise TypeError(f"schema type {hint} is not supported")


def _in_range(value: Any, meta: typing.Mapping[str, Any]) -> bool:
    if value is None or isinstance(value, (list, tuple, dict)):
        return True
    checks = {"min": lambda v, m: v >= m, "gt": lambda v, m: v > m, "max": lambda v, m: v <= m,
              "lt": lambda v, m: v < m, "choices": lambda v, m: any(v == c and type(v) is type(c) for c in m),
              "pattern": lambda v, m: re.fullmatch(m[0], str(v)) is not None}
    return all(check(value, meta[name]) for name, check in checks.items() if name in meta)


def _describe(hint: Any, meta: typing.Mapping[str, Any]) -> str:
    if "choices" in meta:
        text = "one of [" + ", ".join(_show(c) for c in meta["choices"]) + "]"
    elif "pattern" in meta:
        text = meta["pattern"][1]
    else:
        text = _type_name(hint)
        bounds = [f"{op} {meta[name]}" for name, op in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<"))
                  if name in meta]
        text += (" " + " and ".join(bounds)) if bounds else ""
    return text + (" or null" if type(None) in typing.get_args(hint) else "")


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return _type_name(args[0])
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "a mapping"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint) or hint
    return "a list" + (f" of {_type_name(args[0]).split(' ', 1)[1]}s" if args else "") if origin in (list, tuple) \
        else str(hint)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)
