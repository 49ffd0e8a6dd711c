"""The coverage step: one real training step whose op report is written to coverage.txt/.json,
then undone, so that whether it ran (or a coverage file already existed) never changes training.

Undone: weights, BN statistics, optimiser state, the global RNGs and the integer rounding stream.
The step rounds with its own stream (seeded apart from ``numerics.seed``), and the training's
stream is put back where it was, untouched.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from intrain_core import context_of, coverage
from tasks.checkpoint import rng_state, set_rng_state

log = logging.getLogger("intrain")


def coverage_seed(seed: int) -> int:
    """The coverage step's rounding seed: never the training's own."""
    return (int(seed) * 1_000_003 + 0xC0FE) % (2**63 - 1)


def coverage_step(model: torch.nn.Module, inputs: Any, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                  run_dir: Path) -> dict[str, Any]:
    """Run, report and undo one training step of a converted ``model``; return the report's dict."""
    ctx = context_of(model)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), ctx.state_dict(),
             rng_state())
    ctx.stream.load_state_dict({"seed": coverage_seed(ctx.numerics.seed), "counter": 0})
    try:
        report = coverage(model, inputs, loss_fn=loss_fn, optimizer=optimizer)
    finally:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        ctx.load_state_dict(saved[2])
        set_rng_state(saved[3])
    (run_dir / "coverage.txt").write_text(report.table() + "\n")
    data = report.to_dict()
    (run_dir / "coverage.json").write_text(json.dumps(data, indent=2) + "\n")
    log.info("integer MAC share %.4f%% (coverage report: %s)", 100 * report.integer_mac_share,
             run_dir / "coverage.txt")
    return data
