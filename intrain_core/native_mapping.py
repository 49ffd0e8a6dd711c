"""The C++ mappings of float32 CPU tensors (csrc/mapping.cpp): to int8 mantissas, and the
residual add's pair of mappings.

The same bits as ``fixed_point.map_kernel`` and ``ops.add._add``, in AVX-512 code that reads
strided views in place, about twice as fast as inductor's kernels for them. It is built on first
use for this machine's CPU (``extension.py``, about 20 s on 2 cores). Where the CPU lacks
AVX-512, the extension cannot be built, or ``INTRAIN_NATIVE_MAPPING=0``, the compiled torch
kernels run instead: the same bits.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from . import extension

SOURCE = Path(__file__).parent / "csrc" / "mapping.cpp"

_module = None
_failed = False


def enabled() -> bool:
    return os.environ.get("INTRAIN_NATIVE_MAPPING", "1").strip() != "0"


@functools.cache
def has_avx512() -> bool:
    """torch's AVX512 level needs AVX-512 F, BW, VL and DQ: all the code uses."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def module():
    """The built extension, or None where it is switched off, unsupported or could not be built."""
    global _module, _failed
    if _module is not None or _failed or not enabled() or not has_avx512():
        return _module
    try:
        _module = extension.build("mapping", SOURCE, "the C++ mapping")
    except Exception as error:  # noqa: BLE001 - any build failure falls back to the torch kernel
        _failed = True
        warnings.warn(f"the C++ mapping could not be built ({type(error).__name__}: {str(error)[:200]}); "
                      "using the compiled torch kernel", RuntimeWarning, stacklevel=2)
    return _module


def _takes(t: torch.Tensor) -> bool:
    """A float32 CPU tensor whose element indices fit the kernels' 32-bit lanes, outside
    torch.compile (whose graphs keep the torch kernels), with the extension at hand."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() >= 1 and t.numel() < 2**31
            and not torch.compiler.is_compiling() and module() is not None)


def serves(x: torch.Tensor, bits: int) -> bool:
    """The C++ mapping handles ``x`` to int8 mantissas: its last dimension contiguous (any
    strides before it)."""
    return bits <= 8 and _takes(x) and (x.stride(-1) == 1 or x.shape[-1] == 1)


def map_int8(x: torch.Tensor, bits: int, rounding: str, key, transposed: bool = False):
    """(mantissas, exponent, clamps, finite) as ``fixed_point.map_kernel`` returns them, the
    mantissas dense in ``x``'s shape. ``transposed``: as ``map_transposed_kernel`` of ``x``."""
    return _module.map_int8(x, bits, rounding == "stochastic", int(key), transposed)


def serves_add(a: torch.Tensor, b: torch.Tensor, bits: int) -> bool:
    """The C++ residual add handles ``a + b``: dense tensors of one shape."""
    return bits <= 16 and a.shape == b.shape and a.is_contiguous() and b.is_contiguous() and _takes(a) and _takes(b)


def add_int8(a: torch.Tensor, b: torch.Tensor, bits: int, rounding: str, keys):
    """(sum, a finite, b finite, clamps) as ``ops.add._add`` returns them."""
    return _module.add_int8(a, b, bits, rounding == "stochastic", [int(k) for k in keys])
