"""Local pretrained weights (``task.checkpoint``) into a classification model."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

from tasks.checkpoint import CheckpointError

log = logging.getLogger("intrain")


def load_pretrained(model: nn.Module, path: str | Path, num_classes: int) -> None:
    """Load a local state dict into ``model``; the classifier head is skipped when it does not fit.

    Accepts .pth/.pt (a state dict, or a dict holding one under ``state_dict``/``model``) and
    .safetensors. For timm models the model family's own ``checkpoint_filter_fn`` adapts the
    weights (e.g. resizes ViT position embeddings to the image size). Anything else that does
    not match raises a ``CheckpointError`` naming the file and the keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"task.checkpoint: pretrained weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"task.checkpoint: {path} is corrupt or not a weights file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"task.checkpoint: {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None and type(model).__module__.startswith("timm."):
        try:
            state = filter_fn(state, model)
        except Exception as exc:
            raise CheckpointError(f"task.checkpoint: timm could not adapt {path} to {type(model).__name__}: {exc}") from exc

    own = model.state_dict()
    head = _classifier_prefixes(model, num_classes)
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k.startswith(head)]
    for k in skipped:
        del state[k]
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        problems = []
        for label, keys in (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {keys[:4]})")
        raise CheckpointError(f"task.checkpoint: {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    log.info("loaded pretrained weights from %s%s", path,
             f" (classifier head skipped: {skipped})" if skipped else "")


def _classifier_prefixes(model: nn.Module, num_classes: int) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        names = [names] if isinstance(names, str) else list(names)
    else:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes][-1:]
    return tuple(f"{n}." for n in names)
