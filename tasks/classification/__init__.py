"""Image classification: a resolved config in, a trained model and a run directory out.

The model comes from its zoo by name (``models``), optionally with local weights
(``pretrained``), is converted once with ``intrain_core.convert``, and trains with the optimizer
``intrain_core.optim.build_optimizer`` picks for the numerics (``training``).
"""
from tasks.classification.data import epoch_order, epoch_seed, make_loader
from tasks.classification.evaluation import evaluate
from tasks.classification.models import build_model
from tasks.classification.pretrained import load_pretrained
from tasks.classification.schedule import lr_factor_fn
from tasks.classification.training import run
from tasks.common.device import resolve_device
# Imported from here by modules that predate tasks.common.errors.
from tasks.common.errors import ConfigError

__all__ = ["ConfigError", "build_model", "epoch_order", "epoch_seed", "evaluate", "load_pretrained", "lr_factor_fn",
           "make_loader", "resolve_device", "run"]
