"""Several parameters laid out in one flat buffer, so that one kernel updates them all.

Each parameter occupies whole rows of a ``(rows, ROW)`` buffer, zero-padded to the end of its
last row. A row belongs to one parameter, so a per-parameter quantity (a shared exponent, the
largest magnitude, a rounding key) is one value per row, and a per-parameter reduction is a
reduction along the rows followed by one over each parameter's few rows.
"""
from __future__ import annotations

import torch

# Elements per row: long enough to vectorise, short enough that padding stays small (a
# 64-element bias wastes 960 elements; ResNet-18 and ViT-tiny pad by under 2 %).
ROW = 1024


class FlatLayout:
    """Where each tensor of ``shapes`` lives in a flat ``(rows, ROW)`` buffer."""

    def __init__(self, shapes, device):
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        if min(self.numels, default=1) == 0:
            raise ValueError("a flat layout holds non-empty tensors only")
        row_counts = [-(-n // ROW) for n in self.numels]
        starts = [0]
        for count in row_counts:
            starts.append(starts[-1] + count)
        self.rows = starts[-1]
        self.starts = starts[:-1]
        counts = torch.tensor(row_counts, device=device)
        # Per row: the tensor it belongs to, and the index of its first element in that tensor.
        self.row_segment = torch.repeat_interleave(torch.arange(len(row_counts), device=device), counts)
        self.first_row = torch.tensor(self.starts, dtype=torch.int64, device=device)
        within = torch.arange(self.rows, device=device) - self.first_row[self.row_segment]
        self.row_offset = (within * ROW).to(torch.int32).unsqueeze(1)
        self.device = device

    def empty(self, dtype) -> torch.Tensor:
        return torch.zeros(self.rows, ROW, dtype=dtype, device=self.device)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's elements in ``flat``, in its own shape (views: writes go through)."""
        line = flat.view(-1)
        return [line[start * ROW:start * ROW + n].view(shape)
                for start, n, shape in zip(self.starts, self.numels, self.shapes)]

    def gather(self, tensors, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """``tensors`` copied into a flat buffer (``out`` if given; its padding must be zero)."""
        flat = self.empty(dtype) if out is None else out
        torch._foreach_copy_(self.views(flat), list(tensors))
        return flat


def segment_max(per_row: torch.Tensor, row_segment: torch.Tensor, first_row: torch.Tensor) -> torch.Tensor:
    """Each tensor's largest value of ``per_row`` (one value per row of the layout)."""
    per_tensor = torch.zeros(first_row.shape, dtype=per_row.dtype, device=per_row.device)
    return per_tensor.scatter_reduce(0, row_segment, per_row, "amax")


def spread_segment_max(per_row: torch.Tensor, row_segment: torch.Tensor, first_row: torch.Tensor) -> torch.Tensor:
    """Per-row maxima ``(rows, 1)`` made each tensor's maximum, repeated on its rows."""
    return segment_max(per_row.squeeze(1), row_segment, first_row)[row_segment].unsqueeze(1)
