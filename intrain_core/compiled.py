"""One switch for fused kernels: ``torch.compile`` of the numerics' pure tensor functions.

Inductor turns each of them into one or two loops (C++ on a CPU, Triton on CUDA) from the same
Python, which eager PyTorch runs as a dozen passes over the tensor. Compiled and eager code give
the same bits (integer arithmetic, and float steps that are exact), so the choice is only speed.

Compiling costs a start-up once per process (the compiler's imports and its C++ prelude) and then
about a second per kernel; inductor's on-disk cache serves later processes faster. So by default
a kernel is compiled only once it has earned it (the ski-rental rule: never more than twice the
time of the better choice made in hindsight): the start-up is paid once the process's eager
kernels together have taken as long as it, and each kernel is compiled once its own eager calls
have taken as long as compiling it. A test compiles nothing; a short run compiles its hot kernels
after a few dozen steps; a long run compiles every kernel that matters. A kernel that an earlier
process compiled (``kernel_record``) loads from inductor's cache in a fraction of a second, so it
is compiled at its first call. ``INTRAIN_COMPILE`` sets the mode:
- ``auto`` (default): as above on a CPU; on CUDA, where eager calls return before the device has
  finished and cannot be timed without waiting, at the first call;
- ``1``: every kernel at its first call (benchmarks of the steady state);
- ``0``: everything eagerly (no compiler start-up: quick tests, debugging).
Tensors below ``MIN_COMPILED_NUMEL`` elements always run eagerly.

Once a kernel's graphs are compiled, a call checks dynamo's guards of each graph itself and runs
the first that admits it without going through torch.compile's per-call wrapper; a call that no
graph admits goes through the wrapper, which compiles a graph for it. A graph that admitted one
input layout (dtypes, devices, sizes, strides, requires_grad) under one global state (dynamo's
own record of grad mode, thread count, ...) is run for that layout again without its guards:
with dynamic shapes they are evaluated partly in Python (18 us a check, 1,659 checks in a
ViT-tiny step, 2-core Xeon, 2026-12-03), and what else they read of a tensor, its dispatch
keys, is the same for every tensor the numerics pass.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
import types

import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, set_eval_frame
from torch._C._dynamo.guards import GlobalStateGuard

from . import kernel_record

# Below this many elements a kernel costs less than the call into compiled code.
MIN_COMPILED_NUMEL = 1 << 14

# Measured on a 2-core Xeon (2026-12-03), an empty cache against a filled one: the first
# compilation of a process took 15 and 3.2 s, the following ones 0.7-1.3 and 0.1-0.3 s each.
EXPECTED_STARTUP_S = 15.0
# One kernel after the start-up, until one has been measured in this process.
EXPECTED_COMPILE_S = 1.5

MODES = {"0": "never", "1": "always", "auto": "auto", "never": "never", "always": "always"}


def _mode_from_environment() -> str:
    value = os.environ.get("INTRAIN_COMPILE", "auto").strip().lower()
    if value not in MODES:
        raise ValueError(f"INTRAIN_COMPILE must be one of 0, 1, auto; got {value!r}")
    return MODES[value]


_mode = _mode_from_environment()
_startup_paid = False  # a kernel has been compiled in this process
_eager_seconds = 0.0  # all kernels' eager calls in this process, towards the start-up
_compile_seconds: list[float] = []  # measured compilations from scratch after the start-up


@contextlib.contextmanager
def compilation(on: bool | str):
    """Set the mode within a block: ``True``/``"always"``, ``False``/``"never"``, or ``"auto"``."""
    global _mode
    before = _mode
    _mode = on if isinstance(on, str) else ("always" if on else "never")
    if _mode not in MODES.values():
        raise ValueError(f"compilation mode must be always, never or auto; got {on!r}")
    try:
        yield
    finally:
        _mode = before


def expected_compile_seconds() -> float:
    if not _compile_seconds:
        return EXPECTED_COMPILE_S
    return sum(_compile_seconds) / len(_compile_seconds)


def _measured(seconds: float, from_scratch: bool) -> None:
    """Book a compiled call: the process's first pays the start-up; a later kernel's first call
    that inductor's cache could not serve is the cost of one compilation."""
    global _startup_paid
    if not _startup_paid:
        _startup_paid = True
    elif from_scratch:
        _compile_seconds.append(seconds)


def _largest(args) -> torch.Tensor | None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return max(tensors, key=torch.Tensor.numel, default=None)


def _is_data(arg) -> bool:
    """Tensors (and tuples holding them) are the data of a call; every other argument is an
    option that the kernel is specialised for."""
    if isinstance(arg, (tuple, list)):
        return any(_is_data(a) for a in arg)
    return isinstance(arg, torch.Tensor)


def _run_graph(function, data: list):
    prior = set_eval_frame(None)  # as dynamo runs compiled code: no frame intercepted
    try:
        return function(*data)
    finally:
        set_eval_frame(prior)


def _layout(data) -> tuple:
    """Everything of the tensors in ``data`` that dynamo's tensor guards read."""
    return tuple(_layout(t) if isinstance(t, (tuple, list)) else
                 (t.dtype, t.device, t.shape, t.stride(), t.storage_offset(), t.requires_grad, t.is_inference())
                 for t in data)


class _Kernel:
    """One option set of a fused function: its eager time so far, its compiled form, and the
    direct calls of the graphs compiled so far."""

    __slots__ = ("compiled", "eager_seconds", "direct", "free", "signatures", "admitted")

    def __init__(self):
        self.compiled = None
        self.eager_seconds = 0.0
        self.direct, self.free = [], {}
        # input layout -> (the global state it was admitted under, the graph's function)
        self.admitted: dict[tuple, tuple[GlobalStateGuard, types.FunctionType]] = {}
        # input layout -> (kernel_record signature, compiled by an earlier process)
        self.signatures: dict[tuple, tuple[str, bool]] = {}

    def signature(self, fn, options: tuple, data: list) -> tuple[str, bool]:
        data_layout = kernel_record.layout(data)
        found = self.signatures.get(data_layout)
        if found is None:
            sig = kernel_record.signature(fn, options, data_layout)
            found = self.signatures[data_layout] = (sig, kernel_record.known(sig))
        return found

    def learn_graphs(self):
        """(guards, function) for each graph dynamo holds: ``function`` runs the graph's code
        without dynamo's per-call wrapper, which took 25-35 us of a 50 us call of a small
        kernel (2-core Xeon, 2026-12-02); the guards are dynamo's own, checked here instead."""
        kernel = self.compiled._torchdynamo_orig_callable
        self.free = {name: cell.cell_contents for name, cell in zip(kernel.__code__.co_freevars, kernel.__closure__)}
        self.direct = [(entry.guard_manager, types.FunctionType(entry.code, kernel.__globals__, kernel.__name__,
                                                                None, kernel.__closure__))
                       for entry in _debug_get_cache_entry_list(kernel.__code__)]
        self.admitted.clear()

    def run_direct(self, data: list):
        """The result of the first graph whose guards hold for ``data``; None when none does."""
        layout = _layout(data)
        known = self.admitted.get(layout)
        if known is not None and known[0].check():
            return _run_graph(known[1], data)
        frame_locals = {"data": tuple(data), **self.free}
        for guards, function in self.direct:
            if guards.check(frame_locals):
                self.admitted[layout] = (GlobalStateGuard(), function)
                return _run_graph(function, data)
        return None

    def due(self, device: torch.device, in_cache) -> bool:
        """Compile now? ``in_cache()``: whether an earlier process compiled this kernel."""
        if _mode == "always" or device.type != "cpu" or in_cache():
            return True
        if self.eager_seconds < expected_compile_seconds():
            return False
        return _startup_paid or _eager_seconds >= EXPECTED_STARTUP_S


def fused(fn):
    """``fn`` compiled (fullgraph, dynamic shapes) for large tensors once it is due (see the
    module's docstring), eager otherwise.

    Non-tensor arguments (bit-widths, rounding modes, flags) are constants of the compiled
    kernel, one kernel per distinct set: inductor would otherwise treat them as symbolic
    integers, and it emits wrong C++ for some of those (``1 << (bits - 1)`` in 32 bits).
    Values that change from call to call (keys, coefficients) are passed as tensors.
    Set ``min_numel`` on the returned function to move the size threshold (0: always eligible).
    """
    kernels: dict[tuple, _Kernel] = {}

    def specialised(options: tuple):
        def kernel(*data):
            args, data = [], iter(data)
            for is_data, value in options:
                args.append(next(data) if is_data else value)
            return fn(*args)

        # A code object of its own: dynamo keeps compiled graphs per code object and checks
        # the guards of each in turn, so one shared by every kernel made each call check dozens.
        kernel.__code__ = kernel.__code__.replace(co_name=f"{fn.__name__}_{len(kernels)}")
        return torch.compile(kernel, fullgraph=True, dynamic=True)

    def run_compiled(entry: _Kernel, options: tuple, data: list):
        if entry.direct:
            result = entry.run_direct(data)
            if result is not None:
                return result
        first = entry.compiled is None
        sig, in_cache = entry.signature(fn, options, data)
        if first:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            entry.compiled = specialised(options)
        start = time.perf_counter()
        # Set and restored by hand: ``config.patch`` costs about as much as the call itself.
        config = torch._dynamo.config
        saved = config.specialize_int, config.specialize_float
        config.specialize_int = config.specialize_float = True
        try:
            result = entry.compiled(*data)
        finally:
            config.specialize_int, config.specialize_float = saved
        _measured(time.perf_counter() - start, first and not in_cache)
        kernel_record.remember(sig)
        entry.learn_graphs()  # dynamo may have compiled a graph for this call
        return result

    @functools.wraps(fn)
    def call(*args):
        global _eager_seconds
        if _mode == "never" or torch.compiler.is_compiling():
            return fn(*args)
        largest = _largest(args)
        if largest is None or largest.numel() < call.min_numel:
            return fn(*args)
        options = tuple((True, None) if _is_data(a) else (False, a) for a in args)
        entry = kernels.get(options)
        if entry is None:
            entry = kernels[options] = _Kernel()
        data = [a for a in args if _is_data(a)]
        if entry.compiled is not None or entry.due(largest.device, lambda: entry.signature(fn, options, data)[1]):
            return run_compiled(entry, options, data)
        start = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - start
        entry.eager_seconds += seconds
        _eager_seconds += seconds
        return result

    call.eager = fn
    call.min_numel = MIN_COMPILED_NUMEL
    call.kernels = kernels
    return call
