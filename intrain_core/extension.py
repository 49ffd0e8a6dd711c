"""Building a C++ file of ``csrc/`` for this machine's CPU, once, on first use.

Each is built with this CPU's vector instructions (``-march=native``) into
``~/.cache/intrain/extensions`` (``INTRAIN_EXTENSION_CACHE`` elsewhere), one directory per source,
CPU (name and instruction-set flags) and torch version.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
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


def flags(arch: str = "native") -> list[str]:
    chosen = ["-O3", f"-march={arch}", "-fopenmp"]
    if arch == "native" and "AVX512" in torch.backends.cpu.get_cpu_capability():
        chosen.append("-mprefer-vector-width=512")  # g++ uses 256-bit vectors by default
    return chosen


def build_directory(name: str, arch: str = "native") -> Path:
    root = os.environ.get("INTRAIN_EXTENSION_CACHE") or Path.home() / ".cache" / "intrain" / "extensions"
    # Code built with -march=native runs only on the CPU it was built for.
    machine = hashlib.sha256(f"{cpu_model()}|{torch.__version__}|{flags(arch)}".encode()).hexdigest()[:16]
    return Path(root) / f"{name}-{machine}"


def build(name: str, source: Path, purpose: str, arch: str = "native"):
    """``source`` built as the module ``intrain_<name>`` for ``arch`` (g++'s ``-march``).
    Raises where it cannot be built."""
    # Its import warns that there is no CUDA, which this CPU-only build does not need.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    directory = build_directory(name, arch)
    if not any(directory.glob("*.so")):
        logging.getLogger("intrain").info("building %s for this CPU into %s (once, about 30 s)", purpose, directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = f"intrain_{name}" if arch == "native" else f"intrain_{name}_{arch.replace('-', '_')}"
    return load(module, [str(source)], extra_cflags=flags(arch), extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)
