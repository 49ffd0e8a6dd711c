"""What a non-finite loss, gradient or integer-op input does to a run (``trainer.on_nonfinite``).

``stop``: the run ends with one line naming the step, the op and the layer, and what to try.
``skip``: the step's update is not applied (nor its forward pass's change to BN statistics) and the
step is counted, as AMP's grad scaler does with an overflowing step; the count is logged as
``train/nonfinite_skipped``. The schedule and the data order go on as if the step had been taken.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from intrain_core import NonFiniteError, check_finite
from tasks.common.errors import DivergedError

log = logging.getLogger("intrain")
T = TypeVar("T")
COLUMN = "train/nonfinite_skipped"


class NonFiniteValue(FloatingPointError):
    """A non-finite loss or gradient of a float op (integer ops raise ``NonFiniteError`` themselves)."""


def what_failed(exc: BaseException) -> str:
    """The value and where it was met: ``Inf in batch_norm input of layer 'layer1.0.bn1'``."""
    return str(exc).split(": ")[0]


class NonFiniteGuard:
    def __init__(self, policy: str = "stop", lr: float | None = None):
        self.policy, self.lr, self.skipped = policy, lr, 0

    def check_loss(self, value: float, model: torch.nn.Module | None = None) -> None:
        """A non-finite loss; where an integer op met the value first, that op and layer are named
        (integer ops flag non-finite inputs on the device, read here and once per step)."""
        if not math.isfinite(value):
            if model is not None:
                check_finite(model)
            raise NonFiniteValue(f"the training loss is {value}")

    def check_gradients(self, model: torch.nn.Module) -> None:
        """Only when skipping: a stopped run meets a non-finite gradient at the next step's loss."""
        if self.policy != "skip":
            return
        for name, p in model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteValue(f"a non-finite gradient of {name}")

    def attempt(self, step: int, epoch: int, checkpoint: Path | None, model: torch.nn.Module,
                fn: Callable[[], T]) -> T | None:
        """``fn()``; None when it met a non-finite value and the step is skipped. A skipped step's
        forward pass may have moved buffers (BN statistics) before the value was met: they are put back."""
        buffers = [b.clone() for b in model.buffers()] if self.policy == "skip" else []
        try:
            return fn()
        except (NonFiniteError, NonFiniteValue) as exc:
            if self.policy == "skip":
                with torch.no_grad():
                    for buffer, saved in zip(model.buffers(), buffers):
                        buffer.copy_(saved)
                self.skipped += 1
                log.warning("step %d skipped: %s (%d skipped so far)", step, what_failed(exc), self.skipped)
                return None
            last = f"; the last checkpoint is {checkpoint}" if checkpoint else ""
            raise DivergedError(f"training step {step} (epoch {epoch}) met a non-finite value: {what_failed(exc)}. "
                                f"Try a lower task.lr (now {self.lr:g}), or trainer.on_nonfinite=skip to skip "
                                f"such steps{last}") from exc

    @contextlib.contextmanager
    def validation(self, step: int) -> Iterator[None]:
        try:
            yield
        except NonFiniteError as exc:
            raise DivergedError(f"validation after step {step} met a non-finite value: {what_failed(exc)}; the "
                                f"weights or normalisation statistics are no longer finite. Try a lower task.lr "
                                f"(now {self.lr:g})") from exc

    def columns(self) -> dict[str, int]:
        return {COLUMN: self.skipped} if self.policy == "skip" else {}
