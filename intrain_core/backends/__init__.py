"""Integer kernels. Every backend returns exact integer accumulators, so all agree bit for bit.

A kernel takes integer mantissa tensors and the bound ``product_bound = qmax_a * qmax_b`` on
one product, and returns the exact integer sums in ``acc_dtype`` (int32 or int64);
``matmul_to_float`` returns a product already mapped back (``from_fixed``), which lets a backend
fold the scale into the GEMM.
``matmul``, ``conv2d`` and ``conv2d_input`` take ``scratch=True`` from a caller that converts the result
before its next such call: a backend may then return it in a buffer it reuses.
"""
from __future__ import annotations

from . import native, reference

BACKENDS = {"native": native, "reference": reference}


def get_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]
