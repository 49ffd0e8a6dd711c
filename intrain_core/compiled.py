"""One switch for fused kernels: ``torch.compile`` of the numerics' pure tensor functions.

Inductor turns each of them into one or two loops (C++ on a CPU, Triton on CUDA) from the same
Python, which eager PyTorch runs as a dozen passes over the tensor. Compiled and eager code give
the same bits (integer arithmetic, and float steps that are exact), so the choice is only speed:
- ``INTRAIN_COMPILE=0`` runs everything eagerly (no compiler start-up: quick tests, debugging);
- otherwise a tensor of at least ``MIN_COMPILED_NUMEL`` elements goes through the compiled
  version. Shapes are dynamic, so a function compiles once per dtype and option set, and inductor's
  on-disk cache makes a later process load it instead of compiling again.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

# Below this many elements a kernel costs less than the call into compiled code.
MIN_COMPILED_NUMEL = 1 << 14

_enabled = os.environ.get("INTRAIN_COMPILE", "1") != "0"


@contextlib.contextmanager
def compilation(on: bool):
    """Turn the compiled kernels on or off within a block (tests compare both)."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def _largest_numel(args) -> int:
    return max((a.numel() for a in args if isinstance(a, torch.Tensor)), default=0)


def _is_data(arg) -> bool:
    """Tensors (and tuples holding them) are the data of a call; every other argument is an
    option that the kernel is specialised for."""
    if isinstance(arg, (tuple, list)):
        return any(_is_data(a) for a in arg)
    return isinstance(arg, torch.Tensor)


def fused(fn):
    """``fn`` compiled (fullgraph, dynamic shapes) for large tensors, eager for small ones.

    Non-tensor arguments (bit-widths, rounding modes, flags) are constants of the compiled
    kernel, one kernel per distinct set: inductor would otherwise treat them as symbolic
    integers, and it emits wrong C++ for some of those (``1 << (bits - 1)`` in 32 bits).
    Values that change from call to call (keys, coefficients) are passed as tensors.
    Set ``min_numel`` on the returned function to move the size threshold (0: always compiled).
    """
    kernels: dict = {}

    def specialised(options: tuple):
        def kernel(*data):
            args, data = [], iter(data)
            for is_data, value in options:
                args.append(next(data) if is_data else value)
            return fn(*args)

        return torch.compile(kernel, fullgraph=True, dynamic=True)

    @functools.wraps(fn)
    def call(*args):
        if not _enabled or torch.compiler.is_compiling() or _largest_numel(args) < call.min_numel:
            return fn(*args)
        options = tuple((True, None) if _is_data(a) else (False, a) for a in args)
        kernel = kernels.get(options)
        if kernel is None:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            kernel = kernels[options] = specialised(options)
        with torch._dynamo.config.patch(specialize_int=True, specialize_float=True):
            return kernel(*(a for a in args if _is_data(a)))

    call.eager = fn
    call.min_numel = MIN_COMPILED_NUMEL
    return call
