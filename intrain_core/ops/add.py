"""Integer elementwise add, the residual connection (docs/numerics-contract.md section 5)."""
from __future__ import annotations

import torch

from .. import native_mapping
from ..compiled import fused
from ..fixed_point import count_true, from_fixed, qmax, rounded_mantissas, scale_by_pow2, shared_exponent
from ..registry import FALLBACK, implements, is_float32
from ..rounding import as_key, round_float


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
    clamped = count_true(ma.abs() > limit) + count_true(mb.abs() > limit)
    ma, mb = ma.clamp(-limit, limit), mb.clamp(-limit, limit)
    exponent = torch.maximum(ea, eb)
    if ma.shape != mb.shape:  # a broadcast operand draws per element of its own shape
        ma = round_float(scale_by_pow2(ma, ea - exponent), rounding, keys[2])
        mb = round_float(scale_by_pow2(mb, eb - exponent), rounding, keys[3])
        return from_fixed(ma + mb, exponent), finite_a, finite_b, clamped
    # Only the finer operand is rounded: the coarser one's shift is 0, and rounding an integer
    # changes nothing, whatever it draws. Each keeps its own key, so the bits are those of
    # rounding both, with half the draws.
    a_finer = ea < eb
    finer = round_float(scale_by_pow2(torch.where(a_finer, ma, mb), torch.minimum(ea, eb) - exponent), rounding,
                        torch.where(a_finer, keys[2], keys[3]))
    return from_fixed(finer + torch.where(a_finer, mb, ma), exponent), finite_a, finite_b, clamped


def _gradient_for(context, grad: torch.Tensor, shape: torch.Size, layer: str) -> torch.Tensor:
    """The identity, or for an operand that was broadcast (a position embedding, say) the
    integer sum of the mapped gradient over the broadcast dimensions."""
    if grad.shape == shape:
        return grad
    gq = context.map(grad, context.numerics.backward_bits, context.where("add", "grad_output", layer))
    acc = gq.mantissa.to(torch.int64)
    extra = acc.dim() - len(shape)
    if extra:
        acc = acc.sum(dim=tuple(range(extra)))
    expanded = tuple(i for i, size in enumerate(shape) if size == 1 and acc.shape[i] != 1)
    if expanded:
        acc = acc.sum(dim=expanded, keepdim=True)
    context.record("add", "backward", True, 0, layer)
    return from_fixed(acc, gq.exponent)


class IntegerAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, context, layer):
        n = context.numerics
        keys = (context.key(), context.key(), context.key(), context.key())
        if native_mapping.serves_add(a, b, n.forward_bits):
            y, finite_a, finite_b, clamped = native_mapping.add_int8(a.detach(), b.detach(), n.forward_bits, n.rounding,
                                                                     keys)
        else:
            y, finite_a, finite_b, clamped = _add(a.detach(), b.detach(), n.forward_bits, n.rounding,
                                                  tuple(as_key(k) for k in keys))
        context.nonfinite.note(finite_a, context.where("add", "left operand", layer))
        context.nonfinite.note(finite_b, context.where("add", "right operand", layer))
        context.count("clamps", clamped)
        context.record("add", "forward", True, 0, layer)
        ctx.context, ctx.layer, ctx.shapes = context, layer, (a.shape, b.shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        context, layer = ctx.context, ctx.layer
        return _gradient_for(context, grad, ctx.shapes[0], layer), _gradient_for(context, grad, ctx.shapes[1], layer), None, None


def add(context, a, b, layer=None):
    return IntegerAdd.apply(a, b, context, layer or context.layer)


@implements(torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
def add_handler(context, input, other, *args, alpha=1, out=None):
    if args or out is not None or alpha != 1 or not context.numerics.runs_integer("add"):
        return FALLBACK
    if not is_float32(input, other):
        return FALLBACK
    try:
        torch.broadcast_shapes(input.shape, other.shape)
    except RuntimeError:
        return FALLBACK  # let torch raise its own error
    return add(context, input, other)


@implements(torch.Tensor.__iadd__, torch.Tensor.add_)
def add_inplace_handler(context, input, other, *args, **kwargs):
    """``a += b`` and ``a.add_(b)``: the integer sum written back into ``a``, as in place."""
    result = add_handler(context, input, other, *args, **kwargs)
    if result is FALLBACK or result.shape != input.shape:
        return FALLBACK
    return input.copy_(result)
