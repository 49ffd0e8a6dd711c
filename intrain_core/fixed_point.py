"""Linear fixed-point mapping and its non-linear inverse (docs/numerics-contract.md sections 1-2).

A float tensor becomes integer mantissas that share one power-of-two exponent:
``x ~= mantissa * 2**exponent``. The largest magnitude lands in ``[2**(b-2), 2**(b-1))``.
The exponent is a 0-dim int64 tensor on the tensor's device, so no mapping waits for the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import native_mapping
from .compiled import fused
from .rounding import as_key, check_rounding, round_float, shift_right, transposed_index


class NonFiniteError(FloatingPointError):
    """A NaN or infinity reached an integer op: it has no fixed-point representation."""


def nonfinite_message(where: str) -> str:
    return (f"NaN or Inf in {where}: integer numerics cannot map non-finite values. "
            "Lower the learning rate, check the input data, or run this layer in float.")


@dataclass(frozen=True)
class FixedPoint:
    """Integer mantissas sharing one exponent: the value is ``mantissa * 2**exponent``.

    ``exponent`` is a 0-dim int64 tensor on the mantissa's device; ``clamped`` counts the
    elements that saturated at ``+-qmax`` (a 0-dim tensor, read only when reported).
    """

    mantissa: torch.Tensor
    exponent: torch.Tensor
    bits: int
    clamped: torch.Tensor | int = 0

    def to_float(self) -> torch.Tensor:
        return from_fixed(self.mantissa, self.exponent)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def mantissa_dtype(bits: int) -> torch.dtype:
    """int8 or int16, the narrowest that holds a signed ``bits``-bit mantissa; int64 for wider
    ones (masters and statistics, which feed int64 arithmetic anyway)."""
    if not 2 <= bits <= 64:
        raise ValueError(f"bit-width must be between 2 and 64, got {bits}")
    for dtype, width in ((torch.int8, 8), (torch.int16, 16)):
        if bits <= width:
            return dtype
    return torch.int64


def pow2(e: torch.Tensor) -> torch.Tensor:
    """``2.0**e`` in float32, built from its bits: exact for integer ``e`` in [-126, 127]."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def scale_by_pow2(x: torch.Tensor, exponent) -> torch.Tensor:
    """``x * 2**exponent`` for float32 ``x``, exact unless the result leaves float32's range.

    Two factors in [2**-126, 2**127] cover exponents up to +-252; the first keeps an integer
    ``x`` normal, so a subnormal result is rounded once.
    """
    if not isinstance(exponent, torch.Tensor):
        exponent = torch.tensor(exponent, dtype=torch.int64, device=x.device)
    first = exponent.clamp(-126, 127)
    second = (exponent - first).clamp(-126, 127)
    return x * pow2(first) * pow2(second)


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int64. Bytes go through int32: inductor's CPU vector code converts int8 straight
    to int64 over ten times slower than in two steps (docs/findings.md)."""
    if t.dtype in (torch.int8, torch.uint8):
        t = t.to(torch.int32)
    return t.to(torch.int64)


def bit_length(v: torch.Tensor) -> torch.Tensor:
    """Elementwise number of bits of non-negative int64 values (0 for 0)."""
    bits = torch.zeros_like(v)
    for step in (32, 16, 8, 4, 2, 1):
        bits = bits + ((v >> (bits + step)) > 0).to(torch.int64) * step
    return bits + ((v >> bits) > 0).to(torch.int64)


def _finish(m: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp integer-valued ``m`` (float, int32 or int64) to ``+-qmax`` and count the clamps."""
    limit = qmax(bits)
    # A float holds a mantissa of up to 24 bits exactly, and int32 lanes are twice as many.
    m = m.to(torch.int32 if (m.is_floating_point() and bits <= 24) or m.dtype == torch.int32 else torch.int64)
    return m.clamp(-limit, limit).to(mantissa_dtype(bits)), count_true(m.abs() > limit)


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """The number of True elements as a 0-dim int64 tensor, summed in int32 lanes where the
    count fits (twice as many per vector as int64's)."""
    if mask.numel() < 2**31:
        return mask.sum(dtype=torch.int32).to(torch.int64)
    return mask.sum()


def shared_exponent(xf: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(section 1's exponent, whether every element is finite) of float32 ``xf``: the largest
    magnitude's IEEE exponent, 0 for an all-zero tensor."""
    amax = xf.abs().amax()
    finite = torch.isfinite(amax)
    top = torch.frexp(amax).exponent.to(torch.int64) - 1  # frexp: amax = f 2**k, f in [0.5, 1)
    return torch.where((amax > 0) & finite, top - (bits - 2), 0), finite


def rounded_mantissas(xf: torch.Tensor, exponent: torch.Tensor, rounding: str, key: int,
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """``R(xf * 2**-exponent)``, integer values still in float32 (exact for up to 24 bits)."""
    return round_float(scale_by_pow2(xf, -exponent), rounding, key, index)


def _mapped(xf: torch.Tensor, bits: int, rounding: str, key: int, index: torch.Tensor | None = None):
    """(mantissas, exponent, clamps, finite) of float32 ``xf``; ``index`` as in ``random_bits``."""
    exponent, finite = shared_exponent(xf, bits)
    m, clamped = _finish(rounded_mantissas(xf, exponent, rounding, key, index), bits)
    return m, exponent, clamped, finite


@fused
def map_kernel(x: torch.Tensor, bits: int, rounding: str, key: int):
    """The mapping in one pass for the maximum and one for the mantissas."""
    return _mapped(x.to(torch.float32), bits, rounding, key)


# A mapping is two dozen eager ops: compiled, even a bias of 64 elements maps in a third of
# the time (100 against 270 us on a 2-core Xeon, 2026-12-01). The same holds for the kernels below.
map_kernel.min_numel = 0


@fused
def map_transposed_kernel(xt: torch.Tensor, bits: int, rounding: str, key: int):
    """``map_kernel`` of ``xt.transpose(-1, -2)`` for a dense ``xt``, computed in ``xt``'s
    memory order; the mantissas come back in that order."""
    xf = xt.to(torch.float32).reshape(-1, *xt.shape[-2:])
    m, exponent, clamped, finite = _mapped(xf, bits, rounding, key, transposed_index(xt.shape, xt.device))
    return m.view(xt.shape), exponent, clamped, finite


map_transposed_kernel.min_numel = 0


def _reads_down_columns(x: torch.Tensor) -> bool:
    """``x`` is laid out as a transpose in its last two dimensions (an attention key, K^T), and
    its indices fit in int32. Mapping it through the view read memory with a stride of a row and
    took twice as long as copying its transpose's rows together and mapping those in memory
    order (timm's key of a ViT-tiny, 5.7 against 2.7 ms, 2026-12-01)."""
    return (x.dim() >= 2 and x.shape[-1] > 1 and x.shape[-2] > 1 and x.stride(-2) == 1 and x.stride(-1) != 1
            and x.numel() < 2**31)


def to_fixed(x: torch.Tensor, bits: int = 8, rounding: str = "stochastic", key: int = 0,
             where: str = "tensor") -> FixedPoint:
    """Map ``x`` to ``bits``-bit mantissas with one shared power-of-two exponent.

    ``key`` selects the stochastic draws (rounding.stream_key); ``where`` names the op and layer
    when ``x`` holds NaN or Inf.
    """
    fp, finite = map_deferred(x, bits, rounding, key)
    if not bool(finite):
        raise NonFiniteError(nonfinite_message(where))
    return fp


def map_deferred(x: torch.Tensor, bits: int, rounding: str, key: int) -> tuple[FixedPoint, torch.Tensor]:
    """``to_fixed`` without waiting for the device: also returns a 0-dim bool tensor, False
    when ``x`` held NaN or Inf (its mantissas are then meaningless)."""
    check_rounding(rounding)
    dtype = mantissa_dtype(bits)
    if x.numel() == 0:
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        return FixedPoint(torch.zeros(x.shape, dtype=dtype, device=x.device), zero, bits, zero), zero == 0
    if _reads_down_columns(x):
        xt = x.detach().transpose(-1, -2)
        if native_mapping.serves(xt, bits):
            m, exponent, clamped, finite = native_mapping.map_int8(xt, bits, rounding, key, transposed=True)
        else:
            m, exponent, clamped, finite = map_transposed_kernel(xt.contiguous(), bits, rounding, as_key(key))
        return FixedPoint(m.transpose(-1, -2), exponent, bits, clamped), finite
    if native_mapping.serves(x, bits):
        m, exponent, clamped, finite = native_mapping.map_int8(x.detach(), bits, rounding, key)
    else:
        m, exponent, clamped, finite = map_kernel(x.detach(), bits, rounding, as_key(key))
    return FixedPoint(m, exponent, bits, clamped), finite


@fused
def from_fixed_kernel(acc: torch.Tensor, exponent: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    if offset is not None:
        acc = acc + offset
    # Contiguous: a channels-last accumulator (an int_mm convolution) is reordered in this
    # same pass, since the norms that follow reduce per channel far faster over NCHW.
    return scale_by_pow2(acc.to(torch.float32), exponent).contiguous()


def from_fixed(acc: torch.Tensor, exponent, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 nearest to ``(acc + offset) * 2**exponent`` (ties to even), in a contiguous
    tensor. ``offset`` (a bias on the accumulator's exponent, broadcast) is added as integers of
    ``acc``'s dtype in the same pass; the caller keeps the sum within it.

    Integer-to-float32 conversion rounds to nearest even in one step; the power-of-two scale
    is then exact. Agrees bit for bit with ``backends.reference.from_fixed_bitwise``.
    """
    if not isinstance(exponent, torch.Tensor):
        exponent = torch.tensor(exponent, dtype=torch.int64, device=acc.device)
    return from_fixed_kernel(acc, exponent, offset)


@fused
def map_at_kernel(x: torch.Tensor, exponent: torch.Tensor, limit: int, rounding: str, key: int):
    xf = x.to(torch.float32)
    m = round_float(scale_by_pow2(xf, -exponent), rounding, key).to(torch.int64)
    return m.clamp(-limit, limit), count_true(m.abs() > limit), torch.isfinite(xf).all()


map_at_kernel.min_numel = 0


def to_fixed_at(x: torch.Tensor, exponent: torch.Tensor, limit: int, rounding: str = "stochastic",
                key: int = 0, where: str = "tensor") -> FixedPoint:
    """Map ``x`` onto a given exponent, saturating at ``+-limit``: how a bias joins an
    accumulator whose exponent the product already fixed. The mantissa is int64."""
    fp, finite = map_at_deferred(x, exponent, limit, rounding, key)
    if not bool(finite):
        raise NonFiniteError(nonfinite_message(where))
    return fp


def map_at_deferred(x: torch.Tensor, exponent: torch.Tensor, limit: int, rounding: str,
                    key: int) -> tuple[FixedPoint, torch.Tensor]:
    """``to_fixed_at`` without waiting for the device, as ``map_deferred``."""
    check_rounding(rounding)
    m, clamped, finite = map_at_kernel(x.detach(), exponent, limit, rounding, as_key(key))
    return FixedPoint(m, exponent, limit.bit_length() + 1, clamped), finite


def narrowing_shift(top: torch.Tensor, bits: int) -> torch.Tensor:
    """The right shift that moves a largest magnitude of bit length ``top`` into
    ``[2**(b-2), 2**(b-1))`` (section 1's exponent); 0 for an all-zero tensor."""
    return torch.where(top > 0, top - (bits - 1), 0)


@fused
def requantize_kernel(m: torch.Tensor, exponent: torch.Tensor, bits: int, rounding: str, key: int):
    # Mantissas of up to 32 bits stay in int32: a narrowing shift keeps every intermediate
    # below 2**31 (the largest right shift is 32 - bits; a left shift only lifts a tensor
    # below 2**(bits - 1) up to it; masters stay within +-(2**31 - 1)). int32 lanes are twice
    # as many as int64 ones.
    m = m.to(torch.int32 if m.dtype in (torch.int8, torch.int16, torch.int32) else torch.int64)
    shift = narrowing_shift(bit_length(m.abs().amax().to(torch.int64)), bits)
    narrowed, clamped = _finish(shift_right(m, shift, rounding, key), bits)
    return narrowed, exponent + shift, clamped


requantize_kernel.min_numel = 0


def requantize(mantissa: torch.Tensor, exponent: torch.Tensor, bits: int, rounding: str = "stochastic",
               key: int = 0) -> FixedPoint:
    """Narrow a wide fixed-point tensor to ``bits`` with integer shifts only (section 1's
    exponent: the largest magnitude lands in ``[2**(b-2), 2**(b-1))``)."""
    m, e, clamped = requantize_kernel(mantissa, exponent, bits, rounding, as_key(key))
    return FixedPoint(m, e, bits, clamped)


# The top exponent of an all-zero term: below every real one, so it never sets the grid.
_NO_VALUE = -(2**40)


def top_exponent(largest: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """The exponent just above a term whose largest mantissa magnitude is ``largest``."""
    return torch.where(largest > 0, exponent + bit_length(largest), _NO_VALUE)


def add_fixed(a: torch.Tensor, ea: torch.Tensor, b: torch.Tensor, eb: torch.Tensor, tops=None):
    """``a 2**ea + b 2**eb`` for int64 mantissas below 2**61, on the finest grid where the sum
    keeps within 62 bits; returns (sum, grid exponent). Aligning onto that grid drops only bits
    more than 61 below the larger term, rounded to nearest: the stochastic rounding of a stored
    result is the re-normalisation that follows. ``tops``: the two terms' ``top_exponent``
    when the caller already knows them."""
    if tops is None:
        tops = [top_exponent(m.abs().amax(), e) for m, e in ((a, ea), (b, eb))]
    grid = torch.maximum(torch.minimum(ea, eb), torch.maximum(*tops) - 61)
    return shift_right(a, grid - ea, "nearest") + shift_right(b, grid - eb, "nearest"), grid


def fixed_constant(value: float, bits: int) -> tuple[int, int]:
    """(mantissa, exponent) of a Python float with ``bits`` significant bits."""
    if value == 0:
        return 0, 0
    e = math.frexp(abs(value))[1] - 1
    exponent = e - (bits - 1)
    return round(value * 2.0**-exponent), exponent
