"""Fast exact integer kernels.

Two ways to get exact integer sums at speed:
- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32), the fast path on CUDA and on CPUs with
  int8 dot-product instructions (AVX-512 VNNI, AMX).
- ``float_exact``: the mantissas are small integers, exactly representable in float32; if every
  partial sum of a reduction stays at or below 2**24 in magnitude (float32's 24-bit
  significand), the float unit computes the exact integer result whatever the summation
  order. Reductions are split into chunks of at most ``2**24 // product_bound`` products
  (1040 at 8 bits), and the chunk results are summed as integers. Where one indivisible chunk
  would be longer, float64 (53-bit significand) is used instead.
On CPUs without int8 dot-product instructions ``torch._int_mm`` falls back to scalar code
(measured 20-40x slower than float32 GEMM on the AVX2 machine this project is developed on),
so the GEMM kernel is chosen by a one-time measurement. Both give the same integers.

Convolutions with int8 operands and one group can also run as ``int_mm`` GEMMs of their patches
(``im2col``). Which is faster depends on the shape as much as on the CPU (patch copies against
the float unit's direct convolution), so the first call of each shape class runs and times
both, and that class keeps the faster.
"""
from __future__ import annotations

import functools
import os
import time

import torch
from torch.nn.grad import conv2d_input as _conv2d_input
from torch.nn.grad import conv2d_weight as _conv2d_weight

from . import im2col
from ..fixed_point import from_fixed
from .int_mm import int_mm
from .scratch import kept_buffer

FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53


def _exact_float(max_reduction: int, product_bound: int) -> tuple[torch.dtype, int]:
    """The float dtype and the longest reduction it sums exactly."""
    chunk32 = FLOAT32_EXACT // product_bound
    if chunk32 >= max_reduction or chunk32 >= 64:
        return torch.float32, chunk32
    chunk64 = FLOAT64_EXACT // product_bound
    if chunk64 < 1:
        raise OverflowError(f"a product bound of {product_bound} exceeds float64's exact range")
    return torch.float64, chunk64


def _to_acc(result: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    return result.to(acc_dtype)


def _best_time(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls, after one untimed call for one-time costs
    (kernel creation, first touch of the output's pages)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@functools.lru_cache(maxsize=None)
def gemm_kernel(device_type: str) -> str:
    """``int_mm`` or ``float_exact``: the faster exact kernel on this device."""
    forced = os.environ.get("INTRAIN_GEMM_KERNEL")
    if forced:
        if forced not in ("int_mm", "float_exact"):
            raise ValueError(f"INTRAIN_GEMM_KERNEL={forced!r}: use int_mm or float_exact")
        return forced
    if device_type == "cuda":
        return "int_mm"
    if device_type != "cpu":
        return "float_exact"
    # Its own generator: the probe runs whenever a process first needs a GEMM, which must not
    # move the global random stream (a resumed run would draw different data augmentation).
    probe = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (256, 512), dtype=torch.int8, generator=probe)
    b = torch.randint(-127, 128, (512, 256), dtype=torch.int8, generator=probe)
    af, bf = a.float(), b.float()
    int_time = _best_time(lambda: torch._int_mm(a, b), repeats=3)
    float_time = _best_time(lambda: af @ bf, repeats=3)
    return "int_mm" if int_time < float_time else "float_exact"


def _float_operand(t: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``t * scale`` in ``dtype``, dense in the order a batched float GEMM reads without another
    copy: a mantissa mapped from a permuted view keeps that view's strides, which the GEMM would
    copy again to fold the batch dimensions; a transposed matrix stays transposed."""
    if t.dim() > 2 and t.stride(-2) == 1 and t.stride(-1) != 1:
        return _float_operand(t.transpose(-1, -2), dtype, scale).transpose(-1, -2)
    result = t.to(dtype, memory_format=torch.contiguous_format)
    return result if scale == 1.0 else result.mul_(scale)


def _int_mm_ok(a: torch.Tensor, b: torch.Tensor, product_bound: int, acc_dtype: torch.dtype) -> bool:
    if a.dtype != torch.int8 or b.dtype != torch.int8 or acc_dtype != torch.int32:
        return False
    if a.dim() != 2 or b.dim() != 2:
        return False
    if a.is_cuda:  # cuBLAS int8 GEMM shape rules
        m, k = a.shape
        n = b.shape[1]
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return True


def _float_kernel(a: torch.Tensor, b: torch.Tensor, product_bound: int, acc_dtype: torch.dtype):
    """(float dtype, longest exact reduction) when ``a @ b`` runs on the float unit; None when
    it runs as ``torch._int_mm``."""
    if gemm_kernel(a.device.type) == "int_mm" and _int_mm_ok(a, b, product_bound, acc_dtype):
        return None
    return _exact_float(1, product_bound)


def matmul(a: torch.Tensor, b: torch.Tensor, product_bound: int, acc_dtype: torch.dtype,
           scratch: bool = False) -> torch.Tensor:
    """Exact ``a @ b`` of integer tensors, broadcast like torch.matmul, in ``acc_dtype``.
    ``scratch``: the caller converts the result before its next ``scratch`` call, so an int32
    result may live in a buffer the thread reuses."""
    kernel = _float_kernel(a, b, product_bound, acc_dtype)
    if kernel is None:
        if not scratch:
            return int_mm(a, b)
        return int_mm(a, b, out=kept_buffer("gemm", (a.shape[0], b.shape[1]), a.device, torch.int32))
    dtype, chunk = kernel
    k = a.shape[-1]
    if k <= chunk:
        return _to_acc(torch.matmul(_float_operand(a, dtype), _float_operand(b, dtype)), acc_dtype)
    acc = None
    for start in range(0, k, chunk):
        part = torch.matmul(a[..., start:start + chunk].to(dtype), b[..., start:start + chunk, :].to(dtype))
        part = _to_acc(part, acc_dtype)
        acc = part if acc is None else acc.add_(part)
    return acc


# A float32 operand m 2**e with |m| <= 2**24, and a sum of products below 2**24 units of
# 2**(ea + eb), are normal float32 numbers while every exponent stays within these bounds.
SCALED_EXPONENTS = (-126, 127 - 24)


def _scales_fold(exponents: tuple[int, int]) -> bool:
    low, high = SCALED_EXPONENTS
    return all(low <= e <= high for e in (*exponents, sum(exponents)))


def matmul_to_float(a: torch.Tensor, exponent_a: torch.Tensor, b: torch.Tensor, exponent_b: torch.Tensor,
                    product_bound: int, acc_dtype: torch.dtype) -> torch.Tensor:
    """``from_fixed(a @ b, exponent_a + exponent_b)``.

    Where the float unit computes the product (the reduction within float32's exact range), the
    powers of two fold into the operands' cast on a CPU: every product and partial sum is then
    the exact integer times 2**(ea + eb), a normal float32 while the exponents keep within
    SCALED_EXPONENTS, so the GEMM's result is already ``from_fixed``'s and the pass that scales
    an activation-size result is saved (reading the exponents costs no device wait there).
    """
    kernel = _float_kernel(a, b, product_bound, acc_dtype)
    if kernel is None or kernel[0] != torch.float32 or a.shape[-1] > kernel[1]:  # not one float32 GEMM
        return from_fixed(matmul(a, b, product_bound, acc_dtype, scratch=True), exponent_a + exponent_b)
    if a.device.type == "cpu":
        exponents = (int(exponent_a), int(exponent_b))
        if _scales_fold(exponents):
            return torch.matmul(_float_operand(a, torch.float32, 2.0 ** exponents[0]),
                                _float_operand(b, torch.float32, 2.0 ** exponents[1]))
    # float32 holding the exact integers: from_fixed reads it as it reads int32
    exact = torch.matmul(_float_operand(a, torch.float32), _float_operand(b, torch.float32))
    return from_fixed(exact, exponent_a + exponent_b)


KERNELS = ("int_mm", "float_exact")
# Shape class -> chosen kernel, measured at the class's first call in this process.
conv_choices: dict[tuple, str] = {}


def _conv_kernel(shape_class: tuple, device: torch.device, run_int, run_float) -> str:
    forced = os.environ.get("INTRAIN_CONV_KERNEL")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"INTRAIN_CONV_KERNEL={forced!r}: use int_mm or float_exact")
        return forced
    choice = conv_choices.get(shape_class)
    if choice is None:
        if device.type == "cuda":
            choice = "int_mm"
        elif gemm_kernel(device.type) != "int_mm":
            choice = "float_exact"
        else:
            choice = "int_mm" if _best_time(run_int, 2) < _best_time(run_float, 2) else "float_exact"
        conv_choices[shape_class] = choice
    return choice


def _shape_class(kind: str, data: torch.Tensor, weight_shape, geometry: tuple) -> tuple:
    """The weight's shape, the geometry, and the number of rows of the data (images x positions)
    to within a factor of two: a detector's changing image sizes are measured once per size
    band instead of once per batch."""
    rows = data.numel() // max(1, data.shape[1])
    return (kind, tuple(weight_shape), *geometry, rows.bit_length())


def _conv(kind: str, int_args: tuple, float_fn, float_args: tuple, shape_class: tuple, device: torch.device):
    """The chosen kernel's result; ``int_fn`` returning None means the shape needs the float one."""
    int_fn = getattr(im2col, kind)
    choice = _conv_kernel(shape_class, device, lambda: int_fn(*int_args), lambda: float_fn(*float_args))
    if choice == "int_mm":
        result = int_fn(*int_args)
        if result is not None:
            return result
    return float_fn(*float_args)


def conv2d(x, w, stride, padding, dilation, groups, product_bound, acc_dtype, scratch=False):
    """Exact integer convolution: ``int_mm`` on patches, or float with the reduction split.
    ``scratch``: the caller converts the result before its next ``scratch`` call, so it may live
    in a buffer the thread reuses (im2col)."""
    if im2col.supported(x, w, groups, acc_dtype):
        return _conv("conv2d", (x, w, stride, padding, dilation, scratch), _conv2d_float,
                     (x, w, stride, padding, dilation, groups, product_bound, acc_dtype),
                     _shape_class("conv2d", x, w.shape, (stride, padding, dilation)), x.device)
    return _conv2d_float(x, w, stride, padding, dilation, groups, product_bound, acc_dtype)


def conv2d_input(input_shape, w, g, stride, padding, dilation, groups, product_bound, acc_dtype, scratch=False):
    """Exact input gradient: ``int_mm`` on the stuffed gradient's patches, or float.
    ``scratch``: as in ``conv2d``."""
    args = (input_shape, w, g, stride, padding, dilation)
    if im2col.supported(g, w, groups, acc_dtype):
        return _conv("conv2d_input", (*args, scratch), _conv2d_input_float, (*args, groups, product_bound, acc_dtype),
                     _shape_class("conv2d_input", g, w.shape, (stride, padding, dilation)), g.device)
    return _conv2d_input_float(*args, groups, product_bound, acc_dtype)


def conv2d_weight(x, w_shape, g, stride, padding, dilation, groups, product_bound, acc_dtype):
    """Exact weight gradient: ``int_mm`` of patches and gradient in int32 blocks, or float."""
    if im2col.supported(x, g, groups, torch.int32):
        return _conv("conv2d_weight", (x, w_shape, g, stride, padding, dilation, product_bound, acc_dtype),
                     _conv2d_weight_float, (x, w_shape, g, stride, padding, dilation, groups, product_bound, acc_dtype),
                     _shape_class("conv2d_weight", g, w_shape, (stride, padding, dilation)), x.device)
    return _conv2d_weight_float(x, w_shape, g, stride, padding, dilation, groups, product_bound, acc_dtype)


def _conv2d_float(x, w, stride, padding, dilation, groups, product_bound, acc_dtype):
    """The reduction (in-channels x taps) split over in-channels."""
    taps = w.shape[2] * w.shape[3]
    cin_g = w.shape[1]
    dtype, chunk = _exact_float(taps, product_bound)
    channels = max(chunk // taps, 1)
    if cin_g <= channels or groups > 1:
        if cin_g * taps > chunk:
            dtype = torch.float64
        return _to_acc(torch.nn.functional.conv2d(x.to(dtype), w.to(dtype), None, stride, padding, dilation, groups), acc_dtype)
    acc = None
    for start in range(0, cin_g, channels):
        part = torch.nn.functional.conv2d(
            x[:, start:start + channels].to(dtype), w[:, start:start + channels].to(dtype), None, stride, padding, dilation
        )
        part = _to_acc(part, acc_dtype)
        acc = part if acc is None else acc.add_(part)
    return acc


def _conv2d_input_float(input_shape, w, g, stride, padding, dilation, groups, product_bound, acc_dtype):
    """The reduction (out-channels x taps) split over out-channels."""
    taps = w.shape[2] * w.shape[3]
    cout_g = w.shape[0] // groups
    dtype, chunk = _exact_float(taps, product_bound)
    channels = max(chunk // taps, 1)
    if cout_g <= channels or groups > 1:
        if cout_g * taps > chunk:
            dtype = torch.float64
        return _to_acc(
            _conv2d_input(input_shape, w.to(dtype), g.to(dtype), stride, padding, dilation, groups), acc_dtype
        )
    acc = None
    for start in range(0, cout_g, channels):
        part = _conv2d_input(
            input_shape, w[start:start + channels].to(dtype), g[:, start:start + channels].to(dtype), stride, padding, dilation
        )
        part = _to_acc(part, acc_dtype)
        acc = part if acc is None else acc.add_(part)
    return acc


def _conv2d_weight_float(x, w_shape, g, stride, padding, dilation, groups, product_bound, acc_dtype):
    """The reduction (batch x output positions) split over the batch."""
    positions = g.shape[2] * g.shape[3]
    dtype, chunk = _exact_float(positions, product_bound)
    images = chunk // positions
    if images < 1:
        dtype, images = torch.float64, x.shape[0]
    if images >= x.shape[0]:
        return _to_acc(_conv2d_weight(x.to(dtype), w_shape, g.to(dtype), stride, padding, dilation, groups), acc_dtype)
    acc = None
    for start in range(0, x.shape[0], images):
        part = _conv2d_weight(
            x[start:start + images].to(dtype), w_shape, g[start:start + images].to(dtype), stride, padding, dilation, groups
        )
        part = _to_acc(part, acc_dtype)
        acc = part if acc is None else acc.add_(part)
    return acc
