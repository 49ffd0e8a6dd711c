"""Buffers that a thread keeps from call to call, for results its caller converts at once.

On a CPU, writing a multi-megabyte result into fresh memory costs more than computing it: each
new page faults. A ViT-tiny linear layer's int32 accumulator (4160 x 768, 12.8 MB) took 4.6 ms
a GEMM inside a training step and 1.05 ms into memory already touched (2-core Xeon with AMX,
2026-12-03). Other devices' allocators already reuse memory, so there a buffer is always new.
"""
from __future__ import annotations

import math
import threading

import torch

# The largest buffer a thread keeps (an operand copy or an int32 result); larger ones are new.
KEPT_BYTES = 64 << 20

_kept = threading.local()


def kept_buffer(name: str, shape, device: torch.device, dtype=torch.int8, keep_bytes: int | None = None) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape``: on a CPU the calling thread's buffer ``name``, reused from
    call to call while it needs at most ``keep_bytes`` (default ``KEPT_BYTES``); a new one
    otherwise. Its contents are whatever the last user left, and the next call with the same
    name overwrites them."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes > (KEPT_BYTES if keep_bytes is None else keep_bytes):
        return torch.empty(shape, dtype=dtype, device=device)
    buffer = getattr(_kept, name, None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = torch.empty(nbytes, dtype=torch.int8)
        setattr(_kept, name, buffer)
    return buffer[:nbytes].view(dtype).view(shape)
