"""Integer batch norm, layer norm and group norm (docs/numerics-contract.md section 4).

Every norm is one computation on a view ``(A, G, B)`` of the mapped input, normalised over A
and B for each of the G groups: batch norm is ``(N, C, HW)``, group norm ``(1, N groups, rest)``,
layer norm ``(1, rows, features)``. No copy is made for a contiguous input.

Training statistics need no division: with integer mantissas ``m`` (exponent ``s``) and
``n = A B`` values per group, ``S1 = sum m`` and ``S2 = sum m**2`` in int64,

    x - mean = c / n * 2**s,   c = n m - S1
    var + eps = V / n**2 * 2**(2s),   V = n S2 - S1**2 + eps n**2 2**(-2s)
    xhat = c / sqrt(V)

V is shifted left by an even amount until eps has EPS_BITS significant bits (a channel of equal
values has V = eps alone). ``1/sqrt(V)`` is a fixed-point iteration: V is shifted (by an even
amount) into ``[2**60, 2**62)``, its integer square root Q in ``[2**30, 2**31)`` comes from
Newton's iteration ``y <- (y + V // y) // 2`` on int64, and ``2**61 // Q`` is the reciprocal
with 31 significant bits. ``xhat`` is kept with FRACTION_BITS fractional bits (round half up),
far finer than the 8-bit input it is computed from.

The forward saves only the int8 mantissas and per-group integers; the backward recomputes
``xhat`` from them. Each direction is one fused kernel: a pass for the statistics, one for the
output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..compiled import fused
from ..fixed_point import (add_fixed, bit_length, fixed_constant, from_fixed, map_at_deferred, map_deferred, qmax,
                           requantize, widen)
from ..registry import FALLBACK, implements, is_float32
from ..rounding import as_key, round_half_up_shift
from .weights import map_weight

FRACTION_BITS = 16
# Mantissas of int64 intermediates are kept within 31 bits before a product with another
# 31-bit quantity, so every product stays below 2**62.
OPERAND_BITS = 31
STATISTICS_BITS = 32  # running mean/var as fixed point while they are updated
# eps is kept to float32's precision: it is all of var + eps for a channel of equal values.
EPS_BITS = 24


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(v)) for int64 values in [2**60, 2**62): Newton's iteration from 2**31."""
    y = torch.full_like(v, 2**31)
    for _ in range(8):  # from within a factor 2 of the root, 6 steps reach 31 bits
        y = (y + v // y) >> 1
    y = y - (y * y > v).to(torch.int64)
    return y + ((y + 1) * (y + 1) <= v).to(torch.int64)


def reciprocal_sqrt(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / sqrt(v) per element of a positive int64 tensor, as (mantissa in (2**30, 2**31],
    exponent)."""
    p = (62 - bit_length(v)) // 2  # v * 4**p has 61 or 62 bits: in [2**60, 2**62)
    # Shifts both ways, one of them by 0, instead of torch.where: inductor's AVX2 code (torch
    # 2.14.1) selected the wrong branch of a where on an int64 comparison (docs/findings.md).
    scaled = (v << (2 * p).clamp(min=0)) >> (-2 * p).clamp(min=0)
    return (1 << 61) // isqrt(scaled), p - 61


def narrow(v: torch.Tensor, bits: int = OPERAND_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift a whole int64 tensor right so that it fits in ``bits``; returns (v, shift)."""
    shift = (bit_length(v.abs().amax()) - bits).clamp(min=0)
    return round_half_up_shift(v, shift), shift


def _floor_log2(value: float) -> int:
    return math.frexp(value)[1] - 1


# --- training statistics --------------------------------------------------------------------
def group_sums(m: torch.Tensor):
    """S1 and S2 per group of the (A, G, B) view, int64: what ranks add to share statistics."""
    if m.dtype in (torch.int8, torch.int16):
        # Squares (at most 2**30) in int32 lanes: AVX2 has no 64-bit vector multiply.
        m32 = m.to(torch.int32)
        return widen(m32).sum((0, 2), keepdim=True), widen(m32 * m32).sum((0, 2), keepdim=True)
    wide = widen(m)
    return wide.sum((0, 2), keepdim=True), (wide * wide).sum((0, 2), keepdim=True)


@fused
def _batch_statistics(m: torch.Tensor, exponent: torch.Tensor, eps_m: int, eps_e: int):
    """Per group of the (A, G, B) view: S1, V, and 1/sqrt(V + eps) as (mantissa, exponent) with
    V shifted left by 2k (k folded into the exponent). ``eps_m 2**eps_e = eps n**2`` with
    EPS_BITS significant bits, added in V's units."""
    s1, s2 = group_sums(m)
    return (s1,) + statistics_from_sums(s1, s2, m.shape[0] * m.shape[2], exponent, eps_m, eps_e)


def statistics_from_sums(s1, s2, n, exponent, eps_m: int, eps_e: int):
    """V and 1/sqrt(V + eps) of ``_batch_statistics`` from the sums of n values."""
    variance = n * s2 - s1 * s1
    # In V's units, 2**(2s), eps is eps_m 2**(eps_e - 2s): below one unit when few values share a
    # large exponent. Shift V left (an even amount, within int64) until eps is whole.
    room = 61 - bit_length(variance.amax())
    shift = (-(eps_e - 2 * exponent)).clamp(min=0).minimum(room).clamp(min=0)
    shift = shift - shift % 2
    eps_int = round_half_up_shift(torch.full_like(s1, eps_m), -(eps_e - 2 * exponent + shift))
    inv, inv_exp = reciprocal_sqrt(((variance << shift) + eps_int).clamp(min=1))
    return variance, inv, inv_exp + shift // 2


def centred_shift(n: int, bits: int) -> int:
    """The right shift that keeps c = n m - S1 (|c| <= 2 n qmax) within OPERAND_BITS."""
    return max(0, (2 * n * qmax(bits)).bit_length() - OPERAND_BITS)


def _xhat(m, s1, inv, inv_exp, n, c_shift: int):
    """xhat with FRACTION_BITS fractional bits: c 2**k / sqrt(V) for c = n m - s1."""
    c = round_half_up_shift(n * widen(m) - s1, c_shift)
    return round_half_up_shift(c * inv, -(inv_exp + FRACTION_BITS + c_shift))


# --- evaluation statistics ------------------------------------------------------------------
def _running_inverse(var_r: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1/sqrt(running_var + eps) per channel as (mantissa, exponent), var and eps added as integers."""
    v, _ = map_deferred(var_r.detach().float(), STATISTICS_BITS, "nearest", 0)
    # eps keeps EPS_BITS where the variances leave room (a channel's may be 0); even, for the root
    v_exp = torch.maximum(v.exponent - (62 - STATISTICS_BITS),
                          torch.minimum(v.exponent, torch.tensor(_floor_log2(eps) - EPS_BITS, device=var_r.device)))
    v_exp = v_exp - v_exp % 2
    v_int = v.mantissa.to(torch.int64) << (v.exponent - v_exp)
    eps_m, eps_e = fixed_constant(eps, EPS_BITS)
    v_int = v_int + round_half_up_shift(torch.full_like(v_int, eps_m), v_exp - eps_e)
    inv, inv_exp = reciprocal_sqrt(v_int.clamp(min=1))
    return inv, inv_exp - v_exp // 2


def _eval_xhat(m, exponent, mean_fixed, inv, inv_exp):
    """xhat = (x - running_mean) / sqrt(running_var + eps) with FRACTION_BITS fractional bits;
    c is in units of 2**(s - FRACTION_BITS)."""
    c, c_shift = narrow((widen(m) << FRACTION_BITS) - mean_fixed)
    return round_half_up_shift(c * inv, -(inv_exp + exponent + c_shift))


# --- affine and backward ----------------------------------------------------------------------
def _affine(xhat, gamma_m, beta_m, exponent):
    acc = xhat
    if gamma_m is not None:
        acc = acc * widen(gamma_m)
    if beta_m is not None:
        acc = acc + beta_m
    return from_fixed(acc, exponent)


def forward_training(m, s1, inv, inv_exp, n, c_shift: int, gamma_m, beta_m, exponent, shape, per_channel: bool):
    """The normalised output from the batch statistics; ``m`` in the (A, G, B) view, the affine
    terms broadcast against x's ``shape``; ``per_channel``: the groups are x's channels."""
    if by_table(m, per_channel):
        table = _output_table(s1, inv, inv_exp, n, c_shift, _per_group(gamma_m), _per_group(beta_m), exponent)
        return _gather(table, m, shape)
    return _forward_training(m, s1, inv, inv_exp, n, c_shift, gamma_m, beta_m, exponent, shape)


@fused
def _forward_training(m, s1, inv, inv_exp, n, c_shift: int, gamma_m, beta_m, exponent, shape):
    xhat = _xhat(m, s1, inv, inv_exp, n, c_shift).reshape(shape)
    return _affine(xhat, gamma_m, beta_m, exponent)


# --- batch norm output by table lookup -------------------------------------------------------
# An int8 mantissa takes one of 256 values, so the training batch norm's output, a function of a
# value's mantissa and its channel alone, is computed once per channel and level (C x 256 values)
# and gathered per element: the same bits without the per-element int64 products, which AVX2
# code multiplies lane by lane (no 64-bit vector multiply). The forward of a 64x64x32x32 batch
# took 6.6 ms for the gather against 18 ms for the arithmetic on an AVX2-only EPYC
# (docs/findings.md); the backward's products depend on the gradient too and stay per element.
LEVELS = 256


def by_table(m, per_channel: bool) -> bool:
    """Whether the table path applies: int8 mantissas, one group per channel (batch norm)."""
    return per_channel and m.dtype == torch.int8


def _per_group(t):
    return None if t is None else t.reshape(1, -1, 1)


def _levels(device) -> torch.Tensor:
    return torch.arange(-LEVELS // 2, LEVELS // 2, dtype=torch.int64, device=device).view(1, 1, LEVELS)


@fused
def _output_table(s1, inv, inv_exp, n, c_shift: int, gamma_m, beta_m, exponent):
    """The float32 output for every (channel, level)."""
    xhat = _xhat(_levels(s1.device), s1, inv, inv_exp, n, c_shift)
    return _affine(xhat, gamma_m, beta_m, exponent)


@fused
def _gather(table, m, shape):
    """``table[0, group, level]`` for every mantissa of the (A, G, B) view ``m``, in ``shape``:
    indexed in that shape, the result is a tensor of its own, not a view, which an autograd
    Function may return to in-place ops.

    Every index lies in the table by construction (a group below G, a level of an int8), so
    the lookup skips indexing's bounds check and negative wrap-around, which inductor cannot
    prove unneeded and which took half of the gather's time (3.6 against 1.7 ms for a
    64x64x32x32 batch on a 2-core Xeon, 2026-12-02)."""
    groups = torch.arange(m.shape[1], dtype=torch.int32, device=m.device).view(1, -1, 1)
    index = (groups * LEVELS + m.to(torch.int32) + LEVELS // 2).reshape(shape)
    return torch.ops.aten._unsafe_index(table.reshape(-1), [index])


_output_table.min_numel = 0  # C x 256 values: one compiled loop instead of a dozen eager passes


@fused
def _forward_evaluation(m, x_exp, mean_fixed, inv, inv_exp, gamma_m, beta_m, exponent, shape):
    xhat = _eval_xhat(m, x_exp, mean_fixed, inv, inv_exp).reshape(shape)
    return _affine(xhat, gamma_m, beta_m, exponent)


def _affine_gradients(g, gamma_m, xhat, affine_dims: tuple):
    """Integer sums for d(loss)/d(gamma) (FRACTION_BITS units) and d(loss)/d(beta), and
    d = g gamma = d(loss)/d(xhat), in xhat's (A, G, B) view."""
    wide = widen(g)
    grad_weight = (wide * xhat.reshape(g.shape)).sum(affine_dims) if gamma_m is not None else None
    grad_bias = wide.sum(affine_dims)
    d = wide if gamma_m is None else wide * widen(gamma_m)
    return grad_weight, grad_bias, d.reshape(xhat.shape)


def _backward_training(m, s1, inv, inv_exp, g, gamma_m, n, c_shift: int, scale_shift: int, x_exp, g_exp, gamma_exp,
                       affine_dims: tuple):
    """d(loss)/dx for batch statistics, and the affine gradients, all integer.

    With d = g gamma (exponent g_exp + gamma_exp) and xhat in FRACTION_BITS fixed point:
    dx = rstd (d - mean(d) - xhat mean(d xhat)), rstd = n inv 2**(inv_exp - x_exp).
    ``m``, ``s1`` and ``inv`` are in the (A, G, B) view; ``g`` and ``gamma_m`` in x's shape.

    Three kernels, each reading the int8 inputs once: the sums, the largest |inner| (for the
    narrowing shift), and dx. Each recomputes xhat and d from int8 rather than keep them:
    in one graph inductor stored ``inner`` as an activation-size int64 tensor and read it twice.
    """
    grad_weight, grad_bias, total, projection = _backward_sums_only(m, s1, inv, inv_exp, g, gamma_m, n, c_shift,
                                                                    affine_dims)
    inner_shift = _backward_inner_shift(m, s1, inv, inv_exp, g, gamma_m, n, c_shift, total, projection)
    grad_x = _backward_output(m, s1, inv, inv_exp, g, gamma_m, n, c_shift, total, projection, inner_shift,
                              scale_shift, x_exp, g_exp, gamma_exp)
    return grad_x, grad_weight, grad_bias


@fused
def _backward_sums_only(m, s1, inv, inv_exp, g, gamma_m, n, c_shift: int, affine_dims: tuple):
    _, grad_weight, grad_bias, _, total, projection = backward_sums(m, s1, inv, inv_exp, g, gamma_m, n, c_shift,
                                                                    affine_dims)
    return grad_weight, grad_bias, total, projection


def _inner(m, s1, inv, inv_exp, g, gamma_m, n, c_shift: int, total, projection):
    xhat = _xhat(m, s1, inv, inv_exp, n, c_shift)
    d = widen(g)
    if gamma_m is not None:
        d = d * widen(gamma_m)
    return backward_inner(xhat, d.reshape(xhat.shape), total, projection, n)


@fused
def _backward_inner_shift(m, s1, inv, inv_exp, g, gamma_m, n, c_shift: int, total, projection):
    """``narrow``'s shift of the inner term, from its largest magnitude."""
    inner = _inner(m, s1, inv, inv_exp, g, gamma_m, n, c_shift, total, projection)
    return (bit_length(inner.abs().amax()) - OPERAND_BITS).clamp(min=0)


@fused
def _backward_output(m, s1, inv, inv_exp, g, gamma_m, n, c_shift: int, total, projection, inner_shift,
                     scale_shift: int, x_exp, g_exp, gamma_exp):
    inner = round_half_up_shift(_inner(m, s1, inv, inv_exp, g, gamma_m, n, c_shift, total, projection), inner_shift)
    grad_x = backward_input(inner, inner_shift, inv, inv_exp, n, scale_shift, x_exp, g_exp, gamma_exp)
    return grad_x.reshape(g.shape)


def backward_sums(m, s1, inv, inv_exp, g, gamma_m, n, c_shift: int, affine_dims: tuple):
    """xhat, the affine gradients, d, and the per-group sums of d and d xhat (int64): what
    ranks add to share the backward's statistics."""
    xhat = _xhat(m, s1, inv, inv_exp, n, c_shift)
    grad_weight, grad_bias, d = _affine_gradients(g, gamma_m, xhat, affine_dims)
    total = d.sum((0, 2), keepdim=True)
    # |sum(d xhat)| / n <= rms(d) rms(xhat) (Cauchy-Schwarz): below 2**(16 + 16).
    projection = (d * xhat).sum((0, 2), keepdim=True)
    return xhat, grad_weight, grad_bias, d, total, projection


def backward_inner(xhat, d, total, projection, n):
    """d - mean(d) - xhat mean(d xhat) in FRACTION_BITS units, from the sums over all n values."""
    inner = (d << FRACTION_BITS) - torch.div(total << FRACTION_BITS, n, rounding_mode="floor")
    return inner - round_half_up_shift(xhat * torch.div(projection, n, rounding_mode="floor"), FRACTION_BITS)


def backward_input(inner, inner_shift, inv, inv_exp, n, scale_shift: int, x_exp, g_exp, gamma_exp):
    """dx in the (A, G, B) view from ``inner`` narrowed by ``inner_shift`` to OPERAND_BITS."""
    scale = round_half_up_shift(inv * n, scale_shift)
    exponent = inv_exp + scale_shift - x_exp + g_exp + gamma_exp - FRACTION_BITS + inner_shift
    return from_fixed(inner * scale, exponent)


@fused
def _backward_evaluation(m, exponent, mean_fixed, inv, inv_exp, g, gamma_m, g_exp, gamma_exp, affine_dims: tuple):
    """d(loss)/dx with running statistics: dx = d rstd; and the affine gradients."""
    xhat = _eval_xhat(m, exponent, mean_fixed, inv, inv_exp)
    grad_weight, grad_bias, d = _affine_gradients(g, gamma_m, xhat, affine_dims)
    d, d_shift = narrow(d)
    return from_fixed(d * inv, inv_exp + g_exp + gamma_exp + d_shift).reshape(g.shape), grad_weight, grad_bias


class IntegerNorm(torch.autograd.Function):
    """``grouping`` gives the (A, G, B) view of x and the broadcast shape of the affine terms."""

    @staticmethod
    def forward(ctx, x, weight, bias, context, layer, grouping, eps, running, momentum, training):
        n_ = context.numerics
        op = f"{grouping.kind}_norm"
        xq, finite = context.map_with_flag(x, n_.forward_bits, context.where(op, "input", layer))
        m = grouping.view(xq.mantissa)
        count = m.shape[0] * m.shape[2]
        c_shift = centred_shift(count, n_.forward_bits)
        exponent = torch.full_like(xq.exponent, -FRACTION_BITS)
        gamma = beta = None
        if weight is not None:
            gamma = map_weight(context, weight, context.where(op, "weight", layer))
            exponent = exponent + gamma.exponent
        if bias is not None:
            beta = context.map_at(bias, exponent, 2**62, context.where(op, "bias", layer))
        gamma_aff = grouping.affine(gamma.mantissa) if gamma is not None else None
        beta_aff = grouping.affine(beta.mantissa) if beta is not None else None
        if training:
            eps_m, eps_e = fixed_constant(eps * count * count, EPS_BITS) if eps > 0 else (0, 0)
            s1, variance, inv, inv_exp = _batch_statistics(m, xq.exponent, eps_m, eps_e)
            y = forward_training(m, s1, inv, inv_exp, count, c_shift, gamma_aff, beta_aff, exponent, x.shape,
                                 grouping.kind == "batch")
            stats = (s1, inv, inv_exp)
            if running is not None:
                update_running(context, running, momentum, s1.flatten(), variance.flatten(), count, xq.exponent, finite)
        else:
            mean_r, var_r = running
            # The running statistics are finite: a step that met NaN or Inf does not update them.
            mean_fixed = map_at_deferred(mean_r, xq.exponent - FRACTION_BITS, 2**62, "nearest", 0)[0].mantissa
            inv, inv_exp = _running_inverse(var_r, eps)
            mean_fixed, inv, inv_exp = (grouping.stat_view(t) for t in (mean_fixed, inv, inv_exp))
            y = _forward_evaluation(m, xq.exponent, mean_fixed, inv, inv_exp, gamma_aff, beta_aff, exponent, x.shape)
            stats = (mean_fixed, inv, inv_exp)
        ctx.context, ctx.layer, ctx.op, ctx.grouping = context, layer, op, grouping
        ctx.training, ctx.count, ctx.c_shift, ctx.x_shape = training, count, c_shift, x.shape
        ctx.has = (weight is not None, bias is not None)
        if n_.backward == "float":
            ctx.save_for_backward(x, weight)
            ctx.float_args = (eps, running)
        else:
            ctx.save_for_backward(xq.mantissa, xq.exponent, *stats, gamma.mantissa if gamma is not None else None,
                                   gamma.exponent if gamma is not None else None)
        context.record(op, "forward", True, 2 * x.numel(), layer)
        return y

    @staticmethod
    def backward(ctx, grad):
        context, layer, op, grouping = ctx.context, ctx.layer, ctx.op, ctx.grouping
        if context.numerics.backward == "float":
            return _float_backward(ctx, grad)
        mantissa, x_exp, a, inv, inv_exp, gamma_m, gamma_exp = ctx.saved_tensors
        gq = context.map(grad, context.numerics.backward_bits, context.where(op, "grad_output", layer))
        m = grouping.view(mantissa)
        has_weight, has_bias = ctx.has
        gamma_aff = grouping.affine(gamma_m) if has_weight else None
        gamma_exp = gamma_exp if has_weight else torch.zeros_like(x_exp)
        dims = grouping.affine_reduce_dims(len(ctx.x_shape))
        if ctx.training:
            grad_x, grad_w, grad_b = _backward_training(m, a, inv, inv_exp, gq.mantissa, gamma_aff, ctx.count,
                                                        ctx.c_shift, ctx.count.bit_length(), x_exp, gq.exponent,
                                                        gamma_exp, dims)
        else:
            grad_x, grad_w, grad_b = _backward_evaluation(m, x_exp, a, inv, inv_exp, gq.mantissa, gamma_aff,
                                                          gq.exponent, gamma_exp, dims)
        grad_weight = from_fixed(grad_w, gq.exponent - FRACTION_BITS) if has_weight else None
        grad_bias = from_fixed(grad_b, gq.exponent) if has_bias else None
        context.record(op, "backward", True, 4 * grad.numel(), layer)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


def update_running(context, running, momentum, s1, variance, count, exponent, finite):
    """running = (1 - momentum) running + momentum batch_stat, in fixed point; the variance
    is the unbiased one, as in PyTorch. A step whose input was not finite changes nothing."""
    keys = (as_key(context.key()), as_key(context.key()))
    mean, var = _running_statistics(running[0].detach(), running[1].detach(), s1, variance, exponent, finite, keys,
                                     count, momentum, context.numerics.rounding)
    running[0].copy_(mean)
    running[1].copy_(var)


@fused
def _running_statistics(mean, var, s1, variance, exponent, finite, keys, count: int, momentum: float, rounding: str):
    """``update_running``'s new buffers: one kernel, where eager ops took 3-4 ms per layer."""
    keep, take = fixed_constant(1.0 - momentum, 24), fixed_constant(momentum, 24)
    # batch mean = s1 / n * 2**exponent, with 24 fractional bits of a mantissa step
    batch_mean = (torch.div(s1 << 24, count, rounding_mode="floor"), exponent - 24)
    # unbiased variance = variance / (n (n - 1)) * 2**(2 exponent)
    shift = (61 - bit_length(variance.amax())).clamp(min=0)
    batch_var = (torch.div(variance << shift, count * max(count - 1, 1), rounding_mode="floor"), 2 * exponent - shift)
    updated = []
    for buffer, (bm, be), key in ((mean, batch_mean, keys[0]), (var, batch_var, keys[1])):
        old, _ = map_deferred(buffer.float(), STATISTICS_BITS, "nearest", 0)
        bm, b_shift = narrow(bm)
        total, grid = add_fixed(widen(old.mantissa) * keep[0], old.exponent + keep[1],
                                bm * take[0], be + b_shift + take[1])
        new = requantize(total, grid, STATISTICS_BITS, rounding, key)
        updated.append(torch.where(finite, from_fixed(new.mantissa, new.exponent).to(buffer.dtype), buffer))
    return tuple(updated)


_running_statistics.min_numel = 0


def _float_backward(ctx, grad):
    """The int8_fwd ablation: float32 backward of the float norm, on the saved float input."""
    x, weight = ctx.saved_tensors
    eps, running = ctx.float_args
    context, layer, op = ctx.context, ctx.layer, ctx.op
    with torch.enable_grad():
        xd = x.detach().requires_grad_()
        wd = weight.detach().requires_grad_() if weight is not None else None
        bias = torch.zeros_like(wd) if wd is not None and ctx.has[1] else None
        if bias is not None:
            bias.requires_grad_()
        y = ctx.grouping.float_forward(xd, wd, bias, eps, running, ctx.training)
        inputs = [t for t in (xd, wd, bias) if t is not None]
        grads = torch.autograd.grad(y, inputs, grad)
    context.record(op, "backward", False, 4 * grad.numel(), layer)
    grads = list(grads)
    grad_x = grads.pop(0)
    grad_w = grads.pop(0) if wd is not None else None
    grad_b = grads.pop(0) if bias is not None else (grad.sum(ctx.grouping.affine_reduce_dims(x.dim())) if ctx.has[1] else None)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class _Grouping:
    """How a norm groups its input into (A, G, B), and how its affine parameters broadcast."""

    def __init__(self, kind, shape, num_groups=1, normalized_ndim=1):
        self.kind, self.shape, self.num_groups, self.normalized_ndim = kind, tuple(shape), num_groups, normalized_ndim

    def view_shape(self):
        s = self.shape
        if self.kind == "batch":
            return (s[0], s[1], math.prod(s[2:]))
        if self.kind == "group":
            return (1, s[0] * self.num_groups, math.prod(s) // (s[0] * self.num_groups))
        features = math.prod(s[-self.normalized_ndim:])
        return (1, math.prod(s) // features, features)

    def view(self, t):
        return t.reshape(self.view_shape())

    def stat_view(self, t):
        """A per-channel vector (batch norm evaluation) as (1, G, 1)."""
        return t.reshape(1, -1, 1)

    def affine(self, p):
        if self.kind == "layer":
            return p
        return p.reshape((1, -1) + (1,) * (len(self.shape) - 2))

    def affine_reduce_dims(self, x_dim):
        if self.kind == "layer":
            return tuple(range(x_dim - self.normalized_ndim))
        return (0,) + tuple(range(2, x_dim))

    def float_forward(self, x, weight, bias, eps, running, training):
        F = torch.nn.functional
        if self.kind == "batch":
            mean, var = running if running is not None else (None, None)
            return F.batch_norm(x, mean.clone() if mean is not None else None, var.clone() if var is not None else None,
                                weight, bias, training, 0.0, eps)
        if self.kind == "group":
            return F.group_norm(x, self.num_groups, weight, bias, eps)
        return F.layer_norm(x, self.shape[-self.normalized_ndim:], weight, bias, eps)


def batch_norm(context, x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, layer=None):
    """Integer ``F.batch_norm``: training uses batch statistics and updates the running ones."""
    if x.dim() < 2:
        return None
    if not training and (running_mean is None or running_var is None):
        training = True  # PyTorch normalises with batch statistics when there are no buffers
    running = (running_mean, running_var) if running_mean is not None else None
    grouping = _Grouping("batch", x.shape)
    return IntegerNorm.apply(x, weight, bias, context, layer or context.layer, grouping, eps, running,
                             0.1 if momentum is None else momentum, training)


def layer_norm(context, x, normalized_shape, weight=None, bias=None, eps=1e-5, layer=None):
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    grouping = _Grouping("layer", x.shape, normalized_ndim=len(normalized_shape))
    return IntegerNorm.apply(x, weight, bias, context, layer or context.layer, grouping, eps, None, 0.0, True)


def group_norm(context, x, num_groups, weight=None, bias=None, eps=1e-5, layer=None):
    grouping = _Grouping("group", x.shape, num_groups=num_groups)
    return IntegerNorm.apply(x, weight, bias, context, layer or context.layer, grouping, eps, None, 0.0, True)


def _handler(op):
    def handler(context, *args, **kwargs):
        if not context.numerics.runs_integer("norm") or not is_float32(args[0]):
            return FALLBACK
        y = op(context, *args, **kwargs)
        return FALLBACK if y is None else y

    return handler


implements(F.batch_norm)(_handler(batch_norm))
implements(F.layer_norm)(_handler(layer_norm))
implements(F.group_norm)(_handler(group_norm))
