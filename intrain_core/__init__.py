"""intrain_core: switch a PyTorch model's arithmetic from float to integers (NUMERICS.md)."""
from .fixed_point import FixedPoint, NonFiniteError, from_fixed, to_fixed
from .numerics import Numerics, available_presets

__all__ = ["FixedPoint", "NonFiniteError", "Numerics", "available_presets", "from_fixed", "to_fixed"]
