"""The C++ IntSGD step (csrc/int_sgd.cpp), built on first use for this machine's CPU.

It computes the integers of ``sgd_update.update_definition`` for every parameter of a group in
one call, in place. It is built with this CPU's vector instructions (``-march=native``) into
``~/.cache/intrain/extensions`` (``INTRAIN_EXTENSION_CACHE`` elsewhere), one directory per
CPU (name and instruction-set flags) and torch version, once: about 30 s on 2 cores. Where it cannot be built (no C++
compiler) or ``INTRAIN_NATIVE_SGD=0``, IntSGD runs its compiled torch kernels instead: the same
bits, slower.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from . import extension

SOURCE = Path(__file__).parent / "csrc" / "int_sgd.cpp"

_module = None
_failed = False


def build(arch: str = "native"):
    """The extension built for ``arch`` (g++'s ``-march``; tests build ``haswell``, AVX2 code,
    to check that code path on any x86 CPU). Raises where it cannot be built."""
    return extension.build("int_sgd", SOURCE, "IntSGD's C++ step", arch)


def enabled() -> bool:
    return os.environ.get("INTRAIN_NATIVE_SGD", "1").strip() != "0"


def module():
    """The built extension, or None where it is switched off or could not be built."""
    global _module, _failed
    if _module is not None or _failed or not enabled():
        return _module
    try:
        _module = build()
    except Exception as error:  # noqa: BLE001 - any build failure falls back to the torch kernels
        _failed = True
        warnings.warn(f"IntSGD's C++ step could not be built ({type(error).__name__}: {str(error)[:200]}); "
                      "using the slower torch kernels", RuntimeWarning, stacklevel=2)
    return _module


def serves(params, master_bits: int) -> bool:
    """The C++ step handles these parameters: dense float32 on the CPU, int32 state."""
    return (master_bits <= 32 and enabled() and not _failed
            and all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
                    and p.numel() < 2**31 for p in params))
