"""Integer elementwise add, the residual connection (NUMERICS.md section 5)."""
from __future__ import annotations

import torch

from ..fixed_point import from_fixed, shift_right


class IntegerAdd(torch.autograd.Function):
    @staticmethod
    def forward(fctx, a, b, ctx, layer):
        n = ctx.numerics
        aq = ctx.map(a, n.forward_bits, ctx.where("add", "left operand", layer))
        bq = ctx.map(b, n.forward_bits, ctx.where("add", "right operand", layer))
        exponent = max(aq.exponent, bq.exponent)
        gen = ctx.generator(a.device)
        # The operand on the finer grid is shifted right onto the coarser one; the sum needs
        # one more bit than the operands, so it is held in int16/int64.
        ma = shift_right(aq.mantissa, exponent - aq.exponent, n.rounding, gen)
        mb = shift_right(bq.mantissa, exponent - bq.exponent, n.rounding, gen)
        ctx.record("add", "forward", True, 0, layer)
        return from_fixed(ma + mb, exponent)

    @staticmethod
    def backward(fctx, grad):
        # d(a + b) is the identity for both operands: no arithmetic.
        return grad, grad, None, None


def add(ctx, a, b, layer=None):
    return IntegerAdd.apply(a, b, ctx, layer or ctx.layer)
