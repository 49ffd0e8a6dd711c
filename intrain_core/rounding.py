"""Every rounding of the integer numerics goes through this module.

Two modes (the contract, docs/numerics-contract.md section 1):
- ``nearest``: round half to even.
- ``stochastic``: round up with probability equal to the fraction, from a counter-based random
  stream. Element ``i`` of the ``c``-th rounding of a stream with seed ``k`` draws
  ``hash(k, c, i)``: no generator state, so the draws are parallel, the same on every device and
  backend, and a stream resumes from two integers (seed, counter).
"""
from __future__ import annotations

import torch

ROUNDINGS = ("stochastic", "nearest")
RANDOM_BITS = 24
_MASK32 = 0xFFFFFFFF


def _mix32(h):
    """A bijection on 32-bit values with full avalanche (Wellons' "lowbias32" constants).

    Works on Python ints and on int64 tensors (values kept in [0, 2**32): a product that passes
    2**63 wraps modulo 2**64, which leaves the low 32 bits, all that is kept, exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _MASK32
    return h ^ (h >> 16)


def stream_key(seed: int, counter):
    """The key of the ``counter``-th rounding of stream ``seed``: 63 bits (a 32-bit and a 31-bit
    half), so that it is a non-negative int64. ``counter`` may be an int64 tensor of counters
    (products wrap modulo 2**64, which keeps the low 32 bits exact)."""
    low = _mix32((_mix32(seed & _MASK32) + counter) & _MASK32)
    high = _mix32((low ^ _mix32(((seed >> 32) + counter * 0x9E3779B9 + 0x632BE5AB) & _MASK32)) & _MASK32)
    return ((high >> 1) << 32) | low


def as_key(key) -> torch.Tensor:
    """A key as a 0-dim int64 tensor: compiled kernels take it as data, not as a constant (no
    recompilation per key, and inductor keeps its bit operations in integers)."""
    return key if isinstance(key, torch.Tensor) else torch.tensor(key, dtype=torch.int64)


def _signed32(v):
    """The 32-bit pattern of ``v`` in [0, 2**32) as the int32 value with the same bits."""
    return v - ((v >> 31) << 32)


def _mix32_lanes(h: torch.Tensor) -> torch.Tensor:
    """``_mix32`` on int32 tensors that hold the 32-bit patterns: products wrap modulo 2**32 as
    the int32 units do, and each unsigned right shift is an arithmetic one with the sign bits
    masked off. Half the lane width of int64, and the same bits (tests/test_kernels.py)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _signed32(0x7FEB352D)
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _signed32(0x846CA68B)
    return h ^ ((h >> 16) & 0xFFFF)


def random_bits(shape, key, device, index: torch.Tensor | None = None) -> torch.Tensor:
    """``RANDOM_BITS`` uniform bits per element (int32), a function of ``key`` (an int or an
    int64 tensor) and the element's index in row-major order only.

    ``index`` (int32, broadcast to ``shape``) and a ``key`` tensor that broadcasts against it
    give other elements their own keys and indices: several tensors laid out in one buffer
    draw what each would draw alone."""
    if index is not None:
        key = as_key(key)
        low, high = _signed32(key & _MASK32).to(torch.int32), _signed32((key >> 32) & _MASK32).to(torch.int32)
        h = _mix32_lanes(_mix32_lanes(index ^ low) ^ high)
        return ((h >> (32 - RANDOM_BITS)) & (2**RANDOM_BITS - 1)).expand(shape)
    numel = 1
    for size in shape:
        numel *= size
    key = as_key(key)
    low, high = key & _MASK32, (key >> 32) & _MASK32
    if numel >= 2**31:  # indices past int32: the same hash on int64 lanes
        h = _mix32(_mix32(torch.arange(numel, dtype=torch.int64, device=device) ^ low) ^ high)
        return (h >> (32 - RANDOM_BITS)).to(torch.int32).view(shape)
    index = torch.arange(numel, dtype=torch.int32, device=device)
    low, high = _signed32(low).to(torch.int32), _signed32(high).to(torch.int32)
    h = _mix32_lanes(_mix32_lanes(index ^ low) ^ high)
    return ((h >> (32 - RANDOM_BITS)) & (2**RANDOM_BITS - 1)).view(shape)


def transposed_index(shape, device) -> torch.Tensor:
    """The row-major indices (int32) of the elements of a (..., R, C) tensor, arranged as its
    transpose, whose shape (..., C, R) is ``shape``, with the leading dimensions flattened: a
    transposed view drawn in memory order draws what it would draw in its own order. Built
    from one range per axis, which compiled code computes from its loop counters instead of
    dividing a flat index."""
    columns, rows = shape[-2], shape[-1]
    batch = 1
    for size in shape[:-2]:
        batch *= size
    return ((torch.arange(batch, dtype=torch.int32, device=device) * (rows * columns)).view(batch, 1, 1)
            + torch.arange(columns, dtype=torch.int32, device=device).view(1, columns, 1)
            + (torch.arange(rows, dtype=torch.int32, device=device) * columns).view(1, 1, rows))


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")


def round_float(v: torch.Tensor, rounding: str, key: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Round float values to integer values (still float).

    Stochastic: ``floor(v) + [r < frac(v) * 2**24]`` with ``r`` uniform on [0, 2**24): frac and
    frac * 2**24 are exact in float32, so the chance of rounding up is ceil(frac * 2**24) / 2**24,
    a bias below 2**-24 of a step (``floor(v + u)`` would add a rounding of the sum).
    ``index``: as in ``random_bits``.
    """
    if rounding == "nearest":
        return torch.round(v)
    floor = torch.floor(v)
    # r < f for an integer r is r < ceil(f): compared as integers.
    threshold = torch.ceil((v - floor) * float(2**RANDOM_BITS)).to(torch.int32)
    return floor + (random_bits(v.shape, key, v.device, index) < threshold).to(v.dtype)


def shift_right(m: torch.Tensor, shift, rounding: str, key: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
    """Integer ``m / 2**shift`` rounded, in ``m``'s dtype (int64, or int32 where the caller
    keeps ``m << -shift`` and ``2**shift`` within it); ``shift`` is an int or an int64 tensor
    that broadcasts against ``m``, and a negative shift multiplies exactly.

    Stochastic: round up when ``r < ceil(rem * 2**24 / 2**shift)``, the integer form of
    ``round_float``: exact probabilities for shifts up to 24, a bias below 2**-24 of a step
    beyond. The caller keeps ``|m| < 2**62``. ``index``: as in ``random_bits``.
    """
    if not isinstance(shift, torch.Tensor):
        shift = torch.tensor(shift, dtype=torch.int64, device=m.device)
    shift = shift.to(torch.int64)
    right = shift.clamp(0, 62)
    left = (-shift).clamp(min=0)
    m = m << left
    q = m >> right
    if rounding == "nearest":
        if m.dtype != torch.int64:  # the biased sum below could pass 2**31: compare instead
            step = torch.ones_like(right) << right
            rem, half = m & (step - 1), step >> 1
            return q + ((rem > half) | ((rem == half) & (right > 0) & ((q & 1) == 1))).to(q.dtype)
        # Half to even in one add: floor((m + 2**(right-1) - 1 + (q & 1)) / 2**right).
        rounds = (right > 0).to(torch.int64)
        bias = (rounds << (right - 1).clamp(min=0)) - rounds + (q & rounds)
        return (m + bias) >> right
    rem = m & ((torch.ones_like(right) << right) - 1)
    coarse = (right - RANDOM_BITS).clamp(min=0)
    threshold = (rem + (torch.ones_like(coarse) << coarse) - 1) >> coarse  # ceil(rem / 2**(shift - 24)) when shift > 24
    r = random_bits(m.shape, key, m.device, index) >> (RANDOM_BITS - right).clamp(min=0)
    return q + (r < threshold).to(q.dtype)


def round_half_up_shift(v: torch.Tensor, shift) -> torch.Tensor:
    """``v / 2**shift`` rounded half up (a negative shift multiplies): the fixed-point
    intermediates of the integer norm, which are not mappings and draw no noise."""
    if not isinstance(shift, torch.Tensor):
        shift = torch.tensor(shift, dtype=torch.int64, device=v.device)
    right = shift.clamp(min=0)
    left = (-shift).clamp(min=0)
    half = (right > 0).to(torch.int64) << (right - 1).clamp(min=0)
    return ((v << left) + half) >> right


class RoundingStream:
    """A seed and a counter: the state of every stochastic rounding of one model or optimiser.

    Each rounding call takes the next key; saving (seed, counter) and loading it back
    continues the stream bit for bit.
    """

    __slots__ = ("seed", "counter")

    def __init__(self, seed: int, counter: int = 0):
        self.seed, self.counter = int(seed), int(counter)

    def next_key(self) -> torch.Tensor:
        return as_key(self.next_int_key())

    def next_int_key(self) -> int:
        """``next_key`` as a Python int: the C++ kernels take it so, without a tensor."""
        key = stream_key(self.seed, self.counter)
        self.counter += 1
        return key

    def next_keys(self, count: int, device=None) -> torch.Tensor:
        """The next ``count`` keys at once, as an int64 tensor: what ``count`` calls of
        ``next_key`` return."""
        counters = torch.arange(self.counter, self.counter + count, dtype=torch.int64, device=device)
        self.counter += count
        return stream_key(self.seed, counters)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.counter = int(state["seed"]), int(state["counter"])
