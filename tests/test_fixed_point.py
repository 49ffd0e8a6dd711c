"""The mapping (docs/numerics-contract.md sections 1-2) against independent element-wise references."""
import math
from fractions import Fraction

import pytest
import torch

from intrain_core import NonFiniteError, from_fixed, to_fixed
from intrain_core.backends.reference import from_fixed_bitwise
from intrain_core.fixed_point import qmax, requantize
from intrain_core.rounding import shift_right, stream_key


def reference_nearest(values: list[float], bits: int) -> tuple[list[int], int]:
    """Section 1 written element by element with math.frexp and exact fractions."""
    nonzero = [abs(v) for v in values if v != 0]
    if not nonzero:
        return [0] * len(values), 0
    e = max(math.frexp(v)[1] - 1 for v in nonzero)  # frexp: v = f * 2**k, f in [0.5, 1)
    s = e - (bits - 2)
    limit = qmax(bits)
    mantissas = [max(-limit, min(limit, round(Fraction(v) / Fraction(2) ** s))) for v in values]  # round(): half-even
    return mantissas, s


def spanning_tensors():
    gen = torch.Generator().manual_seed(1)
    cases = []
    for centre in (-140, -130, -126, -100, -20, 0, 20, 100, 120):
        log2 = centre + 8 * torch.rand(257, generator=gen, dtype=torch.float64) - 4
        signs = torch.where(torch.rand(257, generator=gen) < 0.5, -1.0, 1.0).double()
        x = (signs * torch.pow(2.0, log2)).float()
        x[::17] = 0.0
        cases.append(x)
    wide = torch.pow(2.0, torch.linspace(-140, 120, 300, dtype=torch.float64)).float()
    cases += [
        wide,  # 2**-140 .. 2**120 in one tensor: the small end maps to zero
        torch.tensor([2.0**-149, 2.0**-148, 3 * 2.0**-149, -(2.0**-130)]),  # subnormals only
        torch.tensor([0.3]),
        torch.full((5,), -1.7),
        torch.tensor([127.5 * 2.0**-6, 1.0, 0.5 + 2.0**-7, 1.5 * 2.0**-7]),  # ties
    ]
    return cases


@pytest.mark.parametrize("bits", [8, 4, 16])
def test_nearest_mapping_is_bit_exact_against_frexp_reference(bits):
    for x in spanning_tensors():
        fp = to_fixed(x, bits=bits, rounding="nearest")
        mantissas, exponent = reference_nearest(x.tolist(), bits)
        assert fp.exponent == exponent
        assert fp.mantissa.tolist() == mantissas


def test_mantissa_dtype_and_range():
    x = torch.randn(1000)
    for bits, dtype in ((8, torch.int8), (12, torch.int16), (16, torch.int16)):
        fp = to_fixed(x, bits=bits, rounding="nearest")
        assert fp.mantissa.dtype == dtype
        top = int(fp.mantissa.abs().max())
        assert 2 ** (bits - 2) <= top <= qmax(bits)


def test_all_zero_tensor_maps_to_zero_with_exponent_zero():
    fp = to_fixed(torch.zeros(3, 4))
    assert fp.exponent == 0 and not fp.mantissa.any()


def test_clamps_are_counted():
    # 127.75 * 2**-6 rounds to mantissa 128 at 8 bits: the only value that can clamp.
    x = torch.tensor([127.75 * 2.0**-6, 0.5, -0.25])
    fp = to_fixed(x, bits=8, rounding="nearest")
    assert fp.mantissa.tolist()[0] == 127 and fp.clamped == 1
    # Summed in int32 lanes, handed on in int64: a run's counter adds up billions of mappings.
    assert fp.clamped.dtype == torch.int64
    assert to_fixed(torch.tensor([1.0, 0.5]), rounding="nearest").clamped == 0


def test_stochastic_rounding_is_unbiased():
    # Each draw's error is within one step and has variance <= step**2 / 4, so the mean of
    # n draws has standard deviation <= step / (2 sqrt(n)). Six of those bounds the
    # deviation of every element (2e-9 per element to fail; 512 elements). The uniform draw
    # has 24 bits, which adds a bias below 2**-24 of a step.
    x = torch.randn(512, generator=torch.Generator().manual_seed(0)) * 3
    draws = 2000
    total = torch.zeros(512, dtype=torch.float64)
    for counter in range(draws):
        fp = to_fixed(x, bits=8, key=stream_key(123, counter))
        total += fp.mantissa.double()
    step = 2.0 ** fp.exponent
    mean = total / draws * step
    bound = 6 * step / (2 * math.sqrt(draws)) + step * 2**-24
    assert (mean - x.double()).abs().max() <= bound
    # and it is not nearest rounding in disguise: single draws differ
    a, b = to_fixed(x, key=stream_key(123, draws)), to_fixed(x, key=stream_key(123, draws + 1))
    assert not torch.equal(a.mantissa, b.mantissa)


def test_stochastic_rounding_reproducible_from_its_key():
    x = torch.randn(1000)
    a = to_fixed(x, key=stream_key(7, 0))
    b = to_fixed(x, key=stream_key(7, 0))
    c = to_fixed(x, key=stream_key(8, 0))
    assert torch.equal(a.mantissa, b.mantissa)
    assert not torch.equal(a.mantissa, c.mantissa)


def test_stochastic_error_below_one_step():
    x = torch.randn(10000) * 1e-3
    fp = to_fixed(x, key=stream_key(0, 0))
    assert (from_fixed(fp.mantissa, fp.exponent) - x).abs().max() < 2.0**fp.exponent


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_and_names_where(bad):
    x = torch.tensor([1.0, bad])
    with pytest.raises(NonFiniteError, match="layer 'encoder.fc'"):
        to_fixed(x, where="linear input of layer 'encoder.fc'")


def test_from_fixed_matches_bitwise_reference():
    gen = torch.Generator().manual_seed(3)
    accs = [
        torch.randint(-(2**31), 2**31 - 1, (4000,), generator=gen, dtype=torch.int64),
        torch.randint(-(2**62), 2**62, (4000,), generator=gen, dtype=torch.int64),
        torch.randint(-(2**24), 2**24, (4000,), generator=gen, dtype=torch.int64),
        # exact ties at 2**25 + odd multiples of 2: round half to even
        (2**25 + 2 * torch.arange(-500, 500, dtype=torch.int64) + 1),
        torch.tensor([0, 1, -1, 2**24, 2**24 + 1, 2**24 + 3, -(2**24 + 1), 2**53 + 1, 2**62], dtype=torch.int64),
    ]
    for acc in accs:
        for exponent in (-40, -12, 0, 7):
            fast = from_fixed(acc, exponent)
            assert torch.equal(fast.view(torch.int32), from_fixed_bitwise(acc, exponent).view(torch.int32))
        assert torch.equal(from_fixed(acc.to(torch.int32), -3), from_fixed_bitwise(acc.to(torch.int32), -3))


def test_from_fixed_exact_below_2_pow_24():
    acc = torch.arange(-(2**24) + 1, 2**24, 9973, dtype=torch.int32)
    assert torch.equal(from_fixed(acc, 0).double(), acc.double())


def test_shift_right_nearest_is_half_even():
    m = torch.tensor([5, 6, 7, -5, -6, -7, 4, 12, 14], dtype=torch.int64)  # / 4
    expected = [round(Fraction(int(v), 4)) for v in m]
    assert shift_right(m, 2, "nearest").tolist() == expected


def test_shift_right_stochastic_is_unbiased():
    # The same six-sigma argument as for the mapping, in units of the 2**shift step.
    m = torch.arange(-300, 300, dtype=torch.int64)
    draws = 2000
    total = sum(shift_right(m, 5, "stochastic", stream_key(0, c)).double() for c in range(draws))
    assert ((total / draws) - m.double() / 32).abs().max() <= 6 / (2 * math.sqrt(draws))


def test_requantize_narrows_to_bits():
    wide = to_fixed(torch.randn(500), bits=32, rounding="nearest")
    narrow = requantize(wide.mantissa, wide.exponent, 8, "nearest")
    direct = to_fixed(wide.to_float(), bits=8, rounding="nearest")
    assert narrow.exponent == direct.exponent
    # Two roundings (32 then 8 bits) may differ from one only at exact ties.
    assert (narrow.mantissa.long() - direct.mantissa.long()).abs().max() <= 1


def _cpp_mapping_cases():
    gen = torch.Generator().manual_seed(5)
    cases = list(spanning_tensors())
    for size in (1, 15, 17, 4096 + 33, 70001):  # partial vectors, several scheduled blocks
        cases.append(torch.randn(size, generator=gen) * 3.0)
    cases += [torch.zeros(40), torch.full((100,), 127.9), torch.full((100,), -0.75),  # zeros; clamps
              torch.full((33,), 1e-41), torch.tensor([3e38, -1e-45, 0.0] * 7)]  # subnormals, the extremes
    return cases


def _views():
    """Strided views the C++ mapping reads in place: attention's heads of a fused qkv output, a
    transposed key, a broadcast row, a column slice."""
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(3, 5, 3, 2, 16 + 3, generator=gen).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    return [qkv[0], qkv[1].transpose(-2, -1), torch.randn(1, 21, generator=gen).expand(4, 21),
            torch.randn(9, 40, generator=gen)[:, 3:30], torch.randn(50, 1, generator=gen)[::2]]


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("bits", [2, 5, 8])
def test_the_cpp_mapping_gives_the_definitions_bits(rounding, bits):
    """The AVX-512 mapping against the definition run eagerly on the logical tensor: mantissas,
    exponent, clamps and the finite flag, at every scale float32 has, on vector tails, across
    threads' blocks, and on strided views read in place."""
    from intrain_core import native_mapping
    from intrain_core.fixed_point import map_deferred, map_kernel

    if native_mapping.module() is None:
        pytest.skip("no AVX-512 on this CPU, or no C++ compiler")
    key = stream_key(9, 2)
    for x in _cpp_mapping_cases() + _views():
        x = x.float()
        m, exponent, clamped, finite = map_kernel.eager(x.contiguous(), bits, rounding, torch.tensor(key))
        fp, flag = map_deferred(x, bits, rounding, key)
        for got, want in ((fp.mantissa, m), (fp.exponent, exponent), (torch.as_tensor(fp.clamped), clamped),
                          (flag, finite)):
            assert got.dtype == want.dtype and torch.equal(got, want), (x.shape, x.stride(), got, want)
    for bad in (float("nan"), float("inf")):
        x = torch.ones(50)
        x[37] = bad
        assert not bool(native_mapping.map_int8(x, 8, rounding, torch.tensor(key))[3])


def test_float_tensors_take_the_cpp_mapping(monkeypatch):
    from intrain_core import native_mapping

    if native_mapping.module() is None:
        pytest.skip("no AVX-512 on this CPU, or no C++ compiler")
    calls = []
    real = native_mapping.map_int8
    monkeypatch.setattr(native_mapping, "map_int8", lambda x, *args, **kw: calls.append(x.shape) or real(x, *args, **kw))
    x = torch.randn(6, 7)
    for view in (x, x.t(), x[:, ::2]):  # dense; transposed (read as its rows); every other column
        to_fixed(view)
    to_fixed(x, bits=12)  # int16 mantissas
    assert calls == [(6, 7), (6, 7)]  # the last two take the torch kernel
