"""Integer batch norm, layer norm and group norm (NUMERICS.md section 4).

Every norm is the same computation on a grouped view ``(groups, n)`` of the mapped input:
batch norm groups by channel, group norm by (sample, group), layer norm by row.

Training statistics need no division: with integer mantissas ``m`` (exponent ``s``),
``S1 = sum m`` and ``S2 = sum m**2`` in int64,

    x - mean = c / n * 2**s,   c = n m - S1
    var + eps = V / n**2 * 2**(2s),   V = n S2 - S1**2 + eps n**2 2**(-2s)
    xhat = c / sqrt(V)

``1/sqrt(V)`` is a fixed-point iteration: V is shifted (by an even amount) into
``[2**60, 2**62)``, its integer square root Q in ``[2**30, 2**31)`` comes from Newton's
iteration ``y <- (y + V // y) // 2`` on int64, and ``2**61 // Q`` is the reciprocal with 31
significant bits. ``xhat`` is kept with FRACTION_BITS fractional bits (round half up), far
finer than the 8-bit input it is computed from.
"""
from __future__ import annotations

import math

import torch

from ..fixed_point import WideFixed, fixed_constant, from_fixed, to_fixed, to_fixed_at
from .weights import map_weight

FRACTION_BITS = 16
# Mantissas of int64 intermediates are kept within 31 bits before a product with another
# 31-bit quantity, so every product stays below 2**62.
OPERAND_BITS = 31
STATISTICS_BITS = 32  # running mean/var as fixed point while they are updated
# eps is kept to float32's precision: it is all of var + eps for a channel of equal values.
EPS_BITS = 24


def bit_length(v: torch.Tensor) -> torch.Tensor:
    """Elementwise number of bits of non-negative int64 values (0 for 0)."""
    bits = torch.zeros_like(v)
    for shift in (32, 16, 8, 4, 2, 1):
        high = (v >> (bits + shift)) > 0
        bits = bits + high.long() * shift
    return bits + (v >> bits > 0).long()


def round_shift(v: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """``v / 2**shift`` rounded half up; a negative shift multiplies exactly."""
    if not isinstance(shift, torch.Tensor):
        shift = int(shift)
        if shift > 0:
            return (v + (1 << (shift - 1))) >> shift
        return v << -shift if shift < 0 else v
    # Per-group shifts are small tensors: build them once, then two or three passes over v.
    shift = shift.to(device=v.device, dtype=torch.int64)
    right, left = shift.clamp(min=0), (-shift).clamp(min=0)
    half = (right > 0).long() << (right - 1).clamp(min=0)
    if bool((left > 0).any()):
        v = v << left
    return (v + half) >> right


def max_bit_length(v: torch.Tensor) -> int:
    """Bits of the largest magnitude of an int64 tensor (0 for an empty or all-zero one)."""
    return int(bit_length(v.abs().amax().reshape(1))[0]) if v.numel() else 0


def narrow(v: torch.Tensor, bits: int = OPERAND_BITS) -> tuple[torch.Tensor, int]:
    """Shift a whole int64 tensor right so that it fits in ``bits``; returns (v, shift)."""
    shift = max(0, max_bit_length(v) - bits)
    return (round_shift(v, shift) if shift else v), shift


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(v)) for int64 values in [2**60, 2**62): Newton's iteration from 2**31."""
    y = torch.full_like(v, 2**31)
    for _ in range(8):  # from within a factor 2 of the root, 6 steps reach 31 bits
        y = (y + v // y) >> 1
    y = y - (y * y > v).long()
    return y + ((y + 1) * (y + 1) <= v).long()


def reciprocal_sqrt(v: torch.Tensor, exponent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / sqrt(v * 2**exponent) per element of a positive int64 tensor, ``exponent`` even,
    as (mantissa in (2**30, 2**31], per-element exponent)."""
    p = (62 - bit_length(v)) // 2  # v * 4**p has 61 or 62 bits: in [2**60, 2**62)
    scaled = torch.where(p >= 0, v << (2 * p).clamp(min=0), v >> (-2 * p).clamp(min=0))
    inv = (1 << 61) // isqrt(scaled)
    return inv, p - 61 - exponent // 2


def _exponent_of(value: float) -> int:
    """floor(log2(value)) of a positive float."""
    return math.frexp(value)[1] - 1


def _eps_shift(eps_value: float, exponent: int, variance: torch.Tensor) -> int:
    """The even left shift of ``variance`` (units 2**exponent) that gives ``eps_value`` EPS_BITS
    significant bits, as far as int64 allows.

    In the variance's own units eps is ``eps_value * 2**-exponent``: below one unit when few
    values share a large exponent (batch norm over 4 values of magnitude 2: eps n**2 = 1.6e-4
    with units of 2**-10). Rounded there, it vanishes, a channel of equal values gets
    var + eps = 0 instead of eps, and its backward scales gradients by far more than 1/sqrt(eps).
    """
    if eps_value <= 0:
        return 0
    wanted = EPS_BITS - 1 - (_exponent_of(eps_value) - exponent)
    shift = max(0, min(wanted, 61 - max_bit_length(variance)))
    return shift - shift % 2


def to_common_exponent(mantissa: torch.Tensor, exponent: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-group exponents onto the largest one (rounded right shifts): one shared exponent."""
    top = int(exponent.max())
    return round_shift(mantissa, top - exponent), top


class IntegerNorm(torch.autograd.Function):
    """``kind``: "batch" (per channel), "group" or "layer"; ``grouping`` reshapes x to
    (groups, n) and back."""

    @staticmethod
    def forward(fctx, x, weight, bias, ctx, layer, kind, grouping, eps, running, momentum, training):
        n_ = ctx.numerics
        op = f"{kind}_norm"
        xq = ctx.map(x, n_.forward_bits, ctx.where(op, "input", layer))
        m = grouping.group(xq.mantissa.to(torch.int64))
        groups, count = m.shape
        if training:
            s1 = m.sum(1)
            s2 = (m * m).sum(1)
            c = count * m - s1[:, None]
            variance = count * s2 - s1 * s1
            shift = _eps_shift(eps * count * count, 2 * xq.exponent, variance)
            eps_int = to_fixed_at(torch.tensor([eps * count * count]), 2 * xq.exponent - shift, 2**62, "nearest").mantissa
            inv, inv_exp = reciprocal_sqrt(((variance << shift) + int(eps_int)).clamp(min=1), -shift)
            c_exp = 0
            if running is not None:
                _update_running(ctx, running, momentum, s1, variance, count, xq.exponent, layer)
        else:
            mean_r, var_r = running
            c_exp = xq.exponent - FRACTION_BITS
            mean_fixed = to_fixed_at(mean_r.detach().float(), c_exp, 2**62, "nearest", where=ctx.where(op, "running_mean", layer)).mantissa
            c = (m << FRACTION_BITS) - mean_fixed.long()[:, None]
            v = to_fixed(var_r.detach().float(), STATISTICS_BITS, "nearest", where=ctx.where(op, "running_var", layer))
            # eps keeps EPS_BITS where the variances leave room (a channel's may be 0); even, for the root
            v_exp = max(v.exponent - (62 - STATISTICS_BITS), min(v.exponent, _exponent_of(eps) - EPS_BITS))
            v_exp -= v_exp % 2
            v_int = v.mantissa.long() << (v.exponent - v_exp)
            v_int = v_int + to_fixed_at(torch.tensor([eps]), v_exp, 2**62, "nearest").mantissa.long()
            inv, inv_exp = reciprocal_sqrt(v_int.clamp(min=1), v_exp)
        c, c_shift = narrow(c)
        # xhat = c * 2**(c_exp + c_shift) * inv * 2**inv_exp, kept with FRACTION_BITS bits.
        xhat = round_shift(c * inv[:, None], (-(c_exp + c_shift) - inv_exp - FRACTION_BITS)[:, None])
        acc, exponent = grouping.ungroup(xhat), -FRACTION_BITS
        gamma = None
        if weight is not None:
            gamma = map_weight(ctx, weight, ctx.where(op, "weight", layer))
            acc = acc * grouping.affine(gamma.mantissa.long(), x.dim())
            exponent += gamma.exponent
        if bias is not None:
            beta = to_fixed_at(bias, exponent, 2**62, n_.rounding, ctx.generator(x.device), ctx.where(op, "bias", layer))
            acc = acc + grouping.affine(beta.mantissa.long(), x.dim())
        fctx.ctx, fctx.layer, fctx.op, fctx.grouping = ctx, layer, op, grouping
        fctx.training, fctx.count, fctx.x_dim = training, count, x.dim()
        fctx.has = (weight is not None, bias is not None)
        if n_.backward == "float":
            fctx.save_for_backward(x, weight)
            fctx.float_args = (eps, running)
        else:
            fctx.save_for_backward(xhat, inv, gamma.mantissa if gamma is not None else None)
            fctx.exponents = (inv_exp, gamma.exponent if gamma is not None else 0, xq.exponent, c_exp)
        ctx.record(op, "forward", True, 2 * x.numel(), layer)
        return from_fixed(acc, exponent)

    @staticmethod
    def backward(fctx, grad):
        ctx, layer, op, grouping = fctx.ctx, fctx.layer, fctx.op, fctx.grouping
        if ctx.numerics.backward == "float":
            return _float_backward(fctx, grad)
        xhat, inv, gamma_m = fctx.saved_tensors
        inv_exp, gamma_exp, x_exp, c_exp = fctx.exponents
        gq = ctx.map(grad, ctx.numerics.backward_bits, ctx.where(op, "grad_output", layer))
        g = gq.mantissa.long()
        xhat_full = grouping.ungroup(xhat)
        grad_weight = grad_bias = None
        has_weight, has_bias = fctx.has
        if has_weight:
            reduced = grouping.reduce_affine(g * xhat_full, fctx.x_dim)
            grad_weight = from_fixed(reduced, gq.exponent - FRACTION_BITS)
            g = g * grouping.affine(gamma_m.long(), fctx.x_dim)
        if has_bias:
            grad_bias = from_fixed(grouping.reduce_affine(g if not has_weight else gq.mantissa.long(), fctx.x_dim), gq.exponent)
        d_exp = gq.exponent + (gamma_exp if has_weight else 0)
        d = grouping.group(g)  # d(loss)/d(xhat), exponent d_exp
        count = fctx.count
        inner = d << FRACTION_BITS  # exponent d_exp - FRACTION_BITS
        if fctx.training:
            total = d.sum(1, keepdim=True)
            # |sum(d xhat)| / n <= rms(d) rms(xhat) (Cauchy-Schwarz): below 2**(16 + 16).
            projection = (d * xhat).sum(1, keepdim=True)
            inner = inner - round_shift(total << FRACTION_BITS, 0) // count
            inner = inner - round_shift(xhat * (projection // count), FRACTION_BITS)
        inner, inner_shift = narrow(inner)
        # dx = rstd * inner, rstd = n * inv * 2**inv_exp * 2**-x_exp in training (statistics
        # in units of 2**x_exp / n), inv * 2**inv_exp in evaluation.
        scale = inv * count if fctx.training else inv
        scale_bits = bit_length(scale)
        scale_shift = (scale_bits - OPERAND_BITS).clamp(min=0)
        scale = round_shift(scale, scale_shift)
        exp = inv_exp + scale_shift - (x_exp if fctx.training else 0)
        product = inner * scale[:, None]
        product, common = to_common_exponent(product, exp[:, None].expand_as(product))
        grad_x = from_fixed(grouping.ungroup(product), common + d_exp - FRACTION_BITS + inner_shift)
        ctx.record(op, "backward", True, 4 * grad.numel(), layer)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _update_running(ctx, running, momentum, s1, variance, count, exponent, layer):
    """running = (1 - momentum) running + momentum batch_stat, in fixed point; the variance
    is the unbiased one, as in PyTorch."""
    mean_r, var_r = running
    n_ = ctx.numerics
    gen = ctx.generator(mean_r.device)
    keep, take = fixed_constant(1.0 - momentum, 24), fixed_constant(momentum, 24)
    # batch mean = s1 / n * 2**exponent, with 24 fractional bits of a mantissa step
    batch_mean = WideFixed((s1 << 24) // count, exponent - 24)
    # unbiased variance = variance / (n (n - 1)) * 2**(2 exponent)
    shift = max(0, 61 - max_bit_length(variance))
    batch_var = WideFixed((variance << shift) // (count * max(count - 1, 1)), 2 * exponent - shift)
    for buffer, batch in ((mean_r, batch_mean), (var_r, batch_var)):
        old = to_fixed(buffer.detach().float(), STATISTICS_BITS, "nearest", where=f"running statistics of layer '{layer}'")
        old = WideFixed(old.mantissa.long(), old.exponent).times(keep)
        narrowed, shift = narrow(batch.m)
        batch = WideFixed(narrowed, batch.e + shift).times(take)
        new = old.plus(batch, n_.rounding, gen).normalised(STATISTICS_BITS, n_.rounding, gen)
        buffer.copy_(from_fixed(new.m, new.e).to(buffer.dtype))


def _float_backward(fctx, grad):
    """The int8_fwd ablation: float32 backward of the float norm, on the saved float input."""
    x, weight = fctx.saved_tensors
    eps, running = fctx.float_args
    ctx, layer, op = fctx.ctx, fctx.layer, fctx.op
    with torch.enable_grad():
        xd = x.detach().requires_grad_()
        wd = weight.detach().requires_grad_() if weight is not None else None
        bias = torch.zeros_like(wd) if wd is not None and fctx.has[1] else None
        if bias is not None:
            bias.requires_grad_()
        y = fctx.grouping.float_forward(xd, wd, bias, eps, running, fctx.training)
        inputs = [t for t in (xd, wd, bias) if t is not None]
        grads = torch.autograd.grad(y, inputs, grad)
    ctx.record(op, "backward", False, 4 * grad.numel(), layer)
    grads = list(grads)
    grad_x = grads.pop(0)
    grad_w = grads.pop(0) if wd is not None else None
    grad_b = grads.pop(0) if bias is not None else (grad.sum(fctx.grouping.affine_reduce_dims(x.dim())) if fctx.has[1] else None)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


class _Grouping:
    """How a norm groups its input, and how its affine parameters broadcast."""

    def __init__(self, kind, shape, num_groups=1, normalized_ndim=1):
        self.kind, self.shape, self.num_groups, self.normalized_ndim = kind, shape, num_groups, normalized_ndim

    def group(self, t):
        if self.kind == "batch":
            return t.transpose(0, 1).reshape(self.shape[1], -1)
        if self.kind == "group":
            return t.reshape(self.shape[0] * self.num_groups, -1)
        return t.reshape(-1, math.prod(self.shape[-self.normalized_ndim:]))

    def ungroup(self, t):
        if self.kind == "batch":
            moved = (self.shape[1], self.shape[0]) + tuple(self.shape[2:])
            return t.reshape(moved).transpose(0, 1)
        return t.reshape(self.shape)

    def affine(self, p, x_dim):
        if self.kind == "layer":
            return p
        return p.reshape((1, -1) + (1,) * (x_dim - 2))

    def affine_reduce_dims(self, x_dim):
        if self.kind == "layer":
            return tuple(range(x_dim - self.normalized_ndim))
        return (0,) + tuple(range(2, x_dim))

    def reduce_affine(self, t, x_dim):
        return t.sum(self.affine_reduce_dims(x_dim))

    def float_forward(self, x, weight, bias, eps, running, training):
        F = torch.nn.functional
        if self.kind == "batch":
            mean, var = running if running is not None else (None, None)
            return F.batch_norm(x, mean.clone() if mean is not None else None, var.clone() if var is not None else None,
                                weight, bias, training, 0.0, eps)
        if self.kind == "group":
            return F.group_norm(x, self.num_groups, weight, bias, eps)
        return F.layer_norm(x, self.shape[-self.normalized_ndim:], weight, bias, eps)


def batch_norm(ctx, x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, layer=None):
    """Integer ``F.batch_norm``: training uses batch statistics and updates the running ones."""
    if x.dim() < 2:
        return None
    if not training and (running_mean is None or running_var is None):
        training = True  # PyTorch normalises with batch statistics when there are no buffers
    running = (running_mean, running_var) if running_mean is not None else None
    grouping = _Grouping("batch", x.shape)
    return IntegerNorm.apply(x, weight, bias, ctx, layer or ctx.layer, "batch", grouping, eps, running,
                             0.1 if momentum is None else momentum, training)


def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, layer=None):
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    grouping = _Grouping("layer", x.shape, normalized_ndim=len(normalized_shape))
    return IntegerNorm.apply(x, weight, bias, ctx, layer or ctx.layer, "layer", grouping, eps, None, 0.0, True)


def group_norm(ctx, x, num_groups, weight=None, bias=None, eps=1e-5, layer=None):
    grouping = _Grouping("group", x.shape, num_groups=num_groups)
    return IntegerNorm.apply(x, weight, bias, ctx, layer or ctx.layer, "group", grouping, eps, None, 0.0, True)
