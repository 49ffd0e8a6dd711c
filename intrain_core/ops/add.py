"""Integer elementwise add, the residual connection (docs/numerics-contract.md section 5)."""
from __future__ import annotations

import torch

from ..compiled import fused
from ..fixed_point import from_fixed, qmax, rounded_mantissas, scale_by_pow2, shared_exponent
from ..rounding import round_float


@fused
def _add(a: torch.Tensor, b: torch.Tensor, bits: int, rounding: str, keys: tuple[int, int, int, int]):
    """Both operands mapped, the finer one shifted onto the coarser exponent, summed: one fused
    kernel. Mantissas of at most 16 bits, shifted and summed, are exact in float32; the sum needs
    one bit more. The coarser operand's shift is 0, which rounds nothing."""
    limit = qmax(bits)
    af, bf = a.to(torch.float32), b.to(torch.float32)
    ea, finite_a = shared_exponent(af, bits)
    eb, finite_b = shared_exponent(bf, bits)
    ma = rounded_mantissas(af, ea, rounding, keys[0])
    mb = rounded_mantissas(bf, eb, rounding, keys[1])
    clamped = (ma.abs() > limit).sum() + (mb.abs() > limit).sum()
    exponent = torch.maximum(ea, eb)
    ma = round_float(scale_by_pow2(ma.clamp(-limit, limit), ea - exponent), rounding, keys[2])
    mb = round_float(scale_by_pow2(mb.clamp(-limit, limit), eb - exponent), rounding, keys[3])
    return from_fixed(ma + mb, exponent), finite_a, finite_b, clamped


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
        keys = (ctx.key(), ctx.key(), ctx.key(), ctx.key())
        y, finite_a, finite_b, clamped = _add(a.detach(), b.detach(), n.forward_bits, n.rounding, keys)
        ctx.nonfinite.note(finite_a, ctx.where("add", "left operand", layer))
        ctx.nonfinite.note(finite_b, ctx.where("add", "right operand", layer))
        ctx.count("clamps", clamped)
        ctx.record("add", "forward", True, 0, layer)
        fctx.ctx, fctx.layer, fctx.shapes = ctx, layer, (a.shape, b.shape)
        return y

    @staticmethod
    def backward(fctx, grad):
        ctx, layer = fctx.ctx, fctx.layer
        return _gradient_for(ctx, grad, fctx.shapes[0], layer), _gradient_for(ctx, grad, fctx.shapes[1], layer), None, None


def add(ctx, a, b, layer=None):
    return IntegerAdd.apply(a, b, ctx, layer or ctx.layer)
