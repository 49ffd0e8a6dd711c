"""Linear fixed-point mapping and its non-linear inverse (NUMERICS.md sections 1-2).

A float tensor becomes integer mantissas that share one power-of-two exponent:
``x ~= mantissa * 2**exponent``. The largest magnitude lands in ``[2**(b-2), 2**(b-1))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROUNDINGS = ("stochastic", "nearest")

# Float32 holds every power of two in [2**-126, 2**127] as a normal number; larger shifts
# are applied in two exact steps.
_MAX_POW2_STEP = 126


class NonFiniteError(FloatingPointError):
    """A NaN or infinity reached an integer op: it has no fixed-point representation."""


@dataclass(frozen=True)
class FixedPoint:
    """Integer mantissas sharing one exponent: the value is ``mantissa * 2**exponent``.

    ``clamped`` counts the elements that saturated at ``+-qmax`` during the mapping.
    """

    mantissa: torch.Tensor
    exponent: int
    bits: int
    clamped: int = 0

    def to_float(self) -> torch.Tensor:
        return from_fixed(self.mantissa, self.exponent)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def mantissa_dtype(bits: int) -> torch.dtype:
    """The narrowest integer dtype that holds a signed ``bits``-bit mantissa."""
    if not 2 <= bits <= 64:
        raise ValueError(f"bit-width must be between 2 and 64, got {bits}")
    for dtype, width in ((torch.int8, 8), (torch.int16, 16), (torch.int32, 32)):
        if bits <= width:
            return dtype
    return torch.int64


def scale_by_pow2(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """``x * 2**exponent`` for float32 ``x``, exact unless the result leaves float32's range."""
    while exponent > _MAX_POW2_STEP:
        x = x * 2.0**_MAX_POW2_STEP
        exponent -= _MAX_POW2_STEP
    while exponent < -_MAX_POW2_STEP:
        x = x * 2.0**-_MAX_POW2_STEP
        exponent += _MAX_POW2_STEP
    return x * 2.0**exponent


def max_exponent(x: torch.Tensor, where: str = "tensor") -> tuple[int, float] | None:
    """``(max floor(log2|x_i|), max|x_i|)`` over nonzero elements, from the IEEE exponent.

    Returns None for an all-zero (or empty) tensor; raises NonFiniteError on NaN or Inf.
    """
    if x.numel() == 0:
        return None
    amax = x.detach().abs().amax().float()
    if not torch.isfinite(amax):
        kind = "NaN" if torch.isnan(x).any() else "Inf"
        raise NonFiniteError(
            f"{kind} in {where}: integer numerics cannot map non-finite values. "
            "Check the learning rate and the input data, or run this layer in float."
        )
    if amax == 0:
        return None
    # frexp gives amax = f * 2**k with f in [0.5, 1), subnormals included.
    return int(torch.frexp(amax).exponent) - 1, float(amax)


def uniform_24bit(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform integers in [0, 2**24) as int32: the u of stochastic rounding, scaled by 2**24.

    Each 64-bit draw of the generator gives two of them (bits 0-23 and 32-55), which halves
    the sequential generator work that dominates stochastic rounding on a CPU.
    """
    count = math.prod(shape)
    words = torch.empty((count + 1) // 2, dtype=torch.int64, device=device).random_(generator=generator)
    halves = words.view(torch.int32)[:count]
    return halves.bitwise_and_(0xFFFFFF).view(shape)


def round_mantissas(
    v: torch.Tensor, rounding: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Round float values to integers (still float): unbiased stochastic, or half-to-even.

    ``v`` is overwritten.
    """
    if rounding == "nearest":
        return torch.round(v)
    if rounding != "stochastic":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    # floor(v) + [u < frac(v)]: frac is exact in float32 and so is frac * 2**24, so with
    # u = r / 2**24 the probability of rounding up is ceil(frac * 2**24) / 2**24: a bias
    # below 2**-24 of a step, where floor(v + u) would add a rounding of the sum.
    r = uniform_24bit(v.shape, generator, v.device)
    floor = torch.floor(v)
    frac_scaled = v.sub_(floor).mul_(2.0**24)
    return floor.add_(torch.lt(r, frac_scaled))


def to_fixed(
    x: torch.Tensor,
    bits: int = 8,
    rounding: str = "stochastic",
    generator: torch.Generator | None = None,
    where: str = "tensor",
) -> FixedPoint:
    """Map ``x`` to ``bits``-bit mantissas with one shared power-of-two exponent.

    ``where`` names the op and layer in error messages.
    """
    dtype = mantissa_dtype(bits)
    found = max_exponent(x, where)
    if found is None:
        return FixedPoint(torch.zeros(x.shape, dtype=dtype, device=x.device), 0, bits)
    e, amax = found
    exponent = e - (bits - 2)
    limit = qmax(bits)
    scaled = scale_by_pow2(x.detach().float(), -exponent)
    m = round_mantissas(scaled, rounding, generator)
    clamped = 0
    # Only values within one step of 2**(e+1) can round past qmax.
    if amax * 2.0**-exponent > limit:
        clamped = int((m.abs() > limit).sum())
        m.clamp_(-limit, limit)
    return FixedPoint(m.to(dtype), exponent, bits, clamped)


def from_fixed(acc: torch.Tensor, exponent: int) -> torch.Tensor:
    """The float32 nearest to ``acc * 2**exponent`` (ties to even).

    Integer-to-float32 conversion rounds to nearest even in one step; the power-of-two scale
    is then exact. Agrees bit for bit with ``backends.reference.from_fixed_bitwise``.
    """
    return scale_by_pow2(acc.to(torch.float32), exponent)


def shift_right(
    mantissa: torch.Tensor,
    shift: int,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Integer ``mantissa / 2**shift`` rounded, in int64: the re-alignment of two exponents.

    Stochastic rounding adds a uniform integer in ``[0, 2**shift)`` before the arithmetic
    shift, which is floor((m + u) / 2**shift): unbiased. Nearest rounds half to even.
    """
    m = mantissa.to(torch.int64)
    if shift <= 0:
        return m << (-shift)
    if shift >= 62:
        # The whole mantissa is below one step: stochastic keeps its expectation.
        shift = 62
    if rounding == "stochastic":
        u = torch.randint(0, 2**shift, m.shape, generator=generator, device=m.device, dtype=torch.int64)
        return (m + u) >> shift
    half = 1 << (shift - 1)
    q = m >> shift
    rem = m - (q << shift)
    round_up = (rem > half) | ((rem == half) & (q & 1).bool())
    return q + round_up.to(torch.int64)


def requantize(
    fp: FixedPoint,
    bits: int,
    rounding: str = "stochastic",
    generator: torch.Generator | None = None,
) -> FixedPoint:
    """Narrow a wide fixed-point tensor to ``bits`` with integer shifts only.

    The new exponent follows section 1: the largest magnitude lands in
    ``[2**(b-2), 2**(b-1))``.
    """
    m = fp.mantissa.to(torch.int64)
    dtype = mantissa_dtype(bits)
    amax = int(m.abs().amax()) if m.numel() else 0
    if amax == 0:
        return FixedPoint(torch.zeros(m.shape, dtype=dtype, device=m.device), 0, bits)
    top_bit = amax.bit_length() - 1
    shift = top_bit - (bits - 2)
    narrowed = shift_right(m, shift, rounding, generator)
    limit = qmax(bits)
    clamped = int((narrowed.abs() > limit).sum()) if shift > 0 else 0
    narrowed = narrowed.clamp_(-limit, limit)
    return FixedPoint(narrowed.to(dtype), fp.exponent + shift, bits, clamped)


def to_fixed_at(
    x: torch.Tensor,
    exponent: int,
    limit: int,
    rounding: str = "stochastic",
    generator: torch.Generator | None = None,
    where: str = "tensor",
) -> FixedPoint:
    """Map ``x`` onto a given exponent, saturating at ``+-limit``: how a bias joins an
    accumulator whose exponent the product already fixed. ``clamped`` counts saturations."""
    max_exponent(x, where)  # raises on NaN/Inf
    scaled = scale_by_pow2(x.detach().float(), -exponent)
    m = round_mantissas(scaled, rounding, generator)
    clamped = int((m.abs() > limit).sum())
    if clamped:
        m.clamp_(-limit, limit)
    dtype = torch.int32 if limit < 2**31 else torch.int64
    return FixedPoint(m.to(dtype), exponent, limit.bit_length() + 1, clamped)


def fixed_constant(value: float, bits: int) -> tuple[int, int]:
    """(mantissa, exponent) of a Python float with ``bits`` significant bits."""
    if value == 0:
        return 0, 0
    e = math.frexp(abs(value))[1] - 1
    exponent = e - (bits - 1)
    return round(value * 2.0**-exponent), exponent


class WideFixed:
    """An int64 mantissa tensor and its exponent, with the few operations SGD and the
    running statistics of batch norm need."""

    __slots__ = ("m", "e")

    def __init__(self, m: torch.Tensor, e: int):
        self.m, self.e = m, e

    def times(self, constant: tuple[int, int]) -> "WideFixed":
        return WideFixed(self.m * constant[0], self.e + constant[1])

    def plus(self, other: "WideFixed", rounding, generator) -> "WideFixed":
        """Align the finer operand onto the coarser exponent (a rounded right shift), add."""
        if not bool(other.m.any()):
            return self
        if not bool(self.m.any()):
            return other
        coarse, fine = (self, other) if self.e >= other.e else (other, self)
        return WideFixed(coarse.m + shift_right(fine.m, coarse.e - fine.e, rounding, generator), coarse.e)

    def normalised(self, bits: int, rounding, generator) -> "WideFixed":
        fp = requantize(FixedPoint(self.m, self.e, 64), bits, rounding, generator)
        return WideFixed(fp.mantissa.to(torch.int64), fp.exponent)
