"""Integer ``torch.matmul`` between two activations, e.g. attention's QK^T and attn @ V
(docs/numerics-contract.md section 3): both operands are mapped."""
from __future__ import annotations

import torch

from ..fixed_point import from_fixed


def _sum_to_shape(acc: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Integer sum over the batch dimensions that broadcasting added or expanded."""
    extra = acc.dim() - len(shape)
    if extra:
        acc = acc.sum(dim=tuple(range(extra)), dtype=torch.int64)
    expanded = tuple(i for i, size in enumerate(shape) if size == 1 and acc.shape[i] != 1)
    if expanded:
        acc = acc.sum(dim=expanded, keepdim=True, dtype=torch.int64)
    return acc


class IntegerMatmul(torch.autograd.Function):
    @staticmethod
    def forward(fctx, a, b, ctx, layer, op):
        n = ctx.numerics
        aq = ctx.map(a, n.forward_bits, ctx.where(op, "left operand", layer))
        bq = ctx.map(b, n.forward_bits, ctx.where(op, "right operand", layer))
        k = a.shape[-1]
        acc_dtype, bound = ctx.accumulator(k, n.forward_bits, n.forward_bits)
        acc = ctx.backend.matmul(aq.mantissa, bq.mantissa, bound, acc_dtype)
        y = from_fixed(acc, aq.exponent + bq.exponent)
        fctx.ctx, fctx.layer, fctx.op = ctx, layer, op
        fctx.shapes = (a.shape, b.shape)
        if n.backward == "float":
            fctx.save_for_backward(a, b)
        else:
            fctx.save_for_backward(aq.mantissa, bq.mantissa)
            fctx.exponents = (aq.exponent, bq.exponent)
        macs = y.numel() * k
        fctx.macs = macs
        ctx.record(op, "forward", True, macs, layer)
        return y

    @staticmethod
    def backward(fctx, grad_y):
        ctx, layer, op = fctx.ctx, fctx.layer, fctx.op
        n = ctx.numerics
        a_shape, b_shape = fctx.shapes
        if n.backward == "float":
            a, b = fctx.saved_tensors
            ctx.record(op, "backward", False, 2 * fctx.macs, layer)
            grad_a = (grad_y @ b.transpose(-1, -2)).sum_to_size(a_shape)
            grad_b = (a.transpose(-1, -2) @ grad_y).sum_to_size(b_shape)
            return grad_a, grad_b, None, None, None
        a, b = fctx.saved_tensors
        sa, sb = fctx.exponents
        gq = ctx.map(grad_y, n.backward_bits, ctx.where(op, "grad_output", layer))
        g = gq.mantissa
        acc_dtype, bound = ctx.accumulator(g.shape[-1], n.backward_bits, n.forward_bits)
        grad_a = ctx.backend.matmul(g, b.transpose(-1, -2), bound, acc_dtype)
        # Sums over broadcast batch dimensions happen afterwards, in int64.
        acc_dtype, bound = ctx.accumulator(g.shape[-2], n.backward_bits, n.forward_bits)
        grad_b = ctx.backend.matmul(a.transpose(-1, -2), g, bound, acc_dtype)
        grad_a = from_fixed(_sum_to_shape(grad_a, a_shape), gq.exponent + sb)
        grad_b = from_fixed(_sum_to_shape(grad_b, b_shape), gq.exponent + sa)
        ctx.record(op, "backward", True, 2 * fctx.macs, layer)
        return grad_a, grad_b, None, None, None


def matmul(ctx, a, b, layer=None, op="matmul"):
    """Integer ``a @ b`` for operands of at least two dimensions."""
    return IntegerMatmul.apply(a, b, ctx, layer or ctx.layer, op)
