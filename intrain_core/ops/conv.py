"""Integer conv1d/conv2d and conv_transpose2d, lowered onto the backend's exact integer
convolution kernels (docs/numerics-contract.md section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fixed_point import from_fixed
from ..registry import FALLBACK, implements, is_float32
from .linear import map_bias
from .weights import map_weight


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


class IntegerConv2d(torch.autograd.Function):
    """``transposed=False``: y = conv2d(x, w). ``transposed=True``: y = conv_transpose2d(x, w),
    which is the input-gradient of a conv2d whose input is y; its backward swaps roles."""

    @staticmethod
    def forward(ctx, x, weight, bias, context, layer, geometry, transposed):
        n = context.numerics
        op = "conv_transpose2d" if transposed else "conv2d"
        stride, padding, dilation, groups, output_shape = geometry
        xq = context.map(x, n.forward_bits, context.where(op, "input", layer))
        wq = map_weight(context, weight, context.where(op, "weight", layer))
        taps = weight.shape[2] * weight.shape[3]
        # Products summed per output element: in-channels per group x taps (for a transposed
        # conv, the out-channels of the underlying conv).
        reduction = (weight.shape[0] // groups if transposed else weight.shape[1]) * taps
        acc_dtype, bound = context.accumulator(reduction, n.forward_bits, n.forward_bits)
        be = context.backend
        exponent = xq.exponent + wq.exponent
        b = None
        if bias is not None:
            b = map_bias(context, bias, exponent, acc_dtype, reduction, bound, context.where(op, "bias", layer))
            b = b.view(1, -1, 1, 1)
        # scratch: the accumulator is converted at once, so it may live in a buffer the thread reuses.
        if transposed:
            acc = be.conv2d_input(output_shape, wq.mantissa, xq.mantissa, stride, padding, dilation, groups, bound,
                                  acc_dtype, scratch=True)
        else:
            acc = be.conv2d(xq.mantissa, wq.mantissa, stride, padding, dilation, groups, bound, acc_dtype, scratch=True)
        y = from_fixed(acc, exponent, b)
        ctx.context, ctx.layer, ctx.op = context, layer, op
        ctx.geometry, ctx.transposed, ctx.has_bias = geometry, transposed, bias is not None
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        ctx.macs = y.numel() * reduction
        if n.backward == "float":
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(xq.mantissa, wq.mantissa)
            ctx.exponents = (xq.exponent, wq.exponent)
        context.record(op, "forward", True, ctx.macs, layer)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        context, layer, op = ctx.context, ctx.layer, ctx.op
        n = context.numerics
        stride, padding, dilation, groups, _ = ctx.geometry
        x, w = ctx.saved_tensors
        if n.backward == "float":
            context.record(op, "backward", False, 2 * ctx.macs, layer)
            if ctx.transposed:
                grad_x = torch.nn.functional.conv2d(grad_y, w, None, stride, padding, dilation, groups)
                grad_w = torch.nn.grad.conv2d_weight(grad_y, w.shape, x, stride, padding, dilation, groups)
            else:
                grad_x = torch.nn.grad.conv2d_input(x.shape, w, grad_y, stride, padding, dilation, groups)
                grad_w = torch.nn.grad.conv2d_weight(x, w.shape, grad_y, stride, padding, dilation, groups)
            grad_b = grad_y.sum((0, 2, 3)) if ctx.has_bias else None
            return grad_x, grad_w, grad_b, None, None, None, None
        sx, sw = ctx.exponents
        gq = context.map(grad_y, n.backward_bits, context.where(op, "grad_output", layer))
        g = gq.mantissa
        be = context.backend
        taps = w.shape[2] * w.shape[3]
        positions = g.shape[0] * g.shape[2] * g.shape[3]
        bits = (n.backward_bits, n.forward_bits)
        if ctx.transposed:
            dtype, bound = context.accumulator(w.shape[1] * taps, *bits)
            grad_x = from_fixed(be.conv2d(g, w, stride, padding, dilation, groups, bound, dtype, scratch=True),
                                gq.exponent + sw)
            dtype, bound = context.accumulator(x.shape[0] * x.shape[2] * x.shape[3], *bits)
            grad_w = be.conv2d_weight(g, w.shape, x, stride, padding, dilation, groups, bound, dtype)
        else:
            dtype, bound = context.accumulator(w.shape[0] // groups * taps, *bits)
            grad_x = from_fixed(be.conv2d_input(x.shape, w, g, stride, padding, dilation, groups, bound, dtype,
                                                scratch=True), gq.exponent + sw)
            dtype, bound = context.accumulator(positions, *bits)
            grad_w = be.conv2d_weight(x, w.shape, g, stride, padding, dilation, groups, bound, dtype)
        grad_w = from_fixed(grad_w, gq.exponent + sx)
        grad_b = from_fixed(g.sum((0, 2, 3), dtype=torch.int64), gq.exponent) if ctx.has_bias else None
        context.record(op, "backward", True, 2 * ctx.macs, layer)
        return grad_x, grad_w, grad_b, None, None, None, None


def _resolve_padding(padding, weight, dilation):
    """Numeric padding for 'valid' and symmetric 'same'; None when it needs asymmetric padding."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return _pair(padding)


def conv2d(context, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, layer=None):
    """Integer ``F.conv2d``; returns None when the geometry is not supported (caller falls back)."""
    stride, dilation = _pair(stride), _pair(dilation)
    padding = _resolve_padding(padding, weight, dilation)
    if padding is None or x.dim() != 4:
        return None
    geometry = (stride, padding, dilation, groups, None)
    return IntegerConv2d.apply(x, weight, bias, context, layer or context.layer, geometry, False)


def conv1d(context, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, layer=None):
    """Integer ``F.conv1d`` as a conv2d over a height of one."""
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
    def along_width(v, height):
        return (height, v[0] if isinstance(v, (tuple, list)) else v)

    pad = padding if isinstance(padding, str) else along_width(padding, 0)
    y = conv2d(
        context, x.unsqueeze(2), weight.unsqueeze(2), bias, along_width(stride, 1), pad, along_width(dilation, 1), groups, layer
    )
    if y is None:
        return None
    y = y.squeeze(2)
    return y.squeeze(0) if unbatched else y


def conv_transpose2d(context, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, layer=None):
    if x.dim() != 4:
        return None
    stride, padding, output_padding, dilation = map(_pair, (stride, padding, output_padding, dilation))
    out_hw = [
        (size - 1) * s - 2 * p + d * (k - 1) + op + 1
        for size, s, p, d, k, op in zip(x.shape[2:], stride, padding, dilation, weight.shape[2:], output_padding)
    ]
    output_shape = (x.shape[0], weight.shape[1] * groups, *out_hw)
    geometry = (stride, padding, dilation, groups, output_shape)
    return IntegerConv2d.apply(x, weight, bias, context, layer or context.layer, geometry, True)


def _handler(op):
    def handler(context, input, weight, bias=None, *args, **kwargs):
        if not context.numerics.runs_integer("conv") or not is_float32(input, weight):
            return FALLBACK
        y = op(context, input, weight, bias, *args, **kwargs)
        return FALLBACK if y is None else y

    return handler


implements(F.conv1d)(_handler(conv1d))
implements(F.conv2d)(_handler(conv2d))
implements(F.conv_transpose2d)(_handler(conv_transpose2d))
