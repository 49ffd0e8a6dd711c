"""Exact int64 arithmetic, slow and simple, for tests: the golden integer reference."""
from __future__ import annotations

import torch

from ..fixed_point import from_fixed


def _check_int64(acc: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    if acc_dtype == torch.int32:
        lo, hi = -(2**31), 2**31 - 1
        if acc.numel() and (int(acc.min()) < lo or int(acc.max()) > hi):
            raise OverflowError("int32 accumulator overflow: widen the accumulator to int64")
    return acc.to(acc_dtype)


def matmul(a: torch.Tensor, b: torch.Tensor, product_bound: int, acc_dtype: torch.dtype,
           scratch: bool = False) -> torch.Tensor:
    """``a @ b`` for integer tensors (batched like torch.matmul), always in ``acc_dtype`` and in a
    tensor of its own (``scratch`` allows a reused buffer; this backend has none)."""
    return _check_int64(torch.matmul(a.long(), b.long()), acc_dtype)


def matmul_to_float(a: torch.Tensor, exponent_a: torch.Tensor, b: torch.Tensor, exponent_b: torch.Tensor,
                    product_bound: int, acc_dtype: torch.dtype) -> torch.Tensor:
    """``from_fixed(a @ b, exponent_a + exponent_b)``, the int64 sums converted as they are."""
    return from_fixed(matmul(a, b, product_bound, acc_dtype), exponent_a + exponent_b)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _offsets(w_shape, x_shape, stride, padding, dilation):
    """Yield (i, j, rows, cols): the strided input window each kernel tap reads."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w_shape[-2:]
    ho = _out_size(x_shape[-2], kh, sh, ph, dh)
    wo = _out_size(x_shape[-1], kw, sw, pw, dw)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            yield i, j, rows, cols


def conv2d(x, w, stride, padding, dilation, groups, product_bound, acc_dtype, scratch=False):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    xp = torch.nn.functional.pad(x.long(), (padding[1], padding[1], padding[0], padding[0]))
    w = w.long()
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    out = None
    for i, j, rows, cols in _offsets(w.shape, x.shape, stride, padding, dilation):
        window = xp[:, :, rows, cols]
        parts = [
            torch.einsum("nchw,oc->nohw", window[:, g * cin_g:(g + 1) * cin_g], w[g * cout_g:(g + 1) * cout_g, :, i, j])
            for g in range(groups)
        ]
        tap = torch.cat(parts, dim=1)
        out = tap if out is None else out + tap
    return _check_int64(out, acc_dtype)


def conv2d_input(input_shape, w, g, stride, padding, dilation, groups, product_bound, acc_dtype, scratch=False):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = input_shape
    dxp = torch.zeros((n, c, h + 2 * padding[0], wd + 2 * padding[1]), dtype=torch.int64, device=g.device)
    w, g = w.long(), g.long()
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    for i, j, rows, cols in _offsets(w.shape, input_shape, stride, padding, dilation):
        for grp in range(groups):
            dxp[:, grp * cin_g:(grp + 1) * cin_g, rows, cols] += torch.einsum(
                "nohw,oc->nchw", g[:, grp * cout_g:(grp + 1) * cout_g], w[grp * cout_g:(grp + 1) * cout_g, :, i, j]
            )
    dx = dxp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wd]
    return _check_int64(dx, acc_dtype)


def conv2d_weight(x, w_shape, g, stride, padding, dilation, groups, product_bound, acc_dtype):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    xp = torch.nn.functional.pad(x.long(), (padding[1], padding[1], padding[0], padding[0]))
    g = g.long()
    cout, cin_g, kh, kw = w_shape
    cout_g = cout // groups
    dw = torch.zeros(tuple(w_shape), dtype=torch.int64, device=g.device)
    for i, j, rows, cols in _offsets(w_shape, x.shape, stride, padding, dilation):
        window = xp[:, :, rows, cols]
        for grp in range(groups):
            dw[grp * cout_g:(grp + 1) * cout_g, :, i, j] = torch.einsum(
                "nohw,nchw->oc", g[:, grp * cout_g:(grp + 1) * cout_g], window[:, grp * cin_g:(grp + 1) * cin_g]
            )
    return _check_int64(dw, acc_dtype)


def from_fixed_bitwise(acc: torch.Tensor, exponent: int) -> torch.Tensor:
    """Float32 nearest to ``acc * 2**exponent`` built from bits: leading-one detection, a
    normalising shift and round-half-to-even, as hardware would. Normal results only."""
    acc = acc.long()
    negative = acc < 0
    mag = acc.abs()
    # Leading-one position: the number of bits of the magnitude.
    nbits = torch.zeros_like(mag)
    for k in range(63):
        nbits += (mag >= (1 << k)).long()
    shift = nbits - 24
    right = shift.clamp(min=0)
    q = mag >> right
    rem = mag - (q << right)
    half = torch.where(right > 0, torch.ones_like(right) << (right - 1).clamp(min=0), torch.zeros_like(right))
    round_up = (right > 0) & ((rem > half) | ((rem == half) & (q & 1).bool()))
    q = q + round_up.long()
    carry = q >= (1 << 24)
    q = torch.where(carry, q >> 1, q)
    shift = shift + carry.long()
    q = torch.where(shift < 0, mag << (-shift).clamp(min=0), q)
    # q now holds 24 significant bits: value = q * 2**(shift + exponent).
    biased = shift + exponent + 23 + 127
    nonzero = mag != 0
    if bool(((biased <= 0) | (biased >= 255))[nonzero].any()):
        raise OverflowError("from_fixed_bitwise covers normal float32 results only")
    bits = (biased << 23) | (q - (1 << 23))
    bits = torch.where(negative, bits | (1 << 31), bits)
    bits = torch.where(nonzero, bits, torch.zeros_like(bits))
    return bits.to(torch.int32).view(torch.float32)
