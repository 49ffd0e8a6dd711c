"""What ran in integers and what in float: one training step, logged op by op (section 9)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .convert import context_of, observe, revert
from .dispatch import IntegerMode


@dataclass(frozen=True)
class OpEntry:
    phase: str
    layer: str
    op: str
    arithmetic: str  # integer, float or exact
    calls: int
    macs: int


@dataclass
class CoverageReport:
    numerics: str
    entries: list[OpEntry]
    counters: dict = field(default_factory=dict)

    def macs(self, arithmetic: str | None = None, phase: str | None = None) -> int:
        return sum(
            e.macs for e in self.entries
            if (arithmetic is None or e.arithmetic == arithmetic) and (phase is None or e.phase == phase)
        )

    @property
    def integer_mac_share(self) -> float:
        total = self.macs()
        return self.macs("integer") / total if total else 0.0

    def float_ops(self) -> list[str]:
        """Every op that ran in float, as ``op (phase) @ layer``."""
        return sorted({f"{e.op} ({e.phase}) @ {e.layer}" for e in self.entries if e.arithmetic == "float"})

    def float_op_names(self) -> list[str]:
        return sorted({e.op for e in self.entries if e.arithmetic == "float"})

    def by_op(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(phase, op, arithmetic) -> (calls, macs), summed over layers."""
        summary: dict = {}
        for e in self.entries:
            calls, macs = summary.get((e.phase, e.op, e.arithmetic), (0, 0))
            summary[(e.phase, e.op, e.arithmetic)] = (calls + e.calls, macs + e.macs)
        return summary

    def table(self) -> str:
        total = self.macs() or 1
        lines = [
            f"numerics: {self.numerics}",
            f"integer MAC share: {self.integer_mac_share:.4%}  "
            f"(integer {self.macs('integer'):,} / total {self.macs():,} multiply-accumulates)",
            "",
            f"{'phase':<10}{'op':<28}{'arithmetic':<12}{'calls':>8}{'MACs':>18}{'share':>9}",
        ]
        for (phase, op, arithmetic), (calls, macs) in sorted(self.by_op().items()):
            lines.append(f"{phase:<10}{op:<28}{arithmetic:<12}{calls:>8}{macs:>18,}{macs / total:>9.3%}")
        floats = self.float_ops()
        lines += ["", f"float ops ({len(floats)}):"] + [f"  {name}" for name in floats]
        if self.counters:
            lines += ["", "counters: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items()))]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "numerics": self.numerics,
            "integer_mac_share": self.integer_mac_share,
            "float_ops": self.float_ops(),
            "counters": dict(self.counters),
            "entries": [asdict(e) for e in self.entries],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _optimizer_entries(optimizer, context) -> None:
    from .optim import IntSGD

    integer = isinstance(optimizer, IntSGD)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                # The SGD update: weight decay, momentum and the step, one product each.
                context.record(type(optimizer).__name__, "optimizer", integer, 3 * p.numel(), "<optimizer>")


def coverage(model, example_inputs, loss_fn=None, optimizer=None) -> CoverageReport:
    """Run one forward and backward (and ``optimizer.step()`` if given) and report every op.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (OpenMMLab models: ``inputs``, ``data_samples``, ``mode``); ``loss_fn(output) -> scalar``
    (the output summed when omitted). The step is real: gradients are cleared afterwards, and a
    given optimizer does update the weights.
    """
    context = context_of(model)
    observing = context is None
    if observing:
        context = observe(model)
    args, kwargs = (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)), {}
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    context.reset_log()
    counters_before = context.counter_values()
    try:
        output = model(*args, **kwargs)
        with IntegerMode(context):
            context.layer_stack.append("<loss>")
            loss = loss_fn(output) if loss_fn is not None else _sum_outputs(output)
            context.layer_stack.pop()
        loss.backward()
        if optimizer is not None:
            _optimizer_entries(optimizer, context)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        entries = [OpEntry(k.phase, k.layer, k.op, k.arithmetic, v[0], v[1]) for k, v in context.ops.items()]
        counters = {k: v - counters_before.get(k, 0) for k, v in context.counter_values().items()}
        return CoverageReport(context.numerics.name, entries, counters)
    finally:
        if observing:
            revert(model)


def _sum_outputs(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return sum(_sum_outputs(o) for o in output)
    raise TypeError(f"cannot sum a model output of type {type(output).__name__}: pass loss_fn")
