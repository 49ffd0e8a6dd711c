"""Integer ``torch.matmul`` between two activations, e.g. attention's QK^T and attn @ V
(docs/numerics-contract.md section 3): both operands are mapped."""
from __future__ import annotations

import torch

from ..fixed_point import from_fixed
from ..registry import FALLBACK, implements, is_float32


def _sum_to_shape(acc: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Integer sum over the batch dimensions that broadcasting added or expanded."""
    extra = acc.dim() - len(shape)
    expanded = tuple(i for i, size in enumerate(shape) if size == 1 and acc.shape[extra + i] != 1)
    if extra:
        acc = acc.sum(dim=tuple(range(extra)), dtype=torch.int64)
    if expanded:
        acc = acc.sum(dim=expanded, keepdim=True, dtype=torch.int64)
    return acc


class IntegerMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, context, layer, op, scale_exponent):
        n = context.numerics
        aq = context.map(a, n.forward_bits, context.where(op, "left operand", layer))
        bq = context.map(b, n.forward_bits, context.where(op, "right operand", layer))
        k = a.shape[-1]
        acc_dtype, bound = context.accumulator(k, n.forward_bits, n.forward_bits)
        # The scale joins the right operand's exponent: y = a @ (b 2**scale_exponent), exactly.
        y = context.backend.matmul_to_float(aq.mantissa, aq.exponent, bq.mantissa, bq.exponent + scale_exponent, bound,
                                            acc_dtype)
        ctx.context, ctx.layer, ctx.op, ctx.scale_exponent = context, layer, op, scale_exponent
        ctx.shapes = (a.shape, b.shape)
        if n.backward == "float":
            ctx.save_for_backward(a, b)
        else:
            ctx.save_for_backward(aq.mantissa, bq.mantissa)
            ctx.exponents = (aq.exponent, bq.exponent)
        macs = y.numel() * k
        ctx.macs = macs
        context.record(op, "forward", True, macs, layer)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        context, layer, op = ctx.context, ctx.layer, ctx.op
        n = context.numerics
        a_shape, b_shape = ctx.shapes
        if n.backward == "float":
            a, b = ctx.saved_tensors
            context.record(op, "backward", False, 2 * ctx.macs, layer)
            scale = 2.0**ctx.scale_exponent
            grad_a = (grad_y @ b.transpose(-1, -2) * scale).sum_to_size(a_shape)
            grad_b = (a.transpose(-1, -2) @ grad_y * scale).sum_to_size(b_shape)
            return grad_a, grad_b, None, None, None, None
        a, b = ctx.saved_tensors
        sa, sb = ctx.exponents
        gq = context.map(grad_y, n.backward_bits, context.where(op, "grad_output", layer))
        g, eg = gq.mantissa, gq.exponent + ctx.scale_exponent
        grad_a = _product_gradient(context, g, eg, b.transpose(-1, -2), sb, g.shape[-1], a_shape)
        grad_b = _product_gradient(context, a.transpose(-1, -2), sa, g, eg, g.shape[-2], b_shape)
        context.record(op, "backward", True, 2 * ctx.macs, layer)
        return grad_a, grad_b, None, None, None, None


def _product_gradient(context, left, left_exponent, right, right_exponent, reduction: int, shape: torch.Size):
    """One operand's gradient ``left @ right``, summed over the batch dimensions that broadcasting
    added or expanded; those sums happen in int64, before the mapping back."""
    n = context.numerics
    acc_dtype, bound = context.accumulator(reduction, n.backward_bits, n.forward_bits)
    exponent = left_exponent + right_exponent
    if torch.broadcast_shapes(left.shape[:-2], right.shape[:-2]) != shape[:-2]:
        return from_fixed(_sum_to_shape(context.backend.matmul(left, right, bound, acc_dtype), shape), exponent)
    return context.backend.matmul_to_float(left, left_exponent, right, right_exponent, bound, acc_dtype)


def matmul(context, a, b, layer=None, op="matmul", scale_exponent: int = 0):
    """Integer ``(a @ b) * 2**scale_exponent`` for operands of at least two dimensions."""
    return IntegerMatmul.apply(a, b, context, layer or context.layer, op, scale_exponent)


def _handler(op_name: str):
    def handler(context, input, other, *args, **kwargs):
        if args or kwargs or not context.numerics.runs_integer("matmul") or not is_float32(input, other):
            return FALLBACK
        if input.dim() < 2 or other.dim() < 2:
            return FALLBACK
        return matmul(context, input, other, op=op_name)

    return handler


implements(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)(_handler("matmul"))
implements(torch.bmm, torch.Tensor.bmm)(_handler("bmm"))
implements(torch.mm, torch.Tensor.mm)(_handler("mm"))


@implements(torch.Tensor.__rmatmul__)
def rmatmul_handler(context, input, other):
    return _handler("matmul")(context, other, input)
