"""What ranks agree on before they add integers: shared exponents and rank-distinct keys.

Mantissas add exactly only on one exponent. Each rank offers its tensors' top exponents
(``floor(log2 max|x|)``) and a non-finite flag to one MAX all-reduce; the shared exponent of
section 1 (``top - (b - 2)``) then follows from the maximum on every rank alike.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .rounding import stream_key

# The top an all-zero tensor offers to the MAX: below every real one, so it never sets the shared
# exponent (the contract's exponent 0 for zeros would flush the other ranks' values).
NO_VALUE = -(2**40)


def top_exponents(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor ``floor(log2 max|x|)`` (NO_VALUE when all zero), then 1 if any element is NaN
    or Inf (else 0): one int64 vector for a MAX all-reduce."""
    amax = torch.stack([t.detach().abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
                        for t in tensors])
    top = torch.frexp(amax).exponent.to(torch.int64) - 1  # frexp: amax = f 2**k, f in [0.5, 1)
    finite = torch.isfinite(amax)
    top = torch.where((amax > 0) & finite, top, NO_VALUE)
    return torch.cat([top, (~finite).any().to(torch.int64).reshape(1)])


def agree_exponents(tensors: list[torch.Tensor], bits: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the shared exponent of each tensor over all ranks, "every rank's values were finite"):
    one MAX all-reduce. A tensor that is zero on every rank gets exponent 0, as in section 1."""
    tops = top_exponents(tensors)
    dist.all_reduce(tops, op=dist.ReduceOp.MAX, group=group)
    top = tops[:-1]
    return torch.where(top == NO_VALUE, 0, top - (bits - 2)), tops[-1] == 0


def rank_key(base_key, rank: int) -> int:
    """The key of one rank's mapping: a hash of a stream's key (itself a hash of seed and
    counter) and the rank, so that ranks draw independent bits from one shared counter."""
    return stream_key(int(base_key), rank)
