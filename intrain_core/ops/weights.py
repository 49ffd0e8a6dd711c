"""Mapping a parameter for an integer op: from IntSGD's fixed-point master when it has one."""
from __future__ import annotations

import torch

from ..fixed_point import FixedPoint, requantize

MASTER_ATTR = "_intrain_master"
CONTEXT_ATTR = "_intrain_context"


def register_context(params, context) -> None:
    """Mark ``params`` as belonging to a converted model, so that the optimiser can read that
    model's deferred non-finite flag before it updates them; ``context=None`` removes the mark."""
    for p in params:
        if context is None:
            if hasattr(p, CONTEXT_ATTR):
                delattr(p, CONTEXT_ATTR)
        else:
            setattr(p, CONTEXT_ATTR, context)


def contexts_of(params) -> list:
    found = {id(c): c for c in (getattr(p, CONTEXT_ATTR, None) for p in params) if c is not None}
    return list(found.values())


def attach_master(param: torch.Tensor, master: FixedPoint) -> None:
    """Record ``master`` as the exact value of ``param`` until ``param`` is next modified."""
    setattr(param, MASTER_ATTR, (master, param._version))


def master_of(param: torch.Tensor) -> FixedPoint | None:
    found = getattr(param, MASTER_ATTR, None)
    if found is None:
        return None
    master, version = found
    return master if version == param._version else None


def map_weight(context, weight: torch.Tensor, where: str) -> FixedPoint:
    """The forward copy of a weight: narrowed from the integer master by shifts when IntSGD
    keeps one (docs/numerics-contract.md section 8), else mapped from the float tensor."""
    bits = context.numerics.forward_bits
    master = master_of(weight)
    if master is None:
        return context.map(weight, bits, where)
    fp = requantize(master.mantissa, master.exponent, bits, context.numerics.rounding, context.key())
    context.count("clamps", fp.clamped)
    return fp
