"""Per-model integer state: the numerics, the random generators, counters and the op log.

One ``IntegerContext`` is attached to each converted model. Ops read the numerics from it,
draw stochastic-rounding noise from its seeded generators, and log every op they run so that
the coverage report can say what ran in integers and what in float.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from .backends import get_backend
from .fixed_point import FixedPoint, NonFiniteError, qmax, to_fixed

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class OpKey:
    phase: str  # "forward", "backward" or "optimizer"
    layer: str
    op: str
    arithmetic: str  # "integer", "float", or "exact" (no arithmetic: ReLU, max pooling)


class IntegerContext:
    def __init__(self, numerics):
        self.numerics = numerics
        self.backend = get_backend(numerics.backend)
        self._generators: dict[str, torch.Generator] = {}
        self.counters: Counter = Counter()
        self.ops: dict[OpKey, list[int]] = defaultdict(lambda: [0, 0])  # [calls, macs]
        self.layer_stack: list[str] = []

    # --- randomness -------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.numerics.seed)
            self._generators[key] = g
        return self._generators[key]

    def state_dict(self) -> dict:
        return {
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, rng_state in state["generators"].items():
            self.generator(torch.device(key)).set_state(rng_state)
        self.counters = Counter(state.get("counters", {}))

    # --- logging ----------------------------------------------------------------------
    @property
    def layer(self) -> str:
        return self.layer_stack[-1] if self.layer_stack else "<model>"

    def where(self, op: str, role: str, layer: str | None = None) -> str:
        return f"{op} {role} of layer '{layer or self.layer}'"

    def record(self, op: str, phase: str, integer: bool | str, macs: int = 0, layer: str | None = None) -> None:
        """Log one op; ``integer`` is True, False or "exact"."""
        arithmetic = {True: "integer", False: "float"}.get(integer, integer)
        entry = self.ops[OpKey(phase, layer or self.layer, op, arithmetic)]
        entry[0] += 1
        entry[1] += int(macs)

    def reset_log(self) -> None:
        self.ops.clear()

    # --- arithmetic helpers -------------------------------------------------------------
    def map(self, x: torch.Tensor, bits: int, where: str) -> FixedPoint:
        """``to_fixed`` with this run's rounding and generator; clamps are counted."""
        try:
            fp = to_fixed(x, bits, self.numerics.rounding, self.generator(x.device), where)
        except NonFiniteError:
            self.counters["nonfinite"] += 1
            raise
        if fp.clamped:
            self.counters["clamps"] += fp.clamped
        return fp

    def accumulator(self, reduction: int, bits_a: int, bits_b: int, extra: int = 0) -> tuple[torch.dtype, int]:
        """The accumulator dtype for ``reduction`` products, and the bound on one product.

        int32 holds the sum while ``reduction * qmax_a * qmax_b + extra <= 2**31 - 1``; at
        8 bits that is K <= 133,144 (127**2 = 16,129 per product). Otherwise int64.
        """
        product_bound = qmax(bits_a) * qmax(bits_b)
        mode = self.numerics.accumulator
        fits = reduction * product_bound + extra <= INT32_MAX and max(bits_a, bits_b) <= 8
        if mode == "int64" or (mode == "auto" and not fits):
            if mode == "auto":
                self.counters["widenings"] += 1
            return torch.int64, product_bound
        if not fits:
            raise OverflowError(
                f"numerics.accumulator=int32 cannot hold {reduction} products of {bits_a}x{bits_b}-bit "
                "mantissas: use accumulator=auto or int64"
            )
        return torch.int32, product_bound
