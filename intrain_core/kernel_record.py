"""Which fused kernels inductor's on-disk cache already holds, so a later process compiles them
at their first call.

A kernel that an earlier process compiled loads from inductor's cache in 0.1-0.3 s; compiling it
anew takes about a second after the compiler's start-up (2-core Xeon, 2026-12-03). ``compiled``'s
ski-rental rule prices every compilation at the new cost, so without this record a short run
keeps such kernels eager for its first dozens of steps although the cache holds them.

The record is a JSON list of signatures inside inductor's cache directory, so it goes when the
cache goes. A signature covers the kernel, its options, its inputs' dtypes, ranks and device, the
torch version and intrain's own source: a change to any of them makes inductor compile anew.
A wrong guess costs one compilation at the first call instead of later; nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

FILE_NAME = "intrain-compiled-kernels.json"

_records: dict[Path, set[str]] = {}
_code_version: str | None = None


def _directory() -> Path | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir())
    except (ImportError, OSError):
        return None


def code_version() -> str:
    """A hash of the torch version and of every source file of intrain_core."""
    global _code_version
    if _code_version is None:
        digest = hashlib.sha256(torch.__version__.encode())
        for path in sorted(Path(__file__).parent.rglob("*.py")):
            digest.update(path.read_bytes())
        _code_version = digest.hexdigest()
    return _code_version


def layout(data) -> tuple:
    """dtype, rank and device type of each tensor in ``data`` (tensors and tuples of them)."""
    result = []
    for item in data:
        if isinstance(item, torch.Tensor):
            result.append((item.dtype, item.dim(), item.device.type))
        elif isinstance(item, (tuple, list)):
            result.append(layout(item))
    return tuple(result)


def signature(fn, options: tuple, data_layout: tuple) -> str:
    text = f"{code_version()}|{fn.__module__}.{fn.__qualname__}|{options!r}|{data_layout!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read(path: Path) -> set[str]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return {e for e in entries if isinstance(e, str)} if isinstance(entries, list) else set()


def _record() -> tuple[Path | None, set[str]]:
    directory = _directory()
    if directory is None:
        return None, set()
    if directory not in _records:
        _records[directory] = _read(directory / FILE_NAME)
    return directory, _records[directory]


def known(sig: str) -> bool:
    return sig in _record()[1]


def remember(sig: str) -> None:
    """Add ``sig``, merged with what other processes wrote meanwhile; a record that cannot be
    written (a read-only cache) is left as it is."""
    directory, record = _record()
    if directory is None or sig in record:
        return
    record.add(sig)
    path = directory / FILE_NAME
    record |= _read(path)
    temporary = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".intrain-record-")
        with os.fdopen(fd, "w") as f:
            json.dump(sorted(record), f)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
