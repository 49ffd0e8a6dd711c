"""Integer average pooling and mean (docs/numerics-contract.md section 6): an integer window sum times the
fixed-point reciprocal of the window size. Max pooling needs no arithmetic and stays as is."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..fixed_point import from_fixed
from ..registry import FALLBACK, implements, is_float32

# The reciprocal 1/n is held as round(2**(RECIPROCAL_BITS + ceil(log2 n)) / n): at least 24
# significant bits, so its relative error (<= 2**-25) is below float32's own rounding.
RECIPROCAL_BITS = 24


def reciprocal(count: int) -> tuple[int, int]:
    """(mantissa, exponent) of the fixed-point 1/count."""
    frac_bits = RECIPROCAL_BITS + math.ceil(math.log2(count))
    return round(2**frac_bits / count), -frac_bits


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _window_sums(m: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """Exact integer sums over pooling windows. The sums are below 2**24 for any window of
    fewer than 2**24 / 2**15 = 512 elements of 16-bit mantissas, so float32 sums them exactly."""
    sums = F.avg_pool2d(m.to(torch.float32), kernel, stride, padding, divisor_override=1)
    return sums.to(torch.int64)


class IntegerAvgPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, context, layer, kernel, stride, padding):
        n = context.numerics
        xq = context.map(x, n.forward_bits, context.where("avg_pool2d", "input", layer))
        count = kernel[0] * kernel[1]
        recip, recip_exp = reciprocal(count)
        acc = _window_sums(xq.mantissa, kernel, stride, padding) * recip
        ctx.context, ctx.layer, ctx.geometry, ctx.x_shape = context, layer, (kernel, stride, padding), x.shape
        context.record("avg_pool2d", "forward", True, acc.numel() * count, layer)
        return from_fixed(acc, xq.exponent + recip_exp)

    @staticmethod
    def backward(ctx, grad):
        context, layer = ctx.context, ctx.layer
        kernel, stride, padding = ctx.geometry
        count = kernel[0] * kernel[1]
        if context.numerics.backward == "float":
            context.record("avg_pool2d", "backward", False, grad.numel() * count, layer)
            ref = torch.zeros(ctx.x_shape, dtype=grad.dtype, device=grad.device)
            return torch.ops.aten.avg_pool2d_backward(grad, ref, kernel, stride, padding, False, True, None), None, None, None, None, None
        gq = context.map(grad, context.numerics.backward_bits, context.where("avg_pool2d", "grad_output", layer))
        recip, recip_exp = reciprocal(count)
        # Scatter each window's gradient back over its inputs: float64 adds integers exactly
        # (overlapping windows add at most count terms of 16 bits, far below 2**53).
        ref = torch.zeros(ctx.x_shape, dtype=torch.float64, device=grad.device)
        spread = torch.ops.aten.avg_pool2d_backward(gq.mantissa.to(torch.float64), ref, kernel, stride, padding, False, True, 1)
        context.record("avg_pool2d", "backward", True, grad.numel() * count, layer)
        return from_fixed(spread.to(torch.int64) * recip, gq.exponent + recip_exp), None, None, None, None, None


def avg_pool2d(context, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None, layer=None):
    """Integer ``F.avg_pool2d``; None for settings it does not cover (the caller falls back)."""
    kernel = _pair(kernel_size)
    stride = _pair(stride) if stride not in (None, []) else kernel
    padding = _pair(padding)
    if ceil_mode or divisor_override is not None or x.dim() != 4 or (any(padding) and not count_include_pad):
        return None
    return IntegerAvgPool2d.apply(x, context, layer or context.layer, kernel, stride, padding)


def adaptive_avg_pool2d(context, x, output_size, layer=None):
    """Integer ``F.adaptive_avg_pool2d`` when the windows are equal (input divisible by output)."""
    if x.dim() != 4:
        return None
    out = [x.shape[-2 + i] if s is None else s for i, s in enumerate(_pair(output_size))]
    if any(size % o for size, o in zip(x.shape[-2:], out)):
        return None
    kernel = tuple(size // o for size, o in zip(x.shape[-2:], out))
    return IntegerAvgPool2d.apply(x, context, layer or context.layer, kernel, kernel, (0, 0))


class IntegerMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, context, layer, dims, keepdim):
        n = context.numerics
        xq = context.map(x, n.forward_bits, context.where("mean", "input", layer))
        count = math.prod(x.shape[d] for d in dims)
        recip, recip_exp = reciprocal(count)
        acc = xq.mantissa.sum(dims, keepdim=keepdim, dtype=torch.int64) * recip
        ctx.context, ctx.layer, ctx.dims, ctx.keepdim, ctx.x_shape = context, layer, dims, keepdim, x.shape
        context.record("mean", "forward", True, x.numel(), layer)
        return from_fixed(acc, xq.exponent + recip_exp)

    @staticmethod
    def backward(ctx, grad):
        context, layer = ctx.context, ctx.layer
        count = math.prod(ctx.x_shape[d] for d in ctx.dims)
        if not ctx.keepdim:
            for d in sorted(ctx.dims):
                grad = grad.unsqueeze(d)
        if context.numerics.backward == "float":
            context.record("mean", "backward", False, math.prod(ctx.x_shape), layer)
            return grad.expand(ctx.x_shape) / count, None, None, None, None
        gq = context.map(grad, context.numerics.backward_bits, context.where("mean", "grad_output", layer))
        recip, recip_exp = reciprocal(count)
        spread = (gq.mantissa.to(torch.int64) * recip).expand(ctx.x_shape)
        context.record("mean", "backward", True, math.prod(ctx.x_shape), layer)
        return from_fixed(spread, gq.exponent + recip_exp), None, None, None, None


def mean(context, x, dim, keepdim=False, layer=None):
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    dims = tuple(sorted(d % x.dim() for d in dims))
    return IntegerMean.apply(x, context, layer or context.layer, dims, keepdim)


@implements(F.avg_pool2d)
def avg_pool2d_handler(context, input, *args, **kwargs):
    if not context.numerics.runs_integer("pool") or not is_float32(input):
        return FALLBACK
    y = avg_pool2d(context, input, *args, **kwargs)
    return FALLBACK if y is None else y


@implements(F.adaptive_avg_pool2d)
def adaptive_avg_pool2d_handler(context, input, output_size):
    if not context.numerics.runs_integer("pool") or not is_float32(input):
        return FALLBACK
    y = adaptive_avg_pool2d(context, input, output_size)
    return FALLBACK if y is None else y


@implements(torch.mean, torch.Tensor.mean)
def mean_handler(context, input, dim=None, keepdim=False, *, dtype=None):
    if dim is None or dtype is not None or not context.numerics.runs_integer("pool") or not is_float32(input):
        return FALLBACK
    return mean(context, input, dim, keepdim)
