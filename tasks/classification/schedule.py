"""The learning-rate schedule: a per-step factor of the base lr."""
from __future__ import annotations

import bisect
import math

from tasks.common.errors import ConfigError


def lr_factor_fn(task, steps_per_epoch: int, total_steps: int):
    """Per-step multiplier of the base lr: linear warmup, then cosine to 0, step decay, or constant."""
    warmup = int(round(float(task.get("warmup_epochs") or 0) * steps_per_epoch))
    schedule = task.get("schedule", "cosine")
    milestones = sorted(int(round(float(m) * steps_per_epoch)) for m in (task.get("milestones") or []))
    gamma = float(task.get("gamma", 0.1))
    if schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"task.schedule={schedule!r} is not one of ['cosine', 'step', 'constant']")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "step":
            return gamma ** bisect.bisect_right(milestones, s)
        return 1.0

    return factor
