"""``torch._int_mm`` (int8 x int8 -> int32) with operand strides it reads correctly.

On CPU it takes a size-1 dimension's stride as the matrix's leading dimension: a (1, K) row whose
stride is (1, 1), as ``t()`` of a (K, 1) column gives, read wrong sums (torch 2.14.1, found by
tests/test_ops.py). Such operands are re-viewed with dense strides; no data is copied.
"""
from __future__ import annotations

import torch


def _dense_strides(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(t.shape) if 1 in t.shape else t


def int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    a, b = _dense_strides(a), _dense_strides(b)
    return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)
