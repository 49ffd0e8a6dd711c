"""``torch._int_mm`` (int8 x int8 -> int32) with operand strides it reads correctly.

On CPU it takes a size-1 dimension's stride as the matrix's leading dimension: a (1, K) row whose
stride is (1, 1), as ``t()`` of a (K, 1) column gives, read wrong sums (torch 2.14.1, found by
tests/test_ops.py). Such operands are re-viewed with dense strides; no data is copied.
Row-major and column-major operands (a transposed gradient) are read in place, which measured
6x faster than copying the transpose first; other layouts are copied.
"""
from __future__ import annotations

import torch


def _dense_strides(t: torch.Tensor) -> torch.Tensor:
    if 1 in t.shape:
        return t.reshape(-1).view(t.shape)
    rows, columns = t.stride()
    if (columns == 1 and rows >= t.shape[1]) or (rows == 1 and columns >= t.shape[0]):
        return t
    return t.contiguous()


def int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    a, b = _dense_strides(a), _dense_strides(b)
    return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)
