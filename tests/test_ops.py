"""Integer ops: native == reference bit for bit, close to float within bounds derived from the
bit-width, unbiased gradients, exact long reductions (docs/numerics-contract.md sections 3, 5, 6)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from intrain_core import Numerics
from intrain_core.context import IntegerContext
from intrain_core.ops import add, conv, linear, matmul, pool
from test_kernels import same_bits


def make_ctx(backend="native", bits=8, seed=0, rounding="stochastic"):
    n = dataclasses.replace(
        Numerics.preset("int8"), backend=backend, forward_bits=bits, backward_bits=bits, seed=seed, rounding=rounding
    )
    return IntegerContext(n)


# Each case: (name, integer op taking ctx, float op, input shapes). Shapes exercise the native
# kernel's chunking: reductions over 1040 products (2**24 // 127**2) and float64 fallbacks.
CASES = [
    ("linear", lambda c, x, w, b: linear.linear(c, x, w, b), F.linear, [(3, 5, 24), (16, 24), (16,)]),
    ("linear_long_k", lambda c, x, w: linear.linear(c, x, w), F.linear, [(6, 2100), (5, 2100)]),
    ("conv3x3", lambda c, x, w: conv.conv2d(c, x, w, None, 1, 1), lambda x, w: F.conv2d(x, w, None, 1, 1), [(2, 8, 9, 9), (6, 8, 3, 3)]),
    ("conv_bias_stride", lambda c, x, w, b: conv.conv2d(c, x, w, b, 2, 1), lambda x, w, b: F.conv2d(x, w, b, 2, 1), [(2, 4, 11, 11), (6, 4, 3, 3), (6,)]),
    ("conv_many_channels", lambda c, x, w: conv.conv2d(c, x, w, None, 1, 1), lambda x, w: F.conv2d(x, w, None, 1, 1), [(2, 130, 5, 5), (140, 130, 3, 3)]),
    ("conv_many_positions", lambda c, x, w: conv.conv2d(c, x, w, None, 1, 1), lambda x, w: F.conv2d(x, w, None, 1, 1), [(3, 2, 36, 36), (3, 2, 3, 3)]),
    ("conv_dilated_grouped", lambda c, x, w: conv.conv2d(c, x, w, None, 1, 2, 2, 2), lambda x, w: F.conv2d(x, w, None, 1, 2, 2, 2), [(2, 4, 9, 9), (6, 2, 3, 3)]),
    ("conv_depthwise", lambda c, x, w: conv.conv2d(c, x, w, None, 1, 1, 1, 4), lambda x, w: F.conv2d(x, w, None, 1, 1, 1, 4), [(2, 4, 8, 8), (4, 1, 3, 3)]),
    ("conv_same", lambda c, x, w: conv.conv2d(c, x, w, None, 1, "same"), lambda x, w: F.conv2d(x, w, None, 1, "same"), [(2, 3, 7, 7), (4, 3, 5, 5)]),
    ("conv1d", lambda c, x, w: conv.conv1d(c, x, w, None, 2, 1), lambda x, w: F.conv1d(x, w, None, 2, 1), [(2, 5, 17), (3, 5, 4)]),
    ("conv_transpose", lambda c, x, w, b: conv.conv_transpose2d(c, x, w, b, 2, 1, 1), lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1), [(2, 6, 5, 5), (6, 3, 3, 3), (3,)]),
    ("matmul_batched", lambda c, a, b: matmul.matmul(c, a, b), torch.matmul, [(2, 3, 7, 9), (2, 3, 9, 4)]),
    ("matmul_broadcast", lambda c, a, b: matmul.matmul(c, a, b), torch.matmul, [(2, 3, 7, 9), (9, 4)]),
    ("matmul_expanded", lambda c, a, b: matmul.matmul(c, a, b), torch.matmul, [(2, 1, 7, 9), (2, 3, 9, 4)]),
]


def random_inputs(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * (0.5 + i) for i, s in enumerate(shapes)]


def run(op, ctx, inputs, grad):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = op(ctx, *leaves)
    y.backward(grad)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name,int_op,float_op,shapes", CASES, ids=[c[0] for c in CASES])
def test_native_and_reference_are_bit_identical(name, int_op, float_op, shapes, bits):
    inputs = random_inputs(shapes, 0)
    grad = torch.randn_like(float_op(*inputs))
    y_native, g_native = run(int_op, make_ctx("native", bits), inputs, grad)
    y_ref, g_ref = run(int_op, make_ctx("reference", bits), inputs, grad)
    assert torch.equal(y_native, y_ref)
    for a, b in zip(g_native, g_ref):
        assert torch.equal(a, b)


def step(t: torch.Tensor, bits: int) -> float:
    """The mapping's step: the max lands in [2**(b-2), 2**(b-1)), so step <= max|t| / 2**(b-2)."""
    amax = float(t.abs().max())
    return 2.0 ** (math.frexp(amax)[1] - 1 - (bits - 2)) if amax else 0.0


def bilinear_bound(op, a, b, bits_a, bits_b):
    """Elementwise bound on |op(a', b') - op(a, b)| when every element of a' (b') is within one
    step of a (b), stochastic or nearest, clamped or not:
    |da| b + a |db| + |da||db| summed by op, i.e. sa op(1, |b|) + sb op(|a|, 1) + sa sb op(1, 1).
    """
    sa, sb = step(a, bits_a), step(b, bits_b)
    ones_a, ones_b = torch.ones_like(a), torch.ones_like(b)
    return sa * op(ones_a, b.abs()) + sb * op(a.abs(), ones_b) + sa * sb * op(ones_a, ones_b)


def float32_slack(reference):
    # from_fixed rounds to float32 once (half an ulp, 2**-24 relative); the float64
    # reference is exact to far below that.
    return reference.abs() * 2.0**-23 + 1e-30


BILINEAR = {
    "linear": (lambda a, b: a @ b.t(), 0),
    "conv3x3": (lambda x, w: F.conv2d(x, w, None, 1, 1), 0),
    "conv_transpose": (lambda x, w: F.conv_transpose2d(x, w, None, 2, 1, 1), 0),
    "matmul_batched": (torch.matmul, 0),
}


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", sorted(BILINEAR))
def test_forward_and_backward_within_derived_bound_of_float(name, bits):
    case = next(c for c in CASES if c[0] == name)
    _, int_op, float_op, shapes = case
    inputs = random_inputs(shapes, 1)
    a, b = inputs[0], inputs[1]
    op = BILINEAR[name][0]
    y_float = float_op(*[t.double() for t in inputs])
    grad = torch.randn_like(y_float.float())
    y, grads = run(int_op, make_ctx(bits=bits), inputs, grad)
    # A bias joins on the product's exponent: one more step of sa * sb.
    bias_step = step(a, bits) * step(b, bits) if len(inputs) > 2 else 0.0
    bound = bilinear_bound(lambda u, v: op(u.double(), v.double()), a, b, bits, bits) + bias_step
    assert ((y.double() - y_float).abs() <= bound + float32_slack(y_float)).all()
    # grad_a = op_a(g, b): bilinear in (g, b), with g and b each within one step.
    a64 = a.double().requires_grad_()
    b64 = b.double().requires_grad_()
    float_op(a64, b64, *[t.double() for t in inputs[2:]]).backward(grad.double())
    bound_a = _grad_bound(op, a, b, grad, bits, wrt=0)
    bound_b = _grad_bound(op, a, b, grad, bits, wrt=1)
    assert ((grads[0].double() - a64.grad).abs() <= bound_a + float32_slack(a64.grad)).all()
    assert ((grads[1].double() - b64.grad).abs() <= bound_b + float32_slack(b64.grad)).all()


def _grad_bound(op, a, b, grad, bits, wrt):
    """Bound on the error of d<op>/d(a or b) . grad when grad and the other operand are both
    mapped: the vector-Jacobian product is bilinear in (grad, other operand), so the same
    |dg| |v| + |g| |dv| + |dg||dv| argument applies, evaluated with autograd on magnitudes."""
    other = b if wrt == 0 else a
    sg, sv = step(grad, bits), step(other, bits)

    def vjp(g, v):
        x = (a if wrt == 0 else v).double().requires_grad_(wrt == 0)
        w = (v if wrt == 0 else b).double().requires_grad_(wrt == 1)
        out = op(x, w)
        (target,) = torch.autograd.grad(out, [x if wrt == 0 else w], g.double())
        return target

    ones_g, ones_v = torch.ones_like(grad), torch.ones_like(other)
    return sg * vjp(ones_g, other.abs()) + sv * vjp(grad.abs(), ones_v) + sg * sv * vjp(ones_g, ones_v)


@pytest.mark.parametrize("name", ["linear", "conv3x3", "matmul_batched"])
def test_gradients_are_unbiased(name):
    # Each draw's error is bounded by the derived bound B (elementwise) and has mean zero
    # (independent unbiased roundings of grad and operand), so the mean of n draws deviates
    # by at most 6 B / sqrt(n) except with probability ~2e-9 per element.
    _, int_op, float_op, shapes = next(c for c in CASES if c[0] == name)
    inputs = random_inputs(shapes, 2)
    grad = torch.randn_like(float_op(*inputs))
    ctx = make_ctx(seed=5)
    draws = 300
    sums = [torch.zeros_like(t, dtype=torch.float64) for t in inputs]
    for _ in range(draws):
        _, grads = run(int_op, ctx, inputs, grad)
        for s, g in zip(sums, grads):
            s += g.double()
    leaves = [t.double().requires_grad_() for t in inputs]
    float_op(*leaves).backward(grad.double())
    op = BILINEAR[name][0]
    for wrt, (s, leaf) in enumerate(zip(sums[:2], leaves[:2])):
        bound = _grad_bound(op, inputs[0], inputs[1], grad, 8, wrt)
        assert ((s / draws - leaf.grad).abs() <= 6 * bound / math.sqrt(draws) + float32_slack(leaf.grad)).all()


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_reduction_past_int32_range_stays_exact(backend):
    # 127 * 127 * K exceeds 2**31 - 1 from K = 133,145 on; the brief's 133,152 is past it.
    k = 133_152
    ctx = make_ctx(backend, rounding="nearest")
    x = torch.full((1, k), 127 / 64)  # maps to mantissa 127 exactly (exponent -6)
    w = torch.full((1, k), -127 / 64)
    y = linear.linear(ctx, x, w)
    exact = -(127 * 127 * k) * 2.0**-12
    assert 127 * 127 * k > 2**31 - 1
    assert float(y) == float(torch.tensor(exact, dtype=torch.float64).float())
    assert ctx.counters["widenings"] >= 1


def test_int32_accumulator_refuses_to_overflow():
    n = dataclasses.replace(Numerics.preset("int8"), accumulator="int32")
    ctx = IntegerContext(n)
    with pytest.raises(OverflowError, match="int64"):
        linear.linear(ctx, torch.ones(1, 140_000), torch.ones(1, 140_000))


def test_add_aligns_exponents_and_has_identity_backward():
    ctx = make_ctx(rounding="nearest")
    a = torch.tensor([1.0, -0.5, 0.25]).requires_grad_()
    b = torch.tensor([2.0**-9, 2.0**-3, 3.0]).requires_grad_()
    y = add.add(ctx, a, b)
    # exponents: a -> -6, b -> 1 - 6 = -5; a is shifted to -5 (exact here: multiples of 2**-5).
    assert y.tolist() == [1.0, -0.5 + 2.0**-3, 3.25]
    y.backward(torch.tensor([1.0, 2.0, 3.0]))
    assert a.grad.tolist() == [1.0, 2.0, 3.0] and b.grad.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_a_power_of_two_scale_joins_the_exponent_bit_for_bit(backend):
    """Attention's 1/sqrt(64) folded into the product's exponent gives the bits of the float
    multiply after it, forward and backward: scaling by a power of two moves only exponents."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 9, 64, generator=gen), torch.randn(2, 3, 11, 64, generator=gen)
    upstream = torch.randn(2, 3, 9, 11, generator=gen)
    results = []
    for folded in (True, False):
        ctx = make_ctx(backend=backend, seed=4)
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        if folded:
            y = matmul.matmul(ctx, a, b.transpose(-2, -1), scale_exponent=-3)
        else:
            y = matmul.matmul(ctx, a, b.transpose(-2, -1)) * 0.125
        y.backward(upstream)
        results.append((y.detach(), a.grad, b.grad))
    for folded, multiplied in zip(*results):
        assert same_bits(folded, multiplied)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_average_pooling_within_one_step(rounding):
    # The window mean of values each within one step is within one step; the reciprocal's
    # relative error (2**-25) and float32 output rounding add below 2**-22 relative.
    ctx = make_ctx(rounding=rounding)
    x = torch.randn(2, 3, 8, 8)
    for int_op, float_op in [
        (lambda t: pool.avg_pool2d(ctx, t, 3, 2, 1), lambda t: F.avg_pool2d(t, 3, 2, 1)),
        (lambda t: pool.adaptive_avg_pool2d(ctx, t, 1), lambda t: F.adaptive_avg_pool2d(t, 1)),
        (lambda t: pool.mean(ctx, t, (2, 3)), lambda t: t.mean((2, 3))),
    ]:
        y, ref = int_op(x), float_op(x.double())
        assert ((y.double() - ref).abs() <= step(x, 8) + ref.abs() * 2.0**-22).all()


def test_pooling_backends_bit_identical():
    x = torch.randn(2, 3, 8, 8)
    grad = torch.randn(2, 3, 4, 4)
    outs = []
    for backend in ("native", "reference"):
        ctx = make_ctx(backend)
        leaf = x.clone().requires_grad_()
        pool.avg_pool2d(ctx, leaf, 2).backward(grad)
        outs.append(leaf.grad)
    assert torch.equal(*outs)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("bits", [8, 12])
def test_the_cpp_residual_add_gives_the_definitions_bits(rounding, bits):
    """The AVX-512 add against ``_add`` run eagerly: either operand the finer, equal exponents,
    clamps, zeros, vector tails and several threads' blocks."""
    from intrain_core import native_mapping
    from intrain_core.rounding import stream_key

    if native_mapping.module() is None:
        pytest.skip("no AVX-512 on this CPU, or no C++ compiler")
    gen = torch.Generator().manual_seed(12)
    keys = tuple(torch.tensor(stream_key(3, c)) for c in range(4))
    pairs = [(torch.randn(4096 * 3 + 7, generator=gen), torch.randn(4096 * 3 + 7, generator=gen) * 50),
             (torch.randn(2, 65, 19, generator=gen) * 1e-3, torch.randn(2, 65, 19, generator=gen)),
             (torch.randn(33, generator=gen), torch.randn(33, generator=gen)),
             (torch.full((40,), 127.9), torch.full((40,), -0.3)), (torch.zeros(17), torch.randn(17, generator=gen))]
    for a, b in pairs:
        expected = add._add.eager(a, b, bits, rounding, keys)
        result = native_mapping.add_int8(a, b, bits, rounding, keys)
        for got, want in zip(result, expected):
            assert got.dtype == want.dtype and torch.equal(got, want), (a.shape, got, want)


def test_broadcast_add_gradient_is_an_integer_sum_within_bound():
    # The broadcast operand's gradient sums `rows` mapped gradients, each within one step.
    ctx = make_ctx()
    a = torch.randn(6, 4, 3, requires_grad=True)
    b = torch.randn(1, 4, 3, requires_grad=True)
    grad = torch.randn(6, 4, 3)
    add.add(ctx, a, b).backward(grad)
    assert torch.equal(a.grad, grad)
    assert ((b.grad - grad.sum(0, keepdim=True)).abs() <= 6 * step(grad, 8)).all()
    assert ctx.ops  # the backward sum was logged as integer
    assert any(k.phase == "backward" and k.arithmetic == "integer" for k in ctx.ops)


# Geometries of the int8 GEMM convolutions (backends/im2col.py): strides that leave input rows
# no output reads, a 7x7 stem, a strided 1x1 downsample, dilation, uneven kernels, and padding
# past the kernel's reach (its input gradient falls back to the float kernel).
IM2COL_CASES = {
    "3x3": ((2, 8, 9, 9), (6, 8, 3, 3), dict(stride=1, padding=1)),
    "stride_uncovered_rows": ((2, 4, 12, 12), (6, 4, 3, 3), dict(stride=2, padding=0)),
    "stem_7x7": ((2, 3, 15, 15), (5, 3, 7, 7), dict(stride=2, padding=3)),
    "downsample_1x1": ((2, 4, 10, 12), (6, 4, 1, 1), dict(stride=2, padding=0)),
    "dilated_uneven": ((2, 4, 9, 10), (6, 4, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    "padding_past_reach": ((1, 3, 6, 6), (2, 3, 1, 1), dict(stride=1, padding=1)),
}


@pytest.mark.parametrize("name", sorted(IM2COL_CASES))
def test_int_mm_convolutions_match_reference(name, monkeypatch):
    from intrain_core.backends import im2col

    x_shape, w_shape, geometry = IM2COL_CASES[name]
    inputs = random_inputs([x_shape, w_shape], 1)
    grad = torch.randn_like(F.conv2d(*inputs, **geometry))
    calls = []
    for kind in ("conv2d", "conv2d_input", "conv2d_weight"):
        kernel = getattr(im2col, kind)
        monkeypatch.setattr(im2col, kind, lambda *a, _k=kernel, _n=kind: calls.append(_n) or _k(*a))
    op = lambda c, x, w: conv.conv2d(c, x, w, None, **geometry)
    monkeypatch.setenv("INTRAIN_CONV_KERNEL", "int_mm")
    y_native, g_native = run(op, make_ctx("native"), inputs, grad)
    assert sorted(calls) == ["conv2d", "conv2d_input", "conv2d_weight"]
    y_ref, g_ref = run(op, make_ctx("reference"), inputs, grad)
    assert torch.equal(y_native, y_ref) and y_native.is_contiguous()
    for a, b in zip(g_native, g_ref, strict=True):
        assert torch.equal(a, b)


def test_int_mm_conv_transpose_matches_reference(monkeypatch):
    inputs = random_inputs([(2, 6, 5, 5), (6, 3, 3, 3)], 2)
    op = lambda c, x, w: conv.conv_transpose2d(c, x, w, None, 2, 1, 1)
    grad = torch.randn_like(F.conv_transpose2d(*inputs, None, 2, 1, 1))
    monkeypatch.setenv("INTRAIN_CONV_KERNEL", "int_mm")
    y_native, g_native = run(op, make_ctx("native"), inputs, grad)
    y_ref, g_ref = run(op, make_ctx("reference"), inputs, grad)
    assert torch.equal(y_native, y_ref)
    for a, b in zip(g_native, g_ref, strict=True):
        assert torch.equal(a, b)


def test_weight_gradient_past_int32_sums_blocks_exactly(monkeypatch):
    """A weight gradient over more products than int32 holds sums int32 blocks into int64."""
    from intrain_core.backends import im2col, reference

    gen = torch.Generator().manual_seed(3)
    x = torch.full((40, 1, 60, 60), 127, dtype=torch.int8)
    g = torch.randint(120, 128, (40, 1, 60, 60), dtype=torch.int8, generator=gen)
    bound = 127 * 127
    assert 40 * 3600 * bound > 2**31  # one int32 sum would overflow
    monkeypatch.setattr(im2col, "BLOCK_BYTES", 1 << 30)  # so only the int32 bound splits the blocks
    dw = im2col.conv2d_weight(x, (1, 1, 1, 1), g, (1, 1), (0, 0), (1, 1), bound, torch.int64)
    expected = reference.conv2d_weight(x, (1, 1, 1, 1), g, (1, 1), (0, 0), (1, 1), 1, bound, torch.int64)
    assert dw.dtype == torch.int64 and torch.equal(dw, expected) and int(dw) > 2**31


def test_scratch_buffers_are_reused_and_stay_exact(monkeypatch):
    """Blocks of patches and the padded channels-last copies go into buffers that the thread
    keeps: convolutions of other shapes and strides in turn (each split into several blocks,
    each finding the last one's values in the buffers) still equal the reference in all three
    directions, and an image larger than a block gets a buffer of its own that is not kept."""
    import threading

    from intrain_core.backends import im2col, reference, scratch

    block_bytes = 4096
    monkeypatch.setattr(im2col, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(scratch, "_kept", threading.local())
    gen = torch.Generator().manual_seed(5)
    bound, one = 127 * 127, (1, 1)
    kept = []
    for x_shape, w_shape, stride in (((6, 4, 9, 9), (5, 4, 3, 3), (1, 1)), ((5, 8, 6, 6), (3, 8, 3, 3), (2, 2)),
                                     ((4, 3, 8, 7), (2, 3, 3, 3), (1, 1)), ((2, 16, 20, 20), (4, 16, 3, 3), (1, 1))):
        x = torch.randint(-127, 128, x_shape, dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, w_shape, dtype=torch.int8, generator=gen)
        y = im2col.conv2d(x, w, stride, one, one)
        assert torch.equal(y, reference.conv2d(x, w, stride, one, one, 1, bound, torch.int32))
        g = torch.randint(-127, 128, y.shape, dtype=torch.int8, generator=gen)
        dx = im2col.conv2d_input(x.shape, w, g, stride, one, one)
        assert torch.equal(dx, reference.conv2d_input(x.shape, w, g, stride, one, one, 1, bound, torch.int32))
        dw = im2col.conv2d_weight(x, w_shape, g, stride, one, one, bound, torch.int32)
        assert torch.equal(dw, reference.conv2d_weight(x, w_shape, g, stride, one, one, 1, bound, torch.int32))
        kept.append(scratch._kept.block)
    assert kept[-1] is kept[-2]  # the last one's images were each too large to keep a buffer
    assert max(buffer.numel() for buffer in kept) <= block_bytes


def test_a_convolution_result_goes_into_the_thread_buffer_only_when_asked(monkeypatch):
    """``scratch=True`` (the conv op, which converts at once): each result, exact when returned,
    lies in the thread's kept buffer, which the next such call overwrites; without it a result
    is the caller's own and no later call changes it."""
    import threading

    from intrain_core.backends import im2col, reference, scratch

    monkeypatch.setattr(scratch, "_kept", threading.local())
    gen = torch.Generator().manual_seed(6)
    bound, one = 127 * 127, (1, 1)
    x = torch.randint(-127, 128, (3, 4, 7, 7), dtype=torch.int8, generator=gen)
    w = [torch.randint(-127, 128, (5, 4, 3, 3), dtype=torch.int8, generator=gen) for _ in range(2)]
    expected = [reference.conv2d(x, wi, one, one, one, 1, bound, torch.int32) for wi in w]
    own = im2col.conv2d(x, w[0], one, one, one)
    first = im2col.conv2d(x, w[0], one, one, one, scratch=True)
    assert torch.equal(first, expected[0])
    snapshot = first.clone()
    second = im2col.conv2d(x, w[1], one, one, one, scratch=True)
    assert torch.equal(second, expected[1])
    assert second.data_ptr() == first.data_ptr() and not torch.equal(first, snapshot)
    g = torch.randint(-127, 128, expected[0].shape, dtype=torch.int8, generator=gen)
    dx = im2col.conv2d_input(x.shape, w[0], g, one, one, one, scratch=True)
    assert dx.data_ptr() == first.data_ptr()
    assert torch.equal(dx, reference.conv2d_input(x.shape, w[0], g, one, one, one, 1, bound, torch.int32))
    assert torch.equal(own, expected[0]) and own.data_ptr() != first.data_ptr()


def test_a_gemm_result_goes_into_the_thread_buffer_only_when_asked(monkeypatch):
    """``scratch=True`` (a linear layer, which converts its accumulator at once): an ``int_mm``
    result, exact when returned, lies in the thread's kept buffer, which the next such call
    overwrites; a call without it returns a tensor of its own; results past the kept size, and
    the reference backend's, are always new."""
    import threading

    from intrain_core.backends import native, reference, scratch

    monkeypatch.setattr(scratch, "_kept", threading.local())
    monkeypatch.setenv("INTRAIN_GEMM_KERNEL", "int_mm")
    native.gemm_kernel.cache_clear()
    try:
        gen = torch.Generator().manual_seed(7)
        bound = 127 * 127
        a = [torch.randint(-127, 128, (9, 16), dtype=torch.int8, generator=gen) for _ in range(2)]
        b = torch.randint(-127, 128, (16, 5), dtype=torch.int8, generator=gen)
        expected = [ai.long() @ b.long() for ai in a]
        own = native.matmul(a[0], b, bound, torch.int32)
        first = native.matmul(a[0], b, bound, torch.int32, scratch=True)
        assert torch.equal(first.long(), expected[0])
        snapshot = first.clone()
        second = native.matmul(a[1], b.t().contiguous().t(), bound, torch.int32, scratch=True)
        assert torch.equal(second.long(), expected[1])
        assert second.data_ptr() == first.data_ptr() and not torch.equal(first, snapshot)
        assert torch.equal(own.long(), expected[0]) and own.data_ptr() != first.data_ptr()
        monkeypatch.setattr(scratch, "KEPT_BYTES", 9 * 5 * 4 - 1)
        large = native.matmul(a[0], b, bound, torch.int32, scratch=True)
        assert torch.equal(large.long(), expected[0]) and large.data_ptr() != first.data_ptr()
        ref = reference.matmul(a[0], b, bound, torch.int32, scratch=True)
        assert torch.equal(ref.long(), expected[0]) and ref.data_ptr() != first.data_ptr()
    finally:
        native.gemm_kernel.cache_clear()


def test_int_mm_sums_exactly_whatever_the_operand_strides():
    """Rows and columns of one element with any stride, transposed operands, int8 extremes."""
    from intrain_core.backends.int_mm import int_mm

    gen = torch.Generator().manual_seed(4)
    for m, k, n in [(1, 1, 3), (1, 5, 1), (3, 1, 1), (1, 7, 4), (4, 7, 1), (17, 64, 3)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
        expected = a.long() @ b.long()
        for a_form in (a, a.t().contiguous().t(), a.as_strided(a.shape, (1, 1)) if 1 in a.shape else a):
            for b_form in (b, b.t().contiguous().t(), b.as_strided(b.shape, (1, 1)) if 1 in b.shape else b):
                assert torch.equal(int_mm(a_form, b_form).long(), expected), (m, k, n, a_form.stride(), b_form.stride())


def test_int_mm_reads_strided_operands_exactly():
    """Every-other-row slices and transposes of them: neither row- nor column-major."""
    from intrain_core.backends.int_mm import int_mm

    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-128, 128, (10, 12), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (12, 6), dtype=torch.int8, generator=gen)
    for a_form in (a[::2], a.t()[::2].t()[:, :6], a[:, ::2]):
        b_form = b[: a_form.shape[1]]
        for b_used in (b_form, b_form[:, ::2], b_form.t().contiguous().t()):
            assert torch.equal(int_mm(a_form, b_used).long(), a_form.long() @ b_used.long())


def _product_to_float(backend, a, b, exponents):
    from intrain_core.backends import native

    ea, eb = (torch.tensor(e) for e in exponents)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTRAIN_GEMM_KERNEL", "float_exact")
        native.gemm_kernel.cache_clear()
        try:
            return backend.matmul_to_float(a, ea, b, eb, 127 * 127, torch.int32)
        finally:
            native.gemm_kernel.cache_clear()


@pytest.mark.parametrize("exponents", [(0, 0), (-10, -12), (-126, 0), (103, 0), (-60, -66),  # scales folded
                                       (-127, 0), (104, -1), (-60, -70), (60, 50)])  # outside: converted after
def test_product_mapped_back_is_the_reference_at_any_exponents(exponents):
    """The float unit's product with the powers of two folded into its operands, and the
    conversion after it where they would leave float32's normal range: both are from_fixed of
    the exact integer product, bit for bit (transposed operands, as attention's K^T)."""
    from intrain_core.backends import native, reference

    gen = torch.Generator().manual_seed(6)
    a = torch.randint(-127, 128, (2, 3, 7, 40), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (2, 3, 5, 40), dtype=torch.int8, generator=gen).transpose(-1, -2)
    assert same_bits(_product_to_float(native, a, b, exponents), _product_to_float(reference, a, b, exponents))


def test_scales_fold_only_where_every_partial_sum_stays_normal():
    """At the bounds' edges: a product whose partial sums would pass float32's largest value
    though its total is 0, and a 2**-127 operand that a CPU flushing subnormals (FTZ/DAZ) reads
    as 0. Both must still give the reference's value."""
    from intrain_core.backends import native, reference

    a = torch.tensor([[127] * 20 + [-127] * 20], dtype=torch.int8)
    b = torch.full((40, 1), 127, dtype=torch.int8)
    assert _product_to_float(native, a, b, (104, 6)).item() == 0.0
    small = torch.ones(1, 40, dtype=torch.int8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the flush mode is per thread
    flushing = torch.set_flush_denormal(True)
    try:
        expected = _product_to_float(reference, small, b, (-127, 0))
        result = _product_to_float(native, small, b, (-127, 0))
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert flushing and expected.item() == 40 * 127 * 2.0**-127
    assert torch.equal(result, expected)


def test_convolution_kernel_is_measured_once_per_size_band(monkeypatch):
    """Images of nearby sizes (a detector's batches) share one measured choice per kind."""
    from intrain_core.backends import native

    monkeypatch.delenv("INTRAIN_CONV_KERNEL", raising=False)
    monkeypatch.setattr(native, "conv_choices", {})
    monkeypatch.setattr(native, "gemm_kernel", lambda device_type: "int_mm")
    measured = []
    monkeypatch.setattr(native, "_best_time", lambda fn, repeats: measured.append(fn) or 0.0)
    w = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8)
    for size in (40, 41, 44):  # 1600-1936 positions: one band
        x = torch.randint(-127, 128, (1, 3, size, size), dtype=torch.int8)
        native.conv2d(x, w, (1, 1), (1, 1), (1, 1), 1, 127 * 127, torch.int32)
    assert len(native.conv_choices) == 1 and len(measured) == 2
    x = torch.randint(-127, 128, (1, 3, 90, 90), dtype=torch.int8)  # four times the positions
    native.conv2d(x, w, (1, 1), (1, 1), (1, 1), 1, 127 * 127, torch.int32)
    assert len(native.conv_choices) == 2


def test_weight_gradient_of_one_image_past_int32_takes_the_float_kernel(monkeypatch):
    """An image with more output positions than int32 sums exactly (a large detection input):
    the int8 GEMM kernel declines, and the float kernel gives the exact int64 sums."""
    from intrain_core.backends import im2col, native, reference

    x = torch.full((1, 1, 370, 370), 127, dtype=torch.int8)
    g = torch.full((1, 1, 370, 370), -127, dtype=torch.int8)
    bound = 127 * 127
    assert 370 * 370 * bound > 2**31
    assert im2col.conv2d_weight(x, (1, 1, 1, 1), g, (1, 1), (0, 0), (1, 1), bound, torch.int64) is None
    monkeypatch.setenv("INTRAIN_CONV_KERNEL", "int_mm")
    dw = native.conv2d_weight(x, (1, 1, 1, 1), g, (1, 1), (0, 0), (1, 1), 1, bound, torch.int64)
    expected = reference.conv2d_weight(x, (1, 1, 1, 1), g, (1, 1), (0, 0), (1, 1), 1, bound, torch.int64)
    assert torch.equal(dw, expected) and int(dw) == -370 * 370 * bound
