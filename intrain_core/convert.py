"""``convert(model, numerics)``: the one door that switches a model to integer numerics.

Nothing in the model is replaced: hooks on every submodule keep the name of the running layer
(for the coverage report and error messages), and the root module's forward runs inside an
``IntegerMode`` that routes each arithmetic op to its integer version. ``revert`` undoes it.
"""
from __future__ import annotations

import torch

from .context import IntegerContext
from .dispatch import IntegerMode
from .numerics import Numerics
from .ops import sync_norm
from .ops.weights import register_context

CONTEXT_ATTR = "_intrain_context"
HANDLES_ATTR = "_intrain_hooks"


def _as_numerics(numerics: Numerics | str) -> Numerics:
    return Numerics.preset(numerics) if isinstance(numerics, str) else numerics


def check_finite(model: torch.nn.Module) -> None:
    """Raise ``NonFiniteError`` if a NaN or Inf reached an integer op of ``model`` since the last
    check, naming the first op and layer (one read of the device)."""
    context = context_of(model)
    if context is not None:
        context.check_finite()


def context_of(model: torch.nn.Module) -> IntegerContext | None:
    """The integer state of a converted model (its RNG state goes into checkpoints)."""
    return getattr(model, CONTEXT_ATTR, None)


def _install(model: torch.nn.Module, context: IntegerContext) -> list:
    mode = IntegerMode(context)
    depth = [0]  # re-entrant calls of the root (e.g. a model calling itself) enter once

    def enter(module, args):
        if depth[0] == 0:
            # The previous step's mappings, where reading the flag costs nothing (CPU); on an
            # accelerator IntSGD reads it once per step, and evaluation loops call check_finite.
            context.check_finite(host_only=True)
            mode.__enter__()
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            mode.__exit__(None, None, None)

    def push(name):
        return lambda module, args: context.layer_stack.append(name)

    def pop(module, args, output):
        context.layer_stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(push(name or "<model>")))
        handles.append(module.register_forward_hook(pop, always_call=True))
        if isinstance(module, torch.nn.SyncBatchNorm) and context.numerics.integer:
            handles.append(_SyncNormForward(module))
    # The root's mode hooks wrap the name hooks: registered first on entry, last on exit.
    handles.append(model.register_forward_pre_hook(enter, prepend=True))
    handles.append(model.register_forward_hook(leave, always_call=True))
    return handles


class _SyncNormForward:
    """PyTorch's synchronised batch norm calls no torch function the mode could route (and
    refuses CPU tensors): a SyncBatchNorm of a converted model runs ``sync_norm.forward``
    instead, which routes it. ``remove`` restores the class's forward, as a hook handle does."""

    def __init__(self, module: torch.nn.SyncBatchNorm):
        self.module = module
        module.forward = sync_norm.forward.__get__(module)

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def convert(model: torch.nn.Module, numerics: Numerics | str, op_filter=None) -> torch.nn.Module:
    """Switch ``model`` to ``numerics`` in place and return it.

    Linear, convolutions, matmuls and attention, normalisation, residual adds and average
    pooling run in integers; every other op keeps running in float and is logged for the
    coverage report. A float32 preset (``integer: false``) returns the model unchanged.
    ``op_filter(op, layers, args)``, where given, decides per call whether an op that could run
    in integers does (``op``: its name, e.g. ``"add"``; ``layers``: the names of the modules
    running it, outermost first); False runs it in float, reported as float.
    """
    numerics = _as_numerics(numerics)
    if context_of(model) is not None:
        raise ValueError("this model is already converted; call intrain_core.revert(model) first")
    if not numerics.integer:
        return model
    context = IntegerContext(numerics)
    context.op_filter = op_filter
    setattr(model, HANDLES_ATTR, _install(model, context))
    setattr(model, CONTEXT_ATTR, context)
    register_context(model.parameters(), context)
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``convert``: the model runs in float again."""
    for handle in getattr(model, HANDLES_ATTR, []):
        handle.remove()
    register_context(model.parameters(), None)
    for attr in (HANDLES_ATTR, CONTEXT_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def observe(model: torch.nn.Module, numerics: Numerics | None = None) -> IntegerContext:
    """Install logging-only hooks on an unconverted model (for a float coverage report)."""
    context = IntegerContext(numerics or Numerics(name="fp32", integer=False))
    setattr(model, HANDLES_ATTR, _install(model, context))
    setattr(model, CONTEXT_ATTR, context)
    return context
