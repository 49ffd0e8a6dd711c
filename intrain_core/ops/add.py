"""Integer elementwise add, the residual connection (NUMERICS.md section 5)."""
from __future__ import annotations

import torch

from ..fixed_point import from_fixed, round_mantissas, scale_by_pow2


class IntegerAdd(torch.autograd.Function):
    @staticmethod
    def forward(fctx, a, b, ctx, layer):
        n = ctx.numerics
        aq = ctx.map(a, n.forward_bits, ctx.where("add", "left operand", layer))
        bq = ctx.map(b, n.forward_bits, ctx.where("add", "right operand", layer))
        exponent = max(aq.exponent, bq.exponent)
        # The operand on the finer grid is shifted right onto the coarser one with the run's
        # rounding. Mantissas of at most 16 bits, shifted and summed, are exact in float32,
        # which does these integer operations fastest; the sum needs one bit more.
        fine, coarse = (aq, bq) if aq.exponent < bq.exponent else (bq, aq)
        shifted = scale_by_pow2(fine.mantissa.to(torch.float32), fine.exponent - exponent)
        shifted = round_mantissas(shifted, n.rounding, ctx.generator(a.device))
        ctx.record("add", "forward", True, 0, layer)
        return from_fixed(shifted.add_(coarse.mantissa), exponent)

    @staticmethod
    def backward(fctx, grad):
        # d(a + b) is the identity for both operands: no arithmetic.
        return grad, grad, None, None


def add(ctx, a, b, layer=None):
    return IntegerAdd.apply(a, b, ctx, layer or ctx.layer)
