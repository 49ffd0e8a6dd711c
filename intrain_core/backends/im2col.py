"""Exact int8 convolutions as ``torch._int_mm`` GEMMs (int8 x int8 -> int32).

A convolution is a GEMM of its input's patches (im2col) with its weight. The patches are a
strided view of the zero-padded input in channels-last order, copied one block of images at a
time so the int8 copy stays a few MiB. Outputs are int32 in channels-last order, returned as
NCHW-shaped views (``permute``); ``from_fixed`` puts them in NCHW order in the pass that
converts them to float.

On a CPU the blocks, the padded channels-last copies of the operands and, where the caller
converts it at once, the int32 result go into buffers that the thread keeps from call to call:
fresh pages for each cost more than the copy itself (page faults; 8-9 ms against 1.3 ms for a
38 MB copy on a 2-core Xeon, 2026-12-02).

The input gradient is the convolution of the output gradient, zero-stuffed by the stride and
padded by ``dilation * (k - 1) - padding``, with the weight flipped in space and transposed in
channels. The weight gradient is patches-transposed times output gradient, its reduction
(images x output positions) summed in int32 one block at a time, within int32's bound.
Only ``groups == 1`` and int8 mantissas take this path; ``native`` keeps the float kernels
for the rest.
"""
from __future__ import annotations

import torch

from .int_mm import int_mm
from .scratch import kept_buffer

INT32_MAX = 2**31 - 1
# Patch bytes copied per block: the GEMM of a few MiB runs at full speed, and the buffer the
# blocks share stays small.
BLOCK_BYTES = 8 << 20


def _block(patches: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The patches of images ``start:stop`` as a (rows, reduction) matrix."""
    view = patches[start:stop]
    rows, reduction = view.shape[:3].numel(), view.shape[3:].numel()
    if view.is_contiguous():
        return view.reshape(rows, reduction)
    block = kept_buffer("block", view.shape, view.device, keep_bytes=BLOCK_BYTES)
    block.copy_(view)
    return block.view(rows, reduction)


def supported(a: torch.Tensor, b: torch.Tensor, groups: int, acc_dtype: torch.dtype) -> bool:
    """int8 operands, one group, and a reduction whose sums the caller found within int32."""
    return groups == 1 and a.dtype == torch.int8 and b.dtype == torch.int8 and acc_dtype == torch.int32


def _nhwc(t: torch.Tensor, name: str, pad_h=(0, 0), pad_w=(0, 0), stride=(1, 1)) -> torch.Tensor:
    """``t`` (NCHW) in the zeroed NHWC buffer ``name``: element (h, w) at (pad_h[0] + h stride[0],
    pad_w[0] + w stride[1]), and pad_h[1] rows and pad_w[1] columns of zeros after the last."""
    n, c, h, w = t.shape
    rows, cols = (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1
    out = kept_buffer(name, (n, rows + sum(pad_h), cols + sum(pad_w), c), t.device)
    if stride != (1, 1):
        out.zero_()
    else:  # only the border: the copy below writes the rest
        widths = (pad_h[0], pad_h[1], pad_w[0], pad_w[1])
        borders = (out[:, :pad_h[0]], out[:, pad_h[0] + rows:], out[:, :, :pad_w[0]], out[:, :, pad_w[0] + cols:])
        for width, border in zip(widths, borders):
            if width:
                border.zero_()
    out[:, pad_h[0]:pad_h[0] + rows:stride[0], pad_w[0]:pad_w[0] + cols:stride[1]] = t.permute(0, 2, 3, 1)
    return out


def _patches(xp: torch.Tensor, kernel, out_hw, stride, dilation) -> torch.Tensor:
    """The strided patch view (N, OH, OW, KH, KW, C) of padded NHWC ``xp``."""
    sn, sh, sw, sc = xp.stride()
    shape = (xp.shape[0], *out_hw, *kernel, xp.shape[3])
    strides = (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc)
    return xp.as_strided(shape, strides)


def _images_per_block(row_bytes: int, rows_per_image: int, images: int) -> int:
    return max(1, min(images, BLOCK_BYTES // max(1, row_bytes * rows_per_image)))


def _out_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, scratch: bool = False) -> torch.Tensor:
    """int32 ``conv2d(x, w)`` of int8 NCHW ``x`` and int8 ``w``; channels-last strides.
    ``scratch``: the result may live in a buffer that the thread's next ``scratch`` call reuses."""
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    out_hw = (_out_size(h, kh, stride[0], padding[0], dilation[0]), _out_size(wd, kw, stride[1], padding[1], dilation[1]))
    xp = _nhwc(x, "input", (padding[0],) * 2, (padding[1],) * 2)
    return _conv_padded(xp, w, out_hw, stride, dilation, scratch)


def _conv_padded(xp: torch.Tensor, w: torch.Tensor, out_hw, stride, dilation, scratch: bool) -> torch.Tensor:
    n, cin = xp.shape[0], xp.shape[3]
    cout, _, kh, kw = w.shape
    reduction = kh * kw * cin
    weight = w.permute(2, 3, 1, 0).reshape(reduction, cout)  # rows ordered (kh, kw, cin) as patches
    patches = _patches(xp, (kh, kw), out_hw, stride, dilation)
    positions = out_hw[0] * out_hw[1]
    shape = (n * positions, cout)
    out = (kept_buffer("result", shape, xp.device, torch.int32) if scratch
           else torch.empty(shape, dtype=torch.int32, device=xp.device))
    step = _images_per_block(reduction, positions, n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        int_mm(_block(patches, start, stop), weight, out=out[start * positions:stop * positions])
    return out.view(n, *out_hw, cout).permute(0, 3, 1, 2)


def conv2d_input(input_shape, w: torch.Tensor, g: torch.Tensor, stride, padding, dilation,
                 scratch: bool = False) -> torch.Tensor | None:
    """int32 input gradient of ``conv2d`` for int8 ``w`` and output gradient ``g``; None where
    the padding exceeds the kernel's reach (``native`` then uses its float kernel). ``scratch``:
    as in ``conv2d``."""
    n, cin, h, wd = input_shape
    kh, kw = w.shape[2:]
    reach = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
    if padding[0] > reach[0] or padding[1] > reach[1]:
        return None
    oh, ow = g.shape[2:]
    stuffed = ((oh - 1) * stride[0] + 1, (ow - 1) * stride[1] + 1)
    # Before: reach - padding; after: what makes the stride-1 output exactly the input size.
    pad_h = (reach[0] - padding[0], h - stuffed[0] + padding[0])
    pad_w = (reach[1] - padding[1], wd - stuffed[1] + padding[1])
    gp = _nhwc(g, "gradient", pad_h, pad_w, stride)
    flipped = w.flip(2, 3).transpose(0, 1)
    return _conv_padded(gp, flipped, (h, wd), (1, 1), dilation, scratch)


def conv2d_weight(x: torch.Tensor, w_shape, g: torch.Tensor, stride, padding, dilation, product_bound: int,
                  acc_dtype: torch.dtype) -> torch.Tensor | None:
    """Weight gradient of ``conv2d`` in ``acc_dtype``: patches of int8 ``x`` transposed times int8
    output gradient ``g``, summed over blocks of images that each stay within int32; None where
    one image's sums would not (``native`` then uses its float kernel)."""
    cout, cin, kh, kw = w_shape
    n = x.shape[0]
    out_hw = tuple(g.shape[2:])
    positions = out_hw[0] * out_hw[1]
    if positions * product_bound > INT32_MAX:
        return None
    reduction = kh * kw * cin
    xp = _nhwc(x, "input", (padding[0],) * 2, (padding[1],) * 2)
    patches = _patches(xp, (kh, kw), out_hw, stride, dilation)
    g_rows = _nhwc(g, "rows").view(n * positions, cout)
    exact_images = INT32_MAX // (product_bound * positions)
    step = min(_images_per_block(reduction, positions, n), exact_images)
    acc = None
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = int_mm(_block(patches, start, stop).t(), g_rows[start * positions:stop * positions])
        acc = part.to(acc_dtype) if acc is None else acc.add_(part)
    return acc.view(kh, kw, cin, cout).permute(3, 2, 0, 1)
