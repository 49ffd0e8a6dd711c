"""Which torch functions run as integer ops: each op file registers its handlers here.

A handler takes the integer context and the function's arguments and returns the result, or
``FALLBACK`` when it cannot run the call in integers (an unsupported geometry, a family the
numerics leaves in float, a non-float32 dtype); the call then runs in float and is logged so.
"""
from __future__ import annotations

from typing import Callable

import torch

FALLBACK = object()
HANDLERS: dict[Callable, Callable] = {}


def implements(*functions: Callable):
    """Register the decorated handler for each of ``functions``."""
    def register(handler: Callable) -> Callable:
        for function in functions:
            if function in HANDLERS:
                raise ValueError(f"{function} already has an integer handler: {HANDLERS[function].__qualname__}")
            HANDLERS[function] = handler
        return handler

    return register


def is_float32(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tensors)
