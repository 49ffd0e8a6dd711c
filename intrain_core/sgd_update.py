"""The arithmetic of one IntSGD step (docs/numerics-contract.md section 8).

``update_definition`` states it for one parameter, as the contract reads. The optimiser runs
the same integers with fewer passes over memory: ``update_alone_kernel`` for a large parameter,
``direction_kernel`` then ``apply_kernel`` for the small parameters of a group together, on flat
buffers (flat_layout.py). They share ``_direction`` and ``_apply`` and differ from the
definition only in how they find each tensor's largest magnitude; tests/test_optim.py checks
them bit for bit against it. Three facts remove passes without changing a bit:
- the gradient's 62-bit mapping puts its largest magnitude in [2**60, 2**61), and the mapping
  is monotone and odd, so the largest mapped value is the mapping of the largest gradient;
- rounding to nearest (half to even) is monotone and odd too: the largest narrowed value is
  the narrowing of the largest one;
- a tensor just narrowed to ``b`` bits has its largest magnitude in [2**(b-2), 2**(b-1)], so
  narrowing it again to ``b`` bits shifts by zero: the momentum is the step, unchanged.
"""
from __future__ import annotations

import torch

from .compiled import fused
from .fixed_point import (add_fixed, bit_length, from_fixed, map_kernel, narrowing_shift, qmax, requantize_kernel,
                          scale_by_pow2, top_exponent)
from .flat_layout import spread_segment_max
from .rounding import shift_right

# The gradient enters on a 62-bit grid: exact for every element within 37 binades of its
# largest (float32 has 24 significant bits); smaller ones round to nearest, as in an alignment.
WIDE_BITS = 62


def coefficient_bits(master_bits: int) -> int:
    """Significant bits of the coefficients (lr, momentum, 1 - dampening, weight decay).

    A master mantissa (< 2**(master_bits-1)) times a coefficient (< 2**bits) stays below
    2**61, and the sum of two aligned such terms below 2**62: int64 holds every product.
    """
    return min(30, 61 - master_bits)


def state_dtype(master_bits: int) -> torch.dtype:
    """Masters and momenta are stored in int32 when their mantissas fit (the default 32 bits):
    half the bytes of int64 for the optimiser state and for the update's memory traffic."""
    return torch.int32 if master_bits <= 32 else torch.int64


def _narrow(m, e, bits: int, rounding: str, key):
    """``m 2**e`` re-normalised to ``bits`` (section 1's exponent)."""
    narrowed, exponent, _ = requantize_kernel.eager(m, e, bits, rounding, key)
    return narrowed.to(torch.int64), exponent


def update_definition(grad, w, w_exp, buf, buf_exp, coefficients, flags, bits: int, rounding: str, keys):
    """One parameter's step, flattened: returns (master, exponent, momentum, exponent, value).

    Intermediates stay on the 62-bit grid (alignments round to nearest); a term narrows to
    ``bits``, to nearest, only where it is multiplied by a coefficient. The two stored results,
    momentum and master, are each rounded once, with the run's rounding: the momentum with the
    first key, the master with the second.

    ``coefficients``: fixed-point (mantissa, exponent) of -lr, momentum, 1 - dampening and
    weight decay; ``flags``: (weight decay, momentum, first step, nesterov, maximize, dampening)."""
    lr, mu, keep, wd = coefficients
    has_wd, has_momentum, first, nesterov, maximize, damped = flags
    stored = state_dtype(bits)
    w, buf = w.to(torch.int64), buf.to(torch.int64)
    g = grad.to(torch.float32)
    if maximize:
        g = -g
    d, d_exp, _, _ = map_kernel.eager(g, WIDE_BITS, "nearest", keys[0])
    d = d.to(torch.int64)
    if has_wd:
        d, d_exp = add_fixed(d, d_exp, w * wd[0], w_exp + wd[1])
    if has_momentum:
        if first:  # torch: the buffer starts as the gradient itself, undamped
            buf, buf_exp = _narrow(d, d_exp, bits, rounding, keys[0])
        else:
            term, term_exp = d, d_exp
            if damped:
                term, term_exp = _narrow(d, d_exp, bits, "nearest", keys[0])
                term, term_exp = term * keep[0], term_exp + keep[1]
            total, grid = add_fixed(buf * mu[0], buf_exp + mu[1], term, term_exp)
            buf, buf_exp = _narrow(total, grid, bits, rounding, keys[0])
        if nesterov:
            d, d_exp = add_fixed(d, d_exp, buf * mu[0], buf_exp + mu[1])
        else:
            d, d_exp = buf, buf_exp
    step, step_exp = _narrow(d, d_exp, bits, "nearest", keys[1])
    total, grid = add_fixed(w, w_exp, step * lr[0], step_exp + lr[1])
    w, w_exp = _narrow(total, grid, bits, rounding, keys[1])
    return w.to(stored), w_exp, buf.to(stored), buf_exp, from_fixed(w, w_exp)


def _narrowed(m, e, top, bits: int, rounding: str, key=0, index=None):
    """``_narrow`` given the bit length ``top`` of the largest magnitude."""
    shift = narrowing_shift(top, bits)
    limit = qmax(bits)
    return shift_right(m, shift, rounding, key, index).clamp(-limit, limit), e + shift


def _nearest_with_max(m, e, largest, bits: int):
    """``_narrowed`` to nearest, with the narrowed largest magnitude: rounding to nearest is
    monotone and odd, so it is the narrowing of ``largest``."""
    top = bit_length(largest)
    narrowed, exponent = _narrowed(m, e, top, bits, "nearest")
    return narrowed, exponent, _narrowed(largest, e, top, bits, "nearest")[0]


class _Rows:
    """A flat layout inside a kernel: per-tensor values spread over rows, the element indices
    within each tensor, and the largest magnitudes that staged kernels are handed.

    A per-tensor maximum that later terms depend on ends a stage: the kernel is given the
    maxima its earlier stages found (``known``, per row, in the order it asks for them) and
    returns the per-row maxima of the first terms it was not given, as a list; inductor drops
    everything computed after them. Between stages ``run_staged`` takes each tensor's maximum
    over its rows. (One kernel with every reduction inside took inductor minutes to generate.)"""

    def __init__(self, layout, known, width):
        self.row_segment, self.first_row, row_offset = layout
        self.index = row_offset + torch.arange(width, dtype=torch.int32, device=row_offset.device)
        self.known, self.wanted = list(known), None

    def spread(self, per_tensor):
        return per_tensor[self.row_segment].unsqueeze(1)

    def collect(self, per_row):
        return per_row.squeeze(1)[self.first_row]

    def row_max(self, t):
        return t.abs().amax(dim=1, keepdim=True)

    def largest(self, *terms):
        """Each term's largest magnitude per tensor, per row."""
        if self.known:
            return [self.known.pop(0) for _ in terms]
        row_max = [self.row_max(t) for t in terms]
        if self.wanted is None:
            self.wanted = row_max
        return row_max  # stand-ins: nothing computed from them is returned


class _Whole:
    """One tensor, flattened, inside one kernel: its own maxima, its own element indices."""

    index = wanted = None

    def spread(self, value):
        return value

    collect = spread

    def row_max(self, t):
        return t.abs().amax()

    def largest(self, *terms):
        return [self.row_max(t) for t in terms]


def run_staged(kernel, layout, *args):
    """Call a staged kernel until it returns its results (a tuple) instead of maxima (a list)."""
    row_segment, first_row, _ = layout
    known = ()
    while True:
        result = kernel(layout, known, *args)
        if isinstance(result, tuple):
            return result
        known += tuple(spread_segment_max(r, row_segment, first_row) for r in result)


def _direction(rows, grad, w, w_exp, buf, buf_exp, keys, coefficients, flags, bits: int, rounding: str):
    """The first half of ``update_definition``: the new momentum and the step. Results:
    (momentum or None, its exponent per tensor, the step or None when it is the momentum, the
    step's exponent, its largest magnitude per row), or the maxima a stage ends with."""
    lr, mu, keep, wd = coefficients
    has_wd, has_momentum, first, nesterov, maximize, damped = flags
    continues = has_momentum and not first
    wide = qmax(WIDE_BITS)
    g = grad.to(torch.float32)
    if maximize:
        g = -g
    w, buf = w.to(torch.int64), (buf.to(torch.int64) if continues else None)
    g_max, *other_max = rows.largest(*[t for t, used in ((g, True), (w, has_wd), (buf, continues)) if used])
    if rows.wanted is not None:
        return rows.wanted
    d_exp = torch.where(g_max > 0, torch.frexp(g_max).exponent.to(torch.int64) - 1 - (WIDE_BITS - 2), 0)
    d = torch.round(scale_by_pow2(g, -d_exp)).to(torch.int64).clamp(-wide, wide)
    d_max = torch.round(scale_by_pow2(g_max, -d_exp)).to(torch.int64).clamp(-wide, wide)
    if has_wd:
        decay_exp = rows.spread(w_exp) + wd[1]
        tops = (top_exponent(d_max, d_exp), top_exponent(other_max.pop(0) * wd[0].abs(), decay_exp))
        d, d_exp = add_fixed(d, d_exp, w * wd[0], decay_exp, tops)
        d_max, = rows.largest(d)
    momentum = momentum_exp = None
    if has_momentum:
        key = rows.spread(keys)
        if first:
            momentum, momentum_exp = _narrowed(d, d_exp, bit_length(d_max), bits, rounding, key, rows.index)
        else:
            term, term_exp, term_max = d, d_exp, d_max
            if damped:
                term, term_exp, term_max = _nearest_with_max(d, d_exp, d_max, bits)
                term, term_exp, term_max = term * keep[0], term_exp + keep[1], term_max * keep[0].abs()
            decay_exp = rows.spread(buf_exp) + mu[1]
            tops = (top_exponent(other_max.pop(0) * mu[0].abs(), decay_exp), top_exponent(term_max, term_exp))
            total, grid = add_fixed(buf * mu[0], decay_exp, term, term_exp, tops)
            total_max, = rows.largest(total)
            momentum, momentum_exp = _narrowed(total, grid, bit_length(total_max), bits, rounding, key, rows.index)
        if not nesterov:
            # Stochastic rounding: only a pass finds the largest, the one that stores it.
            row_max = rows.row_max(momentum)
            if rows.wanted is not None:
                return rows.wanted
            return momentum.to(state_dtype(bits)), rows.collect(momentum_exp), None, momentum_exp, row_max
        momentum_max, = rows.largest(momentum)
        sum_exp = momentum_exp + mu[1]
        tops = (top_exponent(d_max, d_exp), top_exponent(momentum_max * mu[0].abs(), sum_exp))
        d, d_exp = add_fixed(d, d_exp, momentum * mu[0], sum_exp, tops)
        d_max, = rows.largest(d)
        momentum, momentum_exp = momentum.to(state_dtype(bits)), rows.collect(momentum_exp)
    if rows.wanted is not None:
        return rows.wanted
    step, step_exp, step_max = _nearest_with_max(d, d_exp, d_max, bits)
    return momentum, momentum_exp, step.to(state_dtype(bits)), step_exp, step_max


def _apply(rows, w, w_exp, step, step_exp, step_max, keys, lr, bits: int, rounding: str):
    """The second half of ``update_definition``: ``w + lr * step`` narrowed with the master's
    key. Results: (master, its exponent per tensor, float32 values)."""
    w, w_exp = w.to(torch.int64), rows.spread(w_exp)
    step_exp = step_exp + lr[1]
    w_max, = rows.largest(w)
    tops = (top_exponent(w_max, w_exp), top_exponent(step_max * lr[0].abs(), step_exp))
    total, grid = add_fixed(w, w_exp, step.to(torch.int64) * lr[0], step_exp, tops)
    total_max, = rows.largest(total)
    if rows.wanted is not None:
        return rows.wanted
    w, w_exp = _narrowed(total, grid, bit_length(total_max), bits, rounding, rows.spread(keys), rows.index)
    return w.to(state_dtype(bits)), rows.collect(w_exp), scale_by_pow2(w.to(torch.float32), w_exp)


@fused
def direction_kernel(layout, known, grad, *args):
    """``_direction`` on a flat layout: (row_segment, first_row, row_offset) of a FlatLayout,
    the momentum's key per tensor; each stage's maxima per row."""
    return _direction(_Rows(layout, known, grad.shape[1]), grad, *args)


@fused
def apply_kernel(layout, known, w, *args):
    """``_apply`` on a flat layout, as ``direction_kernel``."""
    return _apply(_Rows(layout, known, w.shape[1]), w, *args)


@fused
def update_alone_kernel(grad, w, w_exp, buf, buf_exp, keys, coefficients, flags, bits: int, rounding: str):
    """``update_definition`` for one flattened tensor, in one kernel, with the passes that the
    module's three facts remove left out. Same arguments and results."""
    rows = _Whole()
    momentum, momentum_exp, step, step_exp, step_max = _direction(rows, grad, w, w_exp, buf, buf_exp, keys[0],
                                                                   coefficients, flags, bits, rounding)
    w, w_exp, value = _apply(rows, w, w_exp, momentum if step is None else step, step_exp, step_max, keys[1],
                             coefficients[0], bits, rounding)
    return w, w_exp, momentum, momentum_exp, value


update_alone_kernel.min_numel = 0  # every parameter: the compiled kernel beats a dozen small eager ops
