"""The exact integer gradient all-reduce (intrain_core/distributed.py) on gloo ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import intrain_core as ic
from intrain_core.distributed import (IntegerAllreduce, accumulator_dtype, allreduce_bytes, headroom_bits,
                                      register_integer_allreduce, uses_integer_allreduce)
from intrain_core.convert import context_of
from intrain_core.fixed_point import from_fixed, to_fixed_at
from intrain_core.rounding import RoundingStream, stream_key
from ranks import run_ranks

SIZES = [37, 5, 1000, 3, 64]
SEED = 7


def _gradients(rank: int, edge: bool) -> torch.Tensor:
    if edge:
        # Every element of every rank just below a power of two: each rounds up onto 2**(b-1)
        # and clamps to qmax, the largest sum N ranks can make.
        return torch.full((sum(SIZES),), (2 - 2**-20) * 2.0**3)
    g = torch.Generator().manual_seed(100 + rank)
    parts = [torch.randn(n, generator=g) * 2.0 ** (5 * i - 8 + rank) for i, n in enumerate(SIZES)]
    if rank == 0:
        parts[1].zero_()  # a zero gradient on one rank must not flush the others' (exponent 0)
    parts[3].zero_()  # zero on every rank
    return torch.cat(parts)


def _reduce(rank, world_size, edge, rounding):
    numerics = ic.Numerics(rounding=rounding)
    state = IntegerAllreduce(numerics, RoundingStream(SEED))
    flat = _gradients(rank, edge)
    result = state.exchange(flat, SIZES).wait()
    return {"flat": flat, "result": result, "bytes": state.bytes_per_step(), "dtype": state.dtype}


def _expected(flats: list[torch.Tensor], rounding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From every rank's gradients: the shared exponents, the exact integer sum of the ranks'
    mantissas (int64), and the mean the hook must return."""
    world = len(flats)
    exponents = []
    for parts in zip(*(f.split(SIZES) for f in flats)):
        tops = [int(torch.frexp(p.abs().amax()).exponent) - 1 for p in parts if bool(p.abs().amax() > 0)]
        exponents.append(max(tops) - 6 if tops else 0)
    per_element = torch.repeat_interleave(torch.tensor(exponents), torch.tensor(SIZES))
    base = stream_key(SEED, 0)
    mantissas = [to_fixed_at(f, per_element, 127, rounding, stream_key(base, r)).mantissa for r, f in enumerate(flats)]
    total = torch.stack(mantissas).sum(0)
    return per_element, total, from_fixed(total, per_element) / world


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("edge", [False, True], ids=["random", "max-magnitude"])
def test_integer_allreduce_is_the_exact_sum_of_mantissas(world_size, edge):
    results = run_ranks(_reduce, world_size, edge, "stochastic")
    flats = [r["flat"] for r in results]
    exponents, total, expected = _expected(flats, "stochastic")
    for r in results:
        assert r["dtype"] == torch.int32 == accumulator_dtype(8, world_size)
        assert torch.equal(r["result"], expected)  # bit for bit, on every rank
    assert int(total.abs().max()) <= world_size * 127
    if edge:
        assert bool((total == world_size * 127).all())  # every rank clamped at qmax: no overflow
    else:
        # Each rank's mantissa is within one step 2**s of its value (rounding, or a clamp at
        # qmax of a value below 2**(b-1)), so the mean is within one step of the exact mean.
        mean = torch.stack([f.double() for f in flats]).mean(0)
        assert bool(((expected.double() - mean).abs() <= 2.0 ** exponents.double()).all())
        assert bool((expected.split(SIZES)[3] == 0).all())
        assert bool((expected.split(SIZES)[1] != 0).any())
    sent = results[0]["bytes"]
    assert sent["float32"] == 4 * sum(SIZES) and sent["integer"] == 4 * sum(SIZES) + 8 * (len(SIZES) + 1)


def test_nearest_rounding_reduces_the_nearest_mantissas():
    results = run_ranks(_reduce, 2, False, "nearest")
    _, _, expected = _expected([r["flat"] for r in results], "nearest")
    assert all(torch.equal(r["result"], expected) for r in results)


def _nonfinite(rank, world_size):
    state = IntegerAllreduce(ic.Numerics(), RoundingStream(SEED))
    flat = _gradients(rank, False)
    if rank == 1:
        flat[3] = float("inf")
    return state.exchange(flat, SIZES).wait()


def test_a_nonfinite_gradient_on_one_rank_reaches_every_rank():
    # IntSGD then refuses the step (its gradient check), as with float DDP's NaN.
    for result in run_ranks(_nonfinite, 2):
        assert bool(result.isnan().all())


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


def _train(rank, world_size, preset, steps):
    numerics = ic.Numerics.preset(preset)
    model = ic.convert(_tiny_model(), numerics)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)  # several buckets
    state = register_integer_allreduce(ddp) if uses_integer_allreduce(numerics) else None
    opt = ic.build_optimizer(model.parameters(), numerics, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    weights = []
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    return {"weights": weights, "bytes": state.bytes_per_step() if state else None}


def test_ranks_hold_bit_identical_weights_after_every_step_and_repeat():
    first = run_ranks(_train, 2, "int8", 3)
    again = run_ranks(_train, 2, "int8", 3)
    for step in range(3):
        assert torch.equal(first[0]["weights"][step], first[1]["weights"][step]), f"step {step}"
        assert torch.equal(first[0]["weights"][step], again[0]["weights"][step]), f"step {step}"
    assert not torch.equal(first[0]["weights"][0], first[0]["weights"][2])  # it trained
    sent = first[0]["bytes"]
    params = sum(p.numel() for p in _tiny_model().parameters())
    assert sent["float32"] == 4 * params and 1.0 < sent["ratio"] < 1.2  # int32 mantissas plus exponents


def _rounding_keys(rank, world_size):
    context = context_of(ic.convert(_tiny_model(), "int8"))
    return [int(context.key()) for _ in range(3)]


def test_each_rank_draws_its_own_rounding_keys():
    """Ranks map different data: their forward and backward roundings draw independent bits
    from the shared counter; one process keeps the plain stream."""
    keys = run_ranks(_rounding_keys, 2)
    plain = context_of(ic.convert(_tiny_model(), "int8"))
    single = [int(plain.key()) for _ in range(3)]
    assert len({tuple(keys[0]), tuple(keys[1]), tuple(single)}) == 3
    assert len(set(keys[0]) & set(keys[1])) == 0


def test_allreduce_choice_and_byte_estimate():
    assert uses_integer_allreduce(ic.Numerics.preset("int8"))
    assert not uses_integer_allreduce(ic.Numerics.preset("fp32"))
    assert not uses_integer_allreduce(ic.Numerics(allreduce="float"))
    with pytest.raises(ValueError, match="numerics.allreduce='half' is not one of"):
        ic.Numerics(allreduce="half")
    assert [headroom_bits(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    # The sum of N b-bit mantissas needs b + headroom bits: 8 + 24 = 32 holds up to N = 2**24.
    assert 2**24 * 127 < 2**31 and accumulator_dtype(8, 2**24) == torch.int32
    assert accumulator_dtype(8, 16_909_320) == torch.int32 and accumulator_dtype(8, 16_909_321) == torch.int64
    assert accumulator_dtype(16, 65_538) == torch.int32 and accumulator_dtype(16, 65_539) == torch.int64
    estimate = allreduce_bytes(_tiny_model().parameters(), 8, 2, buckets=1)
    assert estimate["float32"] == 4 * 276 and estimate["integer"] == 4 * 276 + 8 * 7  # 6 tensors, 1 bucket
