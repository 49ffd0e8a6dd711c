"""Integer normalisation against float64 (docs/numerics-contract.md section 4), with derived bounds."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from intrain_core import Numerics, NonFiniteError
from intrain_core.context import IntegerContext
from intrain_core.ops import norm
from intrain_core.ops.norm import FRACTION_BITS, isqrt, reciprocal_sqrt
from test_kernels import same_bits


def make_ctx(bits=8, backend="native"):
    return IntegerContext(dataclasses.replace(Numerics.preset("int8"), forward_bits=bits, backward_bits=bits, backend=backend))


def step(t, bits):
    """Mapping step: the max lands in [2**(b-2), 2**(b-1)), so step <= max|t| * 2**-(b-2)."""
    return float(t.abs().max()) * 2.0 ** -(bits - 2)


def crest(t):
    return float(t.abs().max() / t.pow(2).mean().sqrt())


def test_integer_square_root_and_reciprocal():
    v = torch.tensor([2**60, 2**62 - 1, 3 * 2**59 + 12345, 2**61 + 1])
    assert isqrt(v).tolist() == [math.isqrt(int(a)) for a in v]
    values = torch.tensor([1, 4, 100, 12345678901, 2**62 - 1])
    inv, exponent = reciprocal_sqrt(values)
    approx = inv.double() * torch.pow(2.0, exponent.double())
    exact = 1 / values.double().sqrt()
    # 31-bit reciprocal of a 31-bit root: relative error below 2 * 2**-30
    assert ((approx - exact).abs() <= exact * 2.0**-29).all()


CASES = {
    "batch_train": (lambda c, x, w, b, rm, rv: norm.batch_norm(c, x, rm, rv, w, b, True, 0.1, 1e-5),
                    lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5), (0, 2, 3)),
    "group": (lambda c, x, w, b, rm, rv: norm.group_norm(c, x, 3, w, b),
              lambda x, w, b, rm, rv: F.group_norm(x, 3, w, b), None),
    "layer": (lambda c, x, w, b, rm, rv: norm.layer_norm(c, x, (6, 5, 5), w.repeat_interleave(25).view(6, 5, 5), b.repeat_interleave(25).view(6, 5, 5)),
              lambda x, w, b, rm, rv: F.layer_norm(x, (6, 5, 5), w.repeat_interleave(25).view(6, 5, 5), b.repeat_interleave(25).view(6, 5, 5)), (1, 2, 3)),
}


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, 5, 5, generator=gen) * 3 + 1
    w = torch.rand(6, generator=gen) + 0.5
    b = torch.randn(6, generator=gen)
    return x, w, b


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_within_derived_bound(name, bits):
    # With every input element within one step s of x, to first order
    #   |d xhat| <= (|dx| + |mean dx| + |xhat| |mean(dx xhat)|) / std <= (2 + |xhat|) s / std,
    # plus (2 + 2|xhat|) (s / std)**2 for the change of the standard deviation. The affine
    # adds |xhat| s_gamma and one step of beta on the output grid; xhat itself is rounded to
    # 2**-FRACTION_BITS.
    int_op, float_op, dims = CASES[name]
    x, w, b = inputs()
    rm, rv = torch.zeros(6), torch.ones(6)
    y = int_op(make_ctx(bits), x, w, b, rm.clone(), rv.clone()).double()
    xd = x.double()
    if name == "group":
        grouped = xd.view(8, 3, -1)
        mean, var = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
        xhat = ((grouped - mean) / (var + 1e-5).sqrt()).view_as(xd)
        std = (var + 1e-5).sqrt().expand_as(grouped).reshape_as(xd)
    else:
        mean, var = xd.mean(dims, keepdim=True), xd.var(dims, unbiased=False, keepdim=True)
        xhat, std = (xd - mean) / (var + 1e-5).sqrt(), (var + 1e-5).sqrt().expand_as(xd)
    gamma = w.double().view(1, -1, 1, 1)
    ref = xhat * gamma + b.double().view(1, -1, 1, 1)
    r = step(x, bits) / std
    bound = (
        gamma * ((2 + xhat.abs()) * r + (2 + 2 * xhat.abs()) * r**2 + 2.0**-FRACTION_BITS)
        + xhat.abs() * step(w, bits) + step(w, bits) * 2.0**-FRACTION_BITS
        + ref.abs() * 2.0**-23
    )
    assert ((y - ref).abs() <= bound).all()


def test_batch_norm_eval_uses_running_statistics():
    # Evaluation: xhat = (x - running_mean) / sqrt(running_var + eps), so only the input's
    # mapping (one step) moves it: |d y| <= |gamma| s / std + |xhat| s_gamma + rounding.
    x, w, b = inputs(1)
    rm, rv = torch.randn(6) * 0.3, torch.rand(6) + 0.5
    y = norm.batch_norm(make_ctx(), x, rm, rv, w, b, False).double()
    ref = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False)
    std = (rv.double() + 1e-5).sqrt().view(1, -1, 1, 1)
    xhat = (x.double() - rm.double().view(1, -1, 1, 1)) / std
    gamma = w.double().view(1, -1, 1, 1)
    bound = gamma * (step(x, 8) / std + 2.0**-FRACTION_BITS * 2) + xhat.abs() * step(w, 8) + 2.0**-14 + ref.abs() * 2.0**-23
    assert ((y - ref).abs() <= bound).all()


def test_running_statistics_follow_pytorch():
    # The batch mean and variance of mapped inputs differ from float by at most one step s
    # (mean) and 2 max|x| s + s**2 (second moment); the update scales that by momentum.
    x, w, b = inputs(2)
    rm1, rv1 = torch.zeros(6), torch.ones(6)
    rm2, rv2 = rm1.clone().double(), rv1.clone().double()
    norm.batch_norm(make_ctx(), x, rm1, rv1, w, b, True, 0.1)
    F.batch_norm(x.double(), rm2, rv2, w.double(), b.double(), True, 0.1)
    s = step(x, 8)
    assert ((rm1.double() - rm2).abs() <= 0.1 * s + 1e-6).all()
    n = x.numel() // 6
    assert ((rv1.double() - rv2).abs() <= 0.1 * (2 * float(x.abs().max()) * s + s * s) * n / (n - 1) + 1e-6).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_close_to_float_and_int16_closer(name):
    # Each mapped operand (grad, input, gamma) has a norm-wise relative error of at most
    # crest * 2**-(b-2) (elementwise error < max * 2**-(b-2) = rms * crest * 2**-(b-2)); the
    # backward is linear in grad and gamma, and depends on the input through xhat and the
    # standard deviation (first-order factor at most 2), so the gradients' relative error is
    # bounded by 2**-(b-2) (crest(g) + 2 crest(x) + crest(gamma)), to first order.
    int_op, float_op, _ = CASES[name]
    x, w, b = inputs(3)
    grad = torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(9))
    leaves_f = [t.double().requires_grad_() for t in (x, w, b)]
    float_op(*leaves_f, None, None).backward(grad.double()) if name != "batch_train" else \
        float_op(*leaves_f, torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)).backward(grad.double())
    errors = {}
    for bits in (8, 16):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        int_op(make_ctx(bits), *leaves, torch.zeros(6), torch.ones(6)).backward(grad)
        bound = 2.0 ** -(bits - 2) * (crest(grad) + 2 * crest(x) + crest(w))
        rel = [float((a.grad.double() - f.grad).norm() / f.grad.norm()) for a, f in zip(leaves, leaves_f)]
        assert max(rel) <= bound, (bits, rel, bound)
        errors[bits] = max(rel)
    assert errors[16] < errors[8] / 50


def test_native_and_reference_backends_agree():
    x, w, b = inputs(4)
    outs = []
    for backend in ("native", "reference"):
        leaf = x.clone().requires_grad_()
        y = norm.layer_norm(make_ctx(backend=backend), leaf, (5,), None, None)
        y.backward(torch.ones_like(y))
        outs.append((y, leaf.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("fill", [0.0, 2.5])
def test_zero_and_constant_inputs_stay_finite(fill):
    x = torch.full((4, 3, 2, 2), fill, requires_grad=True)
    y = norm.batch_norm(make_ctx(), x, torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), True)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y.abs().max() <= 2.0**-FRACTION_BITS * 4  # variance 0: everything maps to (about) beta


def test_nan_input_names_the_layer():
    x = torch.randn(2, 3, 4)
    x[0, 0, 0] = float("nan")
    ctx = make_ctx()
    norm.layer_norm(ctx, x, (4,), layer="encoder.norm1")  # the check is deferred to once per step
    with pytest.raises(NonFiniteError, match="encoder.norm1"):
        ctx.check_finite()


def test_channel_of_equal_values_is_scaled_by_eps_as_in_float():
    # Batch norm over 4 values of magnitude ~4 (an image-pool branch at batch 4): eps n**2 in
    # the variance's units (2**(2s), s = -4) is 0.04, which a plain rounding loses. Channel 1's
    # values are equal and exact on the 8-bit grid, so var = 0 exactly and rstd = 1/sqrt(eps)
    # in both arithmetics. Its dx = rstd (dy - mean dy): the 8-bit mapping of dy moves each
    # element by less than one step, max|dy| 2**-(b-2), so (dy - mean dy) by less than two;
    # eps (24 bits) and the reciprocal (31 bits) add a relative 2**-22 at most.
    x = torch.tensor([[-4.0, 1.5], [4.0, 1.5], [2.0, 1.5], [-2.0, 1.5]]).view(4, 2, 1, 1)
    dy = torch.tensor([[0.5, 1.0], [-0.25, -0.5], [0.125, 0.75], [-1.0, 0.25]]).view(4, 2, 1, 1)
    leaf_f, leaf_i = x.double().requires_grad_(), x.clone().requires_grad_()
    F.batch_norm(leaf_f, None, None, None, None, True, 0.1, 1e-5).backward(dy.double())
    norm.batch_norm(make_ctx(), leaf_i, None, None, None, None, True, 0.1, 1e-5).backward(dy)
    rstd = 1e-5 ** -0.5
    bound = rstd * 2 * step(dy, 8) * (1 + 2.0**-22)
    error = (leaf_i.grad.double() - leaf_f.grad)[:, 1].abs().max()
    assert error <= bound, (float(error), bound)


def test_evaluation_with_zero_running_variance_divides_by_sqrt_eps():
    # The input is on the 8-bit grid (step 2**-4 for max 4), so only the statistics differ:
    # eps with 24 bits and the 31-bit reciprocal give a relative 2**-22 on rstd, and xhat keeps
    # FRACTION_BITS fractional bits (half a unit of rounding).
    x = torch.tensor([[-4.0, 1.5625], [4.0, 1.5625], [2.0, 1.5625], [-2.0, 1.5625]]).view(4, 2, 1, 1)
    mean, var = torch.tensor([0.5, 1.5]), torch.tensor([9.0, 0.0])
    expected = F.batch_norm(x.double(), mean.double(), var.double(), None, None, False, 0.1, 1e-5)
    y = norm.batch_norm(make_ctx(), x, mean, var, None, None, False, 0.1, 1e-5)
    bound = expected.abs() * 2.0**-22 + 2.0 ** -(FRACTION_BITS + 1)
    assert ((y.double() - expected).abs() <= bound).all(), (y - expected).abs().max()


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_table_lookup_gives_the_per_element_bits(monkeypatch, affine):
    """The int8 training batch norm's output by table (per channel and mantissa level, then
    gathered) against the per-element arithmetic it replaces: outputs, gradients and running
    statistics bit for bit, with a channel of equal values and one of large values among them."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, 6, 9, 9, generator=gen) * 3 + 1
    x[:, 0] = 2.5
    x[:, 1] *= 1e3
    dy = torch.randn(x.shape, generator=gen)
    dy[:, 2] *= 1e-3
    w, b = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    by_table = norm.by_table
    taken = []

    def run(table):
        monkeypatch.setattr(norm, "by_table", lambda *args: taken.append(table) or (table and by_table(*args)))
        leaf = x.clone().requires_grad_()
        wl, bl = (w.clone().requires_grad_(), b.clone().requires_grad_()) if affine else (None, None)
        rm, rv = torch.zeros(6), torch.ones(6)
        y = norm.batch_norm(make_ctx(), leaf, rm, rv, wl, bl, True, 0.1, 1e-5)
        y.add_(0.0)  # an in-place op on the output, as a ReLU(inplace=True) does
        y.backward(dy)
        return [y, leaf.grad, rm, rv] + ([wl.grad, bl.grad] if affine else [])

    per_element, table = run(False), run(True)
    assert by_table(torch.zeros(1, 1, 1, dtype=torch.int8), True) and taken == [False, True]
    assert same_bits(per_element, table)
