"""The C++ IntSGD step (csrc/int_sgd.cpp), built on first use for this machine's CPU.

It computes the integers of ``sgd_update.update_definition`` for every parameter of a group in
one call, in place. It is built with this CPU's vector instructions (``-march=native``) into
``~/.cache/intrain/extensions`` (``INTRAIN_EXTENSION_CACHE`` elsewhere), one directory per
CPU (name and instruction-set flags) and torch version, once: about 30 s on 2 cores. Where it cannot be built (no C++
compiler) or ``INTRAIN_NATIVE_SGD=0``, IntSGD runs its compiled torch kernels instead: the same
bits, slower.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "int_sgd.cpp"

_module = None
_failed = False


def _cpu_model() -> str:
    """The CPU's name and instruction-set flags: virtual machines of one name differ in their
    flags (AVX2 only, or AVX-512), and code built for one must not run on the other."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":")[0].strip()
                if key in ("model name", "flags") and key not in found:
                    found[key] = line.strip()
                if len(found) == 2:
                    break
    except OSError:
        pass
    return "|".join(found.values()) or platform.processor()


def _flags(arch: str = "native") -> list[str]:
    flags = ["-O3", f"-march={arch}", "-fopenmp"]
    if arch == "native" and "AVX512" in torch.backends.cpu.get_cpu_capability():
        flags.append("-mprefer-vector-width=512")  # g++ uses 256-bit vectors by default
    return flags


def _build_directory(arch: str = "native") -> Path:
    root = os.environ.get("INTRAIN_EXTENSION_CACHE") or Path.home() / ".cache" / "intrain" / "extensions"
    # Code built with -march=native runs only on the CPU it was built for.
    machine = hashlib.sha256(f"{_cpu_model()}|{torch.__version__}|{_flags(arch)}".encode()).hexdigest()[:16]
    return Path(root) / f"int_sgd-{machine}"


def build(arch: str = "native"):
    """The extension built for ``arch`` (g++'s ``-march``; tests build ``haswell``, AVX2 code,
    to check that code path on any x86 CPU). Raises where it cannot be built."""
    # Its import warns that there is no CUDA, which this CPU-only build does not need.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    directory = _build_directory(arch)
    if not any(directory.glob("*.so")):
        logging.getLogger("intrain").info("building IntSGD's C++ step for this CPU into %s (once, about 30 s)",
                                          directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = "intrain_int_sgd" if arch == "native" else f"intrain_int_sgd_{arch.replace('-', '_')}"
    return load(name, [str(SOURCE)], extra_cflags=_flags(arch), extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


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
