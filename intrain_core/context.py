"""Per-model integer state: the numerics, the rounding stream, counters and the op log.

One ``IntegerContext`` is attached to each converted model. Ops read the numerics from it, take
the keys of their stochastic roundings from its stream, and log every op they run so that the
coverage report can say what ran in integers and what in float.

Nothing here waits for an accelerator: its clamp counts stay device tensors until they are read,
and a non-finite input only sets a device flag that ``check_finite`` reads once per step. On a
CPU, where reading costs no wait, both are read as they come.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backends import get_backend
from .collective import rank_key
from .fixed_point import FixedPoint, NonFiniteError, map_at_deferred, map_deferred, nonfinite_message, qmax
from .rounding import RoundingStream

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class OpKey:
    phase: str  # "forward", "backward" or "optimizer"
    layer: str
    op: str
    arithmetic: str  # "integer", "float", or "exact" (no arithmetic: ReLU, max pooling)


class NonFiniteWatch:
    """Which mapping first saw a NaN or Inf since the last check.

    A flag in host memory is read at once: there is no device to wait for. Kept until the check
    instead, a step's flags (hundreds of small blocks among the activations) fragmented glibc's
    heap: the ViT's int8 step peaked at 820 MB resident instead of 530, ResNet-18's at 540
    instead of 440 even when reduced every 64. An accelerator's flags are kept on the device and
    reduced together every ``FOLD_EVERY`` flags and when checked: folding each into a device
    integer took a handful of tiny ops per mapping."""

    FOLD_EVERY = 64

    def __init__(self):
        self._count = 0  # mappings noted so far, which orders places across devices
        self._first_on_host: tuple[int, str] | None = None
        # Per accelerator: the (order, place) of each mapping noted there since the last check,
        # the flags not yet reduced, and the position in that list of the first non-finite one.
        self._noted: dict[torch.device, list[tuple[int, str]]] = {}
        self._pending: dict[torch.device, list[torch.Tensor]] = {}
        self._first: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def reads_at_once(device: torch.device) -> bool:
        return device.type == "cpu"

    def note(self, finite: torch.Tensor, where: str) -> None:
        self._count += 1
        device = finite.device
        if self.reads_at_once(device):
            if self._first_on_host is None and not bool(finite):
                self._first_on_host = (self._count, where)
            return
        pending = self._pending.get(device)
        if pending is None:
            pending = self._pending[device] = []
            self._noted[device] = []
        pending.append(finite)
        self._noted[device].append((self._count, where))
        if len(pending) >= self.FOLD_EVERY:
            self._fold(device)

    def _fold(self, device: torch.device) -> None:
        pending = self._pending[device]
        if not pending:
            return
        first = self._first.get(device)
        if first is None:
            first = self._first[device] = torch.full((), -1, dtype=torch.int64, device=device)
        start = len(self._noted[device]) - len(pending)
        bad = ~torch.stack([finite.reshape(()) for finite in pending])
        first.copy_(torch.where((first < 0) & bad.any(), start + bad.to(torch.int8).argmax(), first))
        pending.clear()

    def check(self, host_only: bool = False) -> None:
        """Raise NonFiniteError naming the first non-finite mapping, then start over.

        ``host_only``: read only flags in host memory, which costs no wait for an accelerator."""
        bad = [self._first_on_host] if self._first_on_host is not None else []
        self._first_on_host = None
        for device in [d for d in self._pending if not host_only or self.reads_at_once(d)]:
            self._fold(device)
            position = int(self._first[device])
            if position >= 0:
                bad.append(self._noted[device][position])
            self._first[device].fill_(-1)
            self._noted[device].clear()
        if bad:
            raise NonFiniteError(nonfinite_message(min(bad)[1]))


class IntegerContext:
    def __init__(self, numerics):
        self.numerics = numerics
        self.backend = get_backend(numerics.backend)
        self.stream = RoundingStream(numerics.seed)
        self.nonfinite = NonFiniteWatch()
        self._counters: Counter = Counter()
        self._uncounted: dict[str, list[torch.Tensor]] = {}  # device amounts not yet summed
        self.ops: dict[OpKey, list[int]] = defaultdict(lambda: [0, 0])  # [calls, macs]
        self.layer_stack: list[str] = []
        self.op_filter = None  # convert's op_filter: (op, layer stack, args) -> run in integers?

    # --- randomness and state ------------------------------------------------------------
    def key(self) -> int:
        """The key of the next stochastic rounding. Under torch.distributed every rank draws its
        own bits from the shared counter: ranks map different data, and shared draws would
        correlate their rounding errors, which the gradient all-reduce adds up."""
        key = self.stream.next_int_key()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return rank_key(key, dist.get_rank())
        return key

    @property
    def counters(self) -> Counter:
        """Counts by name (clamps, widenings, nonfinite); device amounts stay on the device."""
        for name in self._uncounted:
            self._sum_uncounted(name)
        return self._counters

    def _sum_uncounted(self, name: str) -> None:
        amounts = self._uncounted[name]
        if amounts:
            device = amounts[0].device
            total = torch.stack([a.to(device) for a in amounts]).sum()
            self._counters[name] = self._counters.get(name, 0) + total
            amounts.clear()

    @counters.setter
    def counters(self, value: Counter) -> None:
        self._counters, self._uncounted = value, {}

    def counter_values(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.counters.items()}

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "counters": self.counter_values()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.counters = Counter(state.get("counters", {}))

    def check_finite(self, host_only: bool = False) -> None:
        try:
            self.nonfinite.check(host_only)
        except NonFiniteError:
            self.counters["nonfinite"] += 1
            raise

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

    def count(self, name: str, amount) -> None:
        """Add to a counter. An amount in host memory is read at once (kept, a step's worth
        fragmented the heap, as NonFiniteWatch says); an accelerator's stays on the device and
        is summed with others when the counter is read, or every ``FOLD_EVERY``."""
        if isinstance(amount, torch.Tensor) and amount.device.type == "cpu":
            amount = int(amount)
        if not isinstance(amount, torch.Tensor):
            self._counters[name] = self._counters.get(name, 0) + amount
            return
        amounts = self._uncounted.setdefault(name, [])
        amounts.append(amount.reshape(()))
        if len(amounts) >= NonFiniteWatch.FOLD_EVERY:
            self._sum_uncounted(name)

    # --- arithmetic helpers -------------------------------------------------------------
    def map(self, x: torch.Tensor, bits: int, where: str) -> FixedPoint:
        """``to_fixed`` with this run's rounding and stream; clamps counted, NaN/Inf flagged."""
        return self.map_with_flag(x, bits, where)[0]

    def map_with_flag(self, x: torch.Tensor, bits: int, where: str) -> tuple[FixedPoint, torch.Tensor]:
        """``map``, also returning the device flag "x was finite" for updates that must not keep
        anything computed from a non-finite value (running statistics)."""
        fp, finite = map_deferred(x, bits, self.numerics.rounding, self.key())
        self.nonfinite.note(finite, where)
        self.count("clamps", fp.clamped)
        return fp, finite

    def map_at(self, x: torch.Tensor, exponent: torch.Tensor, limit: int, where: str) -> FixedPoint:
        """``to_fixed_at`` with this run's rounding and stream (a bias onto an accumulator's
        exponent); clamps counted, NaN/Inf flagged."""
        fp, finite = map_at_deferred(x, exponent, limit, self.numerics.rounding, self.key())
        self.nonfinite.note(finite, where)
        self.count("clamps", fp.clamped)
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
