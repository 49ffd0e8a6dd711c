"""An exact integer gradient all-reduce for ``DistributedDataParallel`` (a communication hook).

Float DDP sums each rank's gradient in float32 in an order the communication library picks, so
the mean gradient is neither integer nor reproducible. Integer mantissas that share one exponent
add exactly in any order. Per DDP bucket:

1. one MAX all-reduce of the bucket's exponents: one per gradient tensor (the contract's
   granularity, section 1: the largest magnitude's ``floor(log2)``) and a non-finite flag;
2. every rank maps its gradients onto the shared exponents ``s = e_max - (b - 2)``,
   ``b = numerics.backward_bits``, with the run's rounding;
3. one SUM all-reduce of the integer mantissas (accumulator: ``accumulator_dtype``);
4. the sum back to float32, divided by the world size as DDP divides.

The result is the same on every rank and for every reduction order.

Random bits: the ``c``-th bucket reduction of a model whose rounding stream has seed ``k`` draws
with key ``stream_key(stream_key(k, c), rank)``, a hash of (seed, counter, rank). The counter is
the converted model's own (``context_of(model).stream``, which checkpoints save), and it moves
identically on every rank; the rank makes the draws of different ranks independent, so that
their rounding errors do not add up coherently in the sum.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .collective import agree_exponents, rank_key
from .compiled import fused
from .convert import context_of
from .fixed_point import from_fixed, map_at_deferred, qmax
from .numerics import Numerics

INT32_MAX = 2**31 - 1


def headroom_bits(world_size: int) -> int:
    """Bits the sum of ``world_size`` mantissas needs beyond one mantissa: ceil(log2 N)."""
    return max(0, math.ceil(math.log2(world_size)))


def accumulator_dtype(bits: int, world_size: int) -> torch.dtype:
    """The narrowest all-reduce dtype that provably holds the sum of ``world_size`` mantissas.

    Each rank's mantissa is clamped to ``|m| <= qmax = 2**(b-1) - 1``, so the sum of N of them
    has ``|sum| <= N qmax < 2**(b - 1 + headroom_bits(N))``: int32 holds it while
    ``N qmax <= 2**31 - 1`` (b = 8: N <= 16,909,320; b = 16: N <= 65,538), int64 beyond.
    int16 would hold b = 8 up to N = 258, but NCCL has no int16 all-reduce, and int8 holds
    no sum of two 8-bit mantissas.
    """
    return torch.int32 if world_size * qmax(bits) <= INT32_MAX else torch.int64


@fused
def _mean(total: torch.Tensor, exponents: torch.Tensor, finite: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of N ranks' mantissas divided by N, NaN where a rank's gradient was not finite."""
    if world & (world - 1) == 0:  # a power of two divides exactly, in the exponent
        result = from_fixed(total, exponents - (world.bit_length() - 1))
    else:  # one correctly rounded float32 division of an exact sum (exact sum while |sum| < 2**24)
        result = from_fixed(total, exponents) / world
    return torch.where(finite, result, torch.full_like(result, float("nan")))


class IntegerAllreduce:
    """The state of the hook: numerics, the rounding stream, the process group, and the bytes
    the last step sent (per bucket, as integers and as float32 DDP would have sent them)."""

    def __init__(self, numerics: Numerics, stream, process_group=None):
        self.numerics = numerics
        self.stream = stream
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.bits = numerics.backward_bits
        self.dtype = accumulator_dtype(self.bits, self.world_size)
        self.sent: dict[int, tuple[int, int]] = {}

    def bytes_per_step(self) -> dict[str, float]:
        """Payload bytes each rank hands to all-reduce in one step, measured on the last one."""
        integer = sum(i for i, _ in self.sent.values())
        float32 = sum(f for _, f in self.sent.values())
        return {"integer": integer, "float32": float32, "ratio": integer / float32 if float32 else float("nan")}

    def exchange(self, flat: torch.Tensor, sizes: list[int]) -> torch.futures.Future:
        """The exact mean over ranks of ``flat`` (float32, the gradients of ``sizes`` laid end
        to end) as a future: steps 1-4 of the module docstring."""
        exponents, finite = agree_exponents(list(flat.split(sizes)) if sizes else [flat], self.bits, self.group)
        per_element = torch.repeat_interleave(exponents, torch.tensor(sizes or [flat.numel()], device=flat.device),
                                              output_size=flat.numel())
        key = rank_key(self.stream.next_key(), self.rank)
        fp, _ = map_at_deferred(flat, per_element, qmax(self.bits), self.numerics.rounding, key)
        mantissas = fp.mantissa.to(self.dtype)
        self.sent[len(self.sent)] = (mantissas.numel() * mantissas.element_size() + 8 * (exponents.numel() + 1),
                                     flat.numel() * 4)
        world = self.world_size
        work = dist.all_reduce(mantissas, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return work.get_future().then(lambda fut: _mean(fut.value()[0], per_element, finite, world))


def _hook(state, bucket):  # no annotations: DDP compares them with dist.GradBucket, not strings
    if bucket.index() == 0:
        state.sent.clear()
    buffer = bucket.buffer()
    sizes = [g.numel() for g in bucket.gradients()]
    if sum(sizes) != buffer.numel():  # not laid end to end: one exponent for the bucket
        sizes = []
    fut = state.exchange(buffer.detach().float(), sizes)
    return fut.then(lambda f: f.value().to(buffer.dtype))


def uses_integer_allreduce(numerics: Numerics) -> bool:
    """Integer presets reduce gradients in integers unless ``numerics.allreduce`` is ``float``."""
    return numerics.integer and numerics.allreduce == "integer"


def register_integer_allreduce(ddp_model, process_group=None) -> IntegerAllreduce:
    """Make ``ddp_model`` (a ``DistributedDataParallel`` of a converted model) reduce its
    gradients with the exact integer all-reduce; returns the hook's state. Call it before the
    first forward."""
    context = context_of(ddp_model.module)
    if context is None:
        raise ValueError("the integer all-reduce needs a converted model: call intrain_core.convert before DDP")
    state = IntegerAllreduce(context.numerics, context.stream, process_group)
    ddp_model.register_comm_hook(state, _hook)
    return state


def allreduce_bytes(parameters, bits: int, world_size: int, buckets: int = 1) -> dict[str, float]:
    """Payload bytes per step and rank, integer hook against float32 DDP, for ``parameters``
    in ``buckets`` DDP buckets (both go through the same ring all-reduce, so the ratio of the
    payloads is the ratio of the bytes on the wire)."""
    params = [p for p in parameters if p.requires_grad]
    numel = sum(p.numel() for p in params)
    width = torch.empty((), dtype=accumulator_dtype(bits, world_size)).element_size()
    integer = numel * width + (len(params) + buckets) * 8  # mantissas, and each bucket's exponents and flag
    return {"integer": integer, "float32": numel * 4, "ratio": integer / (numel * 4)}
