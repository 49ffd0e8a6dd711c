"""Validation: loss, top-1 and top-5 accuracy, without moving the training's random streams."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from intrain_core import check_finite, context_of
from tasks.common.errors import ConfigError


@torch.no_grad()
def evaluate(model, loader, device, num_classes, limit=None, reduce=None) -> dict[str, float]:
    """val/loss (plain cross-entropy), val/acc1 and val/acc5 (>= 5 classes), in percent.
    ``reduce`` adds the counts and sums of every process (each evaluated its share).

    The integer context's generators are restored afterwards: validation never shifts the
    training's random stream, so how often it runs does not change the trajectory.
    """
    ctx = context_of(model)
    saved = ctx.state_dict() if ctx is not None else None
    was_training = model.training
    model.eval()
    total = loss_sum = correct1 = correct5 = 0
    try:
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            top = out.topk(min(5, num_classes), dim=1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            total += y.numel()
        check_finite(model)  # a NaN or Inf met by an integer op, read once per validation
    finally:
        model.train(was_training)
        if ctx is not None:
            ctx.load_state_dict({"stream": saved["stream"], "counters": ctx.counter_values()})
    if reduce is not None:
        total, loss_sum, correct1, correct5 = reduce([total, loss_sum, correct1, correct5])
    if total == 0:
        raise ConfigError("the validation set is empty (check trainer.limit_val_batches and the dataset)")
    metrics = {"val/loss": loss_sum / total, "val/acc1": 100.0 * correct1 / total}
    if num_classes >= 5:
        metrics["val/acc5"] = 100.0 * correct5 / total
    return metrics
