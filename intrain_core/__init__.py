"""intrain_core: switch a PyTorch model's arithmetic from float to integers (docs/numerics-contract.md)."""
from .convert import check_finite, context_of, convert, revert
from .coverage import CoverageReport, coverage
from .fixed_point import FixedPoint, NonFiniteError, from_fixed, to_fixed
from .numerics import Numerics, available_presets
from .optim import IntSGD, build_optimizer

__all__ = [
    "CoverageReport",
    "FixedPoint",
    "IntSGD",
    "NonFiniteError",
    "Numerics",
    "available_presets",
    "build_optimizer",
    "check_finite",
    "context_of",
    "convert",
    "coverage",
    "from_fixed",
    "revert",
    "to_fixed",
]
