"""Integer ``F.linear`` (docs/numerics-contract.md section 3)."""
from __future__ import annotations

import torch

from ..fixed_point import from_fixed
from .weights import map_weight

INT32_MAX = 2**31 - 1


def map_bias(ctx, bias: torch.Tensor, exponent: torch.Tensor, acc_dtype, reduction: int, product_bound: int,
             where: str):
    """The bias on the accumulator's exponent, saturating where the sum could overflow."""
    headroom = INT32_MAX - reduction * product_bound if acc_dtype == torch.int32 else 2**62
    return ctx.map_at(bias, exponent, headroom, where).mantissa.to(acc_dtype)


class IntegerLinear(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x, weight, bias, ctx, layer):
        n = ctx.numerics
        xq = ctx.map(x, n.forward_bits, ctx.where("linear", "input", layer))
        wq = map_weight(ctx, weight, ctx.where("linear", "weight", layer))
        k = x.shape[-1]
        x2 = xq.mantissa.reshape(-1, k)
        acc_dtype, bound = ctx.accumulator(k, n.forward_bits, n.forward_bits)
        acc = ctx.backend.matmul(x2, wq.mantissa.t(), bound, acc_dtype)
        exponent = xq.exponent + wq.exponent
        if bias is not None:
            acc = acc + map_bias(ctx, bias, exponent, acc_dtype, k, bound, ctx.where("linear", "bias", layer))
        # Reshaped before the conversion: a view returned from a Function cannot be modified in place.
        y = from_fixed(acc.reshape(*x.shape[:-1], weight.shape[0]), exponent)
        fctx.ctx, fctx.layer, fctx.has_bias = ctx, layer, bias is not None
        fctx.x_shape = x.shape
        if n.backward == "float":
            fctx.save_for_backward(x, weight)
        else:  # the integer operands, not float copies
            fctx.save_for_backward(x2, wq.mantissa)
            fctx.exponents = (xq.exponent, wq.exponent)
        ctx.record("linear", "forward", True, x2.shape[0] * k * weight.shape[0], layer)
        return y

    @staticmethod
    def backward(fctx, grad_y):
        ctx, layer = fctx.ctx, fctx.layer
        n = ctx.numerics
        out_features = grad_y.shape[-1]
        g2 = grad_y.reshape(-1, out_features)
        m, k = g2.shape[0], fctx.x_shape[-1]
        macs = 2 * m * k * out_features
        if n.backward == "float":
            x, weight = fctx.saved_tensors
            x2 = x.reshape(-1, k)
            ctx.record("linear", "backward", False, macs, layer)
            grad_b = g2.sum(0) if fctx.has_bias else None
            return (g2 @ weight).reshape(fctx.x_shape), g2.t() @ x2, grad_b, None, None
        x2, w = fctx.saved_tensors
        sx, sw = fctx.exponents
        gq = ctx.map(g2, n.backward_bits, ctx.where("linear", "grad_output", layer))
        acc_dtype, bound = ctx.accumulator(out_features, n.backward_bits, n.forward_bits)
        grad_x = from_fixed(ctx.backend.matmul(gq.mantissa, w, bound, acc_dtype), gq.exponent + sw)
        acc_dtype, bound = ctx.accumulator(m, n.backward_bits, n.forward_bits)
        grad_w = from_fixed(ctx.backend.matmul(gq.mantissa.t(), x2, bound, acc_dtype), gq.exponent + sx)
        grad_b = from_fixed(gq.mantissa.sum(0, dtype=torch.int64), gq.exponent) if fctx.has_bias else None
        ctx.record("linear", "backward", True, macs, layer)
        return grad_x.reshape(fctx.x_shape), grad_w, grad_b, None, None


def linear(ctx, x, weight, bias=None, layer=None):
    return IntegerLinear.apply(x, weight, bias, ctx, layer or ctx.layer)
