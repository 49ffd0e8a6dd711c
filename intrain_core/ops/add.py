"""Integer elementwise add, the residual connection (NUMERICS.md section 5)."""
from __future__ import annotations

import torch

from ..fixed_point import from_fixed, round_mantissas, scale_by_pow2


def _gradient_for(ctx, grad: torch.Tensor, shape: torch.Size, layer: str) -> torch.Tensor:
    """The identity, or for an operand that was broadcast (a position embedding, say) the
    integer sum of the mapped gradient over the broadcast dimensions."""
    if grad.shape == shape:
        return grad
    gq = ctx.map(grad, ctx.numerics.backward_bits, ctx.where("add", "grad_output", layer))
    acc = gq.mantissa.to(torch.int64)
    extra = acc.dim() - len(shape)
    if extra:
        acc = acc.sum(dim=tuple(range(extra)))
    expanded = tuple(i for i, size in enumerate(shape) if size == 1 and acc.shape[i] != 1)
    if expanded:
        acc = acc.sum(dim=expanded, keepdim=True)
    ctx.record("add", "backward", True, 0, layer)
    return from_fixed(acc, gq.exponent)


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
        fctx.ctx, fctx.layer, fctx.shapes = ctx, layer, (a.shape, b.shape)
        return from_fixed(shifted + coarse.mantissa, exponent)

    @staticmethod
    def backward(fctx, grad):
        ctx, layer = fctx.ctx, fctx.layer
        return _gradient_for(ctx, grad, fctx.shapes[0], layer), _gradient_for(ctx, grad, fctx.shapes[1], layer), None, None


def add(ctx, a, b, layer=None):
    return IntegerAdd.apply(a, b, ctx, layer or ctx.layer)
