"""Fused kernels: compiled (inductor, fullgraph) and eager give the same bits; the counter-based
random stream is a function of (seed, counter, element) alone."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from intrain_core import Numerics
from intrain_core.compiled import MIN_COMPILED_NUMEL, compilation
from intrain_core.context import IntegerContext
from intrain_core.fixed_point import from_fixed, map_deferred, requantize, to_fixed_at
from intrain_core.ops import add as add_ops
from intrain_core.ops import norm
from intrain_core.optim import IntSGD
from intrain_core.rounding import RANDOM_BITS, RoundingStream, random_bits, stream_key

# Large enough that every fused kernel takes its compiled path.
SHAPE = (8, 16, 16, 16)
assert torch.Size(SHAPE).numel() >= MIN_COMPILED_NUMEL


def both(fn):
    """``fn()`` eager, then compiled; the compiler must not break the graph anywhere."""
    from torch._dynamo.utils import counters

    with compilation(False):
        eager = fn()
    counters.clear()
    with compilation(True):
        compiled = fn()
    assert not counters["graph_break"], dict(counters["graph_break"])
    return eager, compiled


def same_bits(a, b):
    if isinstance(a, (tuple, list)):
        return all(same_bits(x, y) for x, y in zip(a, b, strict=True))
    if not isinstance(a, torch.Tensor):
        return a == b
    if a.dtype == torch.float32:  # compare the bits, so that -0.0 and NaN payloads count too
        a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    return a.dtype == b.dtype and torch.equal(a, b)


def data(seed=0, scale=3.0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


# Each case compiles its own kernels (tens of seconds on two cores with a cold cache): the
# three cover both roundings and the int8, int16 and int64 mantissa paths.
@pytest.mark.parametrize("bits, rounding", [(8, "stochastic"), (16, "nearest"), (32, "nearest")])
def test_mapping_same_bits_compiled_and_eager(bits, rounding):
    x = data()
    x[0, 0, 0, :4] = torch.tensor([0.0, 2.0**-130, -(2.0**-149), 1e30])  # zero, subnormals, a large value
    eager, compiled = both(lambda: map_deferred(x, bits, rounding, stream_key(3, 7)))
    assert same_bits(eager[0].mantissa, compiled[0].mantissa)
    assert int(eager[0].exponent) == int(compiled[0].exponent)
    assert int(eager[0].clamped) == int(compiled[0].clamped) and bool(eager[1]) == bool(compiled[1])


@pytest.mark.parametrize("shape, columns", [((4, 6, 40, 72), slice(None)), ((96, 600), slice(200, 400))])
def test_transposed_view_maps_as_its_dense_copy(shape, columns):
    """A view laid out as a transpose (an attention key K^T, also when K is a slice of a wider
    tensor) is mapped in memory order with the indices of its own order: the same bits as
    mapping a dense copy, compiled and eager."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))[..., columns].transpose(-1, -2)
    key = stream_key(3, 9)
    with compilation(False):
        dense = map_deferred(x.contiguous(), 8, "stochastic", key)[0]
    eager, compiled = both(lambda: map_deferred(x, 8, "stochastic", key)[0])
    for fp in (eager, compiled):
        assert fp.mantissa.transpose(-1, -2).is_contiguous()  # it took the memory-order path
        assert torch.equal(fp.mantissa, dense.mantissa) and int(fp.exponent) == int(dense.exponent)


def test_non_finite_flag_is_raised_compiled_and_eager():
    x = data()
    x[1, 2, 3, 4] = float("nan")
    eager, compiled = both(lambda: map_deferred(x, 8, "stochastic", stream_key(0, 0))[1])
    assert not bool(eager) and not bool(compiled)


def test_requantize_and_map_at_same_bits():
    wide = (data() * 2**20).to(torch.int64)
    exponent = torch.tensor(-25)
    eager, compiled = both(lambda: (requantize(wide, exponent, 8, "stochastic", stream_key(1, 2)),
                                    to_fixed_at(data(1), exponent, 2**20, "stochastic", stream_key(1, 3))))
    for e, c in zip(eager, compiled):
        assert same_bits(e.mantissa, c.mantissa) and int(e.exponent) == int(c.exponent)
        assert int(e.clamped) == int(c.clamped)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_requantize_in_int32_lanes_is_the_int64_result(rounding):
    """Masters of up to 32 bits narrow in int32; the same values in int64 take the int64 path.
    Magnitudes from 1 bit to 31 (where a biased round-to-nearest sum would pass 2**31)."""
    generator = torch.Generator().manual_seed(4)
    for top in (1, 6, 7, 8, 20, 25, 30, 31):
        wide = torch.randint(-(2**top) + 1, 2**top, SHAPE, generator=generator, dtype=torch.int64)
        wide[0, 0, 0, 0] = 2**top - 1
        exponent, key = torch.tensor(-9), stream_key(2, top)
        for lanes32, lanes64 in both(lambda: (requantize(wide.to(torch.int32), exponent, 8, rounding, key),
                                              requantize(wide, exponent, 8, rounding, key))):
            assert same_bits(lanes32.mantissa, lanes64.mantissa), top
            assert int(lanes32.exponent) == int(lanes64.exponent)
            assert int(lanes32.clamped) == int(lanes64.clamped)


def test_from_fixed_same_bits():
    acc = (data() * 2**28).to(torch.int64)
    eager, compiled = both(lambda: from_fixed(acc, torch.tensor(-37)))
    assert same_bits(eager, compiled)


def make_ctx(**changes):
    return IntegerContext(dataclasses.replace(Numerics.preset("int8"), **changes))


def test_add_same_bits():
    a, b = data(0), data(1, scale=0.01)
    eager, compiled = both(lambda: add_ops.add(make_ctx(), a, b, layer="block"))
    assert same_bits(eager, compiled)


NORMS = {
    "batch_train": lambda c, x, w, b, rm, rv: norm.batch_norm(c, x, rm, rv, w, b, True, 0.1, 1e-5),
    "batch_eval": lambda c, x, w, b, rm, rv: norm.batch_norm(c, x, rm, rv, w, b, False, 0.1, 1e-5),
    "layer": lambda c, x, w, b, rm, rv: norm.layer_norm(c, x, (16,), w[:16], b[:16]),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_forward_backward_and_statistics_same_bits(name):
    x, dy = data(2), data(3)
    w = torch.rand(16, generator=torch.Generator().manual_seed(4)) + 0.5
    b = torch.randn(16, generator=torch.Generator().manual_seed(5))

    def run():
        leaf, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = torch.full((16,), 0.25), torch.full((16,), 2.0)
        y = NORMS[name](make_ctx(), leaf, wl, bl, rm, rv)
        y.backward(dy)
        return y, leaf.grad, wl.grad, bl.grad, rm, rv

    eager, compiled = both(run)
    assert same_bits(eager, compiled)


def test_masked_relu_same_bits():
    """Compiled and eager, and against PyTorch's ReLU: outputs and gradients, with zeros, NaN
    and infinities among the inputs and gradients."""
    from intrain_core.ops.activation import MaskedReLU

    x, grad = data(9), data(10)
    x.view(-1)[:4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")])
    grad.view(-1)[4:7] = torch.tensor([float("inf"), float("nan"), -float("inf")])

    def run(relu):
        leaf = x.clone().requires_grad_()
        y = relu(leaf)
        y.backward(grad)
        return y, leaf.grad

    eager, compiled = both(lambda: run(MaskedReLU.apply))
    assert same_bits(eager, compiled)
    assert same_bits(compiled[0], torch.relu(x))
    assert same_bits(compiled[1].nan_to_num(123.0), run(torch.relu)[1].nan_to_num(123.0))


def test_intsgd_update_same_bits():
    """A parameter updated alone and twenty small ones in flat buffers (enough rows for the
    compiled path)."""
    def run():
        small = [torch.nn.Parameter(data(20 + i).view(-1)[:1000].clone()) for i in range(20)]
        params = [torch.nn.Parameter(data(6)), torch.nn.Parameter(data(7)[0, 0, 0])] + small
        opt = IntSGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            opt.step()
        return [p.detach() for p in params] + [opt.state[p]["momentum"] for p in params]

    eager, compiled = both(run)
    assert same_bits(eager, compiled)


def test_auto_mode_compiles_a_kernel_once_its_eager_time_pays_for_it(monkeypatch):
    """``auto``: a kernel stays eager while its eager seconds are below one expected compilation,
    and, before anything is compiled in the process, while all kernels' eager seconds are below
    the compiler's start-up; then it is compiled, with the same bits. The first compilation
    pays the start-up and is not taken as the cost of one kernel; the next one is."""
    from intrain_core import compiled, kernel_record
    from intrain_core.fixed_point import map_kernel

    x, key = data(8), torch.tensor(stream_key(2, 1))
    stochastic = ((True, None), (False, 8), (False, "stochastic"), (True, None))
    nearest = ((True, None), (False, 8), (False, "nearest"), (True, None))
    monkeypatch.setattr(compiled, "EXPECTED_COMPILE_S", 3600.0)
    monkeypatch.setattr(compiled, "EXPECTED_STARTUP_S", 7200.0)
    monkeypatch.setattr(compiled, "_compile_seconds", [])
    monkeypatch.setattr(compiled, "_startup_paid", False)
    monkeypatch.setattr(compiled, "_eager_seconds", 0.0)
    monkeypatch.setattr(kernel_record, "known", lambda signature: False)
    for options in (stochastic, nearest):
        monkeypatch.setitem(map_kernel.kernels, options, compiled._Kernel())
    with compilation("auto"):
        first = map_kernel(x, 8, "stochastic", key)
        entry = map_kernel.kernels[stochastic]
        assert entry.compiled is None and 0 < entry.eager_seconds < 3600
        assert compiled._eager_seconds == entry.eager_seconds
        entry.eager_seconds = 3600.0  # as if an hour had been spent in it
        map_kernel(x, 8, "stochastic", key)
        assert entry.compiled is None  # the start-up is not paid for yet
        compiled._eager_seconds = 7200.0  # as if all kernels had spent two hours
        second = map_kernel(x, 8, "stochastic", key)
        assert entry.compiled is not None and compiled._startup_paid and compiled._compile_seconds == []
        other = map_kernel.kernels[nearest]
        map_kernel(x, 8, "nearest", key)
        assert other.compiled is None
        other.eager_seconds = 3600.0
        map_kernel(x, 8, "nearest", key)
    assert other.compiled is not None and len(compiled._compile_seconds) == 1
    assert compiled.expected_compile_seconds() == compiled._compile_seconds[0]
    assert same_bits(first, second)


def test_compiled_graphs_run_without_dynamo_while_their_guards_hold(monkeypatch):
    """After a kernel's compiled call its graphs run directly, under dynamo's own guards: the
    same bits without a call into torch.compile's wrapper; an input that no graph's guards
    admit (another rank) goes through it, and the graph compiled for it is learnt too."""
    from intrain_core import compiled
    from intrain_core.fixed_point import map_kernel

    x, key = data(11), torch.tensor(stream_key(3, 1))
    options = ((True, None), (False, 8), (False, "stochastic"), (True, None))
    monkeypatch.setitem(map_kernel.kernels, options, compiled._Kernel())
    with compilation(True):
        first = map_kernel(x, 8, "stochastic", key)
        entry = map_kernel.kernels[options]
        wrapped, calls = entry.compiled, []

        def counted(*data):
            calls.append(data)
            return wrapped(*data)

        counted._torchdynamo_orig_callable = wrapped._torchdynamo_orig_callable
        entry.compiled = counted
        second = map_kernel(x, 8, "stochastic", key)
        assert not calls and len(entry.direct) == 1
        flat = x.reshape(-1, x.shape[-1])
        third = map_kernel(flat, 8, "stochastic", key)
        assert len(calls) == 1 and len(entry.direct) == 2
        fourth = map_kernel(flat, 8, "stochastic", key)
        assert len(calls) == 1
    assert same_bits(first, second) and same_bits(first, map_kernel.eager(x, 8, "stochastic", key))
    assert same_bits(third, fourth) and same_bits(third, map_kernel.eager(flat, 8, "stochastic", key))


def test_a_graph_runs_again_for_its_input_layout_without_its_guards(monkeypatch):
    """A layout that a graph admitted runs that graph again without a guard check; another
    layout, or the same one under another global state (grad mode), is checked again."""
    from intrain_core import compiled
    from intrain_core.fixed_point import from_fixed_kernel

    options = ((True, None), (True, None), (False, None))
    monkeypatch.setitem(from_fixed_kernel.kernels, options, compiled._Kernel())
    acc = torch.randint(-2**20, 2**20, (70, 300), dtype=torch.int32)
    exponent = torch.tensor(-9)
    with compilation(True):
        for _ in range(2):  # a compilation for each layout, then the graph that admits it
            from_fixed_kernel(acc, exponent, None)
            from_fixed_kernel(acc.t(), exponent, None)
        entry, checks = from_fixed_kernel.kernels[options], []

        class Counted:
            def __init__(self, guards):
                self.guards = guards

            def check(self, frame_locals):
                checks.append(1)
                return self.guards.check(frame_locals)

        entry.direct = [(Counted(guards), function) for guards, function in entry.direct]
        again = [from_fixed_kernel(t, exponent, None) for t in (acc, acc.t(), acc)]
        assert not checks
        with torch.no_grad():
            under_no_grad = from_fixed_kernel(acc, exponent, None)
        assert checks
    expected = from_fixed_kernel.eager(acc, exponent, None)
    assert same_bits(again[0], expected) and same_bits(again[2], expected) and same_bits(under_no_grad, expected)
    assert same_bits(again[1], from_fixed_kernel.eager(acc.t(), exponent, None))


def test_random_bits_depend_on_key_and_index_only():
    key = stream_key(11, 5)
    r = random_bits((1000,), key, "cpu")
    assert r.dtype == torch.int32 and 0 <= int(r.min()) and int(r.max()) < 2**RANDOM_BITS
    assert torch.equal(random_bits((10, 100), key, "cpu").view(-1), r)  # the shape does not matter
    assert not torch.equal(random_bits((1000,), stream_key(11, 6), "cpu"), r)
    assert not torch.equal(random_bits((1000,), stream_key(12, 5), "cpu"), r)
    # Uniform: each of 16 bins of the top 4 bits holds 1/16 of 2**16 draws, within 6 sigma.
    counts = torch.bincount(random_bits((2**16,), key, "cpu") >> (RANDOM_BITS - 4), minlength=16).double()
    sigma = (2**16 * (1 / 16) * (15 / 16)) ** 0.5
    assert ((counts - 2**12).abs() <= 6 * sigma).all()


@pytest.mark.parametrize("compiled", [False, True])
def test_random_bits_are_the_hash_of_key_and_index(compiled):
    """The int32-lane hash gives the bits of the stream's definition, hash(k, i) computed on
    int64 values in [0, 2**32) (``_mix32`` as written for Python ints), eager and compiled."""
    from intrain_core.rounding import _mix32

    index = torch.arange(3 * MIN_COMPILED_NUMEL, dtype=torch.int64)
    for key in (0, stream_key(0, 0), stream_key(2**40 + 3, 17), 2**63 - 1):
        low, high = key & 0xFFFFFFFF, key >> 32
        expected = _mix32(_mix32(index ^ low) ^ high) >> (32 - RANDOM_BITS)
        draw = (torch.compile(random_bits, fullgraph=True, dynamic=True) if compiled else random_bits)
        assert torch.equal(draw((3, MIN_COMPILED_NUMEL), torch.tensor(key), "cpu").view(-1).long(), expected), key


def test_stream_resumes_from_seed_and_counter():
    stream = RoundingStream(7)
    for _ in range(5):
        stream.next_key()
    saved = stream.state_dict()
    assert saved == {"seed": 7, "counter": 5}
    ahead = [int(stream.next_key()) for _ in range(3)]
    resumed = RoundingStream(0)
    resumed.load_state_dict(saved)
    assert [int(resumed.next_key()) for _ in range(3)] == ahead


def test_keys_drawn_together_are_the_keys_drawn_one_by_one():
    together, one_by_one = RoundingStream(2**40 + 5, 2**33), RoundingStream(2**40 + 5, 2**33)
    keys = together.next_keys(300)
    assert keys.tolist() == [int(one_by_one.next_key()) for _ in range(300)]
    assert together.counter == one_by_one.counter


def test_tensors_laid_out_in_rows_draw_what_each_draws_alone():
    """Per-row keys and in-tensor indices (the flat optimiser's rows) give each tensor the bits
    it draws alone."""
    keys = [stream_key(3, 5), stream_key(9, 2**40)]
    rows = torch.tensor(keys).view(2, 1)
    offset = torch.tensor([[0], [100]], dtype=torch.int32)
    laid_out = random_bits((2, 100), rows, "cpu", offset + torch.arange(100, dtype=torch.int32))
    assert torch.equal(laid_out[0], random_bits((100,), keys[0], "cpu"))
    assert torch.equal(laid_out[1], random_bits((200,), keys[1], "cpu")[100:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_bits_on_cuda_as_on_cpu():
    x = data()
    for rounding in ("stochastic", "nearest"):
        cpu, _ = map_deferred(x, 8, rounding, stream_key(2, 9))
        gpu, _ = map_deferred(x.cuda(), 8, rounding, stream_key(2, 9))
        assert torch.equal(cpu.mantissa, gpu.mantissa.cpu()) and int(cpu.exponent) == int(gpu.exponent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_backward_never_wait_for_the_device():
    from intrain_core import convert

    model = convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.Flatten(), torch.nn.LazyLinear(10)).cuda(), "int8")
    x = torch.randn(4, 3, 16, 16, device="cuda")
    model(x)  # materialise the lazy layer and pick the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long, device="cuda")).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("scales", [(1.0, 0.01), (0.01, 1.0), (1.0, 1.0)])
@pytest.mark.parametrize("broadcast", [False, True])
def test_add_rounds_as_if_both_operands_were_aligned(scales, broadcast):
    """The add rounds only the finer operand; the bits must be those of the definition, which
    maps both operands and then rounds each onto the shared exponent with its own key."""
    from intrain_core.fixed_point import rounded_mantissas, scale_by_pow2, shared_exponent
    from intrain_core.rounding import round_float

    a = data(9, scale=scales[0])
    b = data(10, scale=scales[1])[:1] if broadcast else data(10, scale=scales[1])
    keys = tuple(torch.tensor(stream_key(4, i)) for i in range(4))

    def definition():
        ms, es = [], []
        for v, key in ((a, keys[0]), (b, keys[1])):
            e, _ = shared_exponent(v, 8)
            ms.append(rounded_mantissas(v, e, "stochastic", key).clamp(-127, 127))
            es.append(e)
        top = torch.maximum(*es)
        aligned = [round_float(scale_by_pow2(m, e - top), "stochastic", k) for m, e, k in zip(ms, es, keys[2:])]
        return from_fixed(aligned[0] + aligned[1], top)

    eager, compiled = both(lambda: add_ops._add(a, b, 8, "stochastic", keys)[0])
    expected = definition()
    assert same_bits(eager, expected) and same_bits(compiled, expected)
