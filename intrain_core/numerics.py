"""The whole numerics choice of a run, as one frozen value (docs/numerics-contract.md section 11)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .rounding import ROUNDINGS

# Package data: the same files train.py's Hydra reads (hydra.searchpath in configs/config.yaml).
PRESET_DIR = Path(__file__).resolve().parent / "configs" / "numerics"

OP_FAMILIES = ("linear", "conv", "matmul", "norm", "add", "pool")


@dataclass(frozen=True)
class Numerics:
    """How every arithmetic op of a converted model runs.

    Roles: ``forward_bits`` for the operands of the forward pass (activations and weights),
    ``backward_bits`` for the incoming gradient of the backward pass.
    """

    name: str = "custom"
    integer: bool = True  # False: plain float32 (the fp32 baseline); convert() is a no-op
    forward_bits: int = 8
    backward_bits: int = 8
    rounding: str = "stochastic"  # or "nearest" (ablation)
    backward: str = "integer"  # or "float": integer forward only (int8_fwd ablation)
    accumulator: str = "auto"  # "auto" widens int32 to int64 only when it could overflow
    integer_ops: tuple[str, ...] = OP_FAMILIES
    nonlinear: str = "float"  # softmax/GELU/... in float32, reported as float ops
    optimizer: str = "intsgd"  # or "sgd": torch.optim.SGD
    master_bits: int = 32  # IntSGD master weight and momentum mantissas
    backend: str = "native"  # or "reference": exact int64 arithmetic for tests
    seed: int = 0
    allreduce: str = "integer"  # DDP gradient all-reduce: "integer" (exact, intrain_core.distributed) or "float"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        checks = {
            "rounding": (self.rounding, ROUNDINGS),
            "backward": (self.backward, ("integer", "float")),
            "accumulator": (self.accumulator, ("auto", "int32", "int64")),
            "nonlinear": (self.nonlinear, ("float",)),
            "optimizer": (self.optimizer, ("intsgd", "sgd")),
            "backend": (self.backend, ("native", "reference")),
            "allreduce": (self.allreduce, ("integer", "float")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"numerics.{key}={value!r} is not one of {list(allowed)}")
        unknown = set(self.integer_ops) - set(OP_FAMILIES)
        if unknown:
            raise ValueError(f"numerics.integer_ops has unknown families {sorted(unknown)}; valid: {list(OP_FAMILIES)}")
        for key in ("forward_bits", "backward_bits"):
            if not 2 <= getattr(self, key) <= 16:
                raise ValueError(f"numerics.{key} must be between 2 and 16, got {getattr(self, key)}")
        if not 16 <= self.master_bits <= 40:
            raise ValueError(f"numerics.master_bits must be between 16 and 40, got {self.master_bits}")

    def runs_integer(self, family: str) -> bool:
        return self.integer and family in self.integer_ops

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Numerics":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown numerics keys {sorted(unknown)}; valid keys: {sorted(names)}")
        values = dict(values)
        if "integer_ops" in values:
            values["integer_ops"] = tuple(values["integer_ops"])
        return cls(**values)

    @classmethod
    def preset(cls, name: str) -> "Numerics":
        """A preset from ``intrain_core/configs/numerics/<name>.yaml``, the file Hydra composes."""
        return cls.from_dict(preset_values(name))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["integer_ops"] = list(self.integer_ops)
        return values


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_values(name: str, inheriting: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset file's keys over those of the presets its ``defaults`` list names, as Hydra
    merges them. Only the form the presets use is read (preset names and ``_self_``); any
    other defaults entry is refused rather than half-understood."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown numerics preset {name!r}; available: {available_presets()}")
    if name in inheriting:
        raise ValueError(f"numerics preset {name!r} inherits from itself: {' -> '.join((*inheriting, name))}")
    own = yaml.safe_load(path.read_text()) or {}
    defaults = own.pop("defaults", [])
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ValueError(f"{path}: defaults must be a list of preset names and _self_, got {defaults!r}")
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]  # Hydra's place for it in a group's config
    values: dict[str, Any] = {}
    for entry in defaults:
        values.update(own if entry == "_self_" else preset_values(entry, (*inheriting, name)))
    return values
