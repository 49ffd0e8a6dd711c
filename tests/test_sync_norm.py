"""Integer SyncBatchNorm on gloo ranks against the 1-process integer BatchNorm of the whole batch."""
from __future__ import annotations

import pytest
import torch

import intrain_core as ic
from ranks import run_ranks

PER_RANK, CHANNELS = 4, 3


def _batch(world_size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(world_size * PER_RANK, CHANNELS, 5, 5, generator=g) * 3 + 1
    upstream = torch.randn(x.shape, generator=g)
    return x, upstream


def _step(model, x, upstream):
    """One training forward and backward: the output and every gradient."""
    x = x.clone().requires_grad_()
    y = model(x)
    (y * upstream).sum().backward()
    ic.check_finite(model)
    norm = model[0]
    return {"y": y.detach(), "dx": x.grad, "dweight": norm.weight.grad.clone(), "dbias": norm.bias.grad.clone(),
            "running": (norm.running_mean.clone(), norm.running_var.clone())}


def _model(norm_class, preset):
    torch.manual_seed(1)
    norm = norm_class(CHANNELS)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return ic.convert(torch.nn.Sequential(norm), preset)


def _rank_step(rank, world_size, preset):
    x, upstream = _batch(world_size)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    model = _model(torch.nn.SyncBatchNorm, preset)
    result = _step(model, x[rows], upstream[rows])
    report = ic.coverage(model, x[rows], loss_fn=lambda out: (out * upstream[rows]).sum())
    result["coverage"] = {(key.phase, key.op, key.arithmetic) for key in ic.context_of(model).ops}
    result["share"] = report.integer_mac_share
    return result


def _single(world_size, preset):
    x, upstream = _batch(world_size)
    return _step(_model(torch.nn.BatchNorm2d, preset), x, upstream)


def _affine_gradients_agree(ranks, single):
    """The affine gradients are local integer sums that add exactly; only each one's conversion
    to float32 rounds (2**-24 relative, on each rank's and on the one process's)."""
    for name in ("dweight", "dbias"):
        parts = torch.stack([r[name].double() for r in ranks])
        bound = 2.0**-23 * (parts.abs().sum(0) + single[name].double().abs())
        assert bool(((parts.sum(0) - single[name].double()).abs() <= bound).all()), name


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_norm_with_nearest_rounding_is_the_whole_batch_norm_bit_for_bit(world_size):
    ranks = run_ranks(_rank_step, world_size, "int8_nearest")
    single = _single(world_size, "int8_nearest")
    assert torch.equal(torch.cat([r["y"] for r in ranks]), single["y"])
    assert torch.equal(torch.cat([r["dx"] for r in ranks]), single["dx"])
    for r in ranks:
        assert all(torch.equal(a, b) for a, b in zip(r["running"], single["running"]))
    _affine_gradients_agree(ranks, single)
    for r in ranks:  # the coverage report shows it, forward and backward, in integers
        assert {("forward", "sync_batch_norm", "integer"), ("backward", "sync_batch_norm", "integer")} <= r["coverage"]
        assert not any(op == "sync_batch_norm" and arithmetic != "integer" for _, op, arithmetic in r["coverage"])
        assert r["share"] == 1.0


def test_sync_norm_with_stochastic_rounding_is_within_the_mapping_bounds_forward_and_backward():
    ranks = run_ranks(_rank_step, 2, "int8")
    single = _single(2, "int8")
    x, _ = _batch(2)
    y = torch.cat([r["y"] for r in ranks]).double()
    # The two runs map x with different random bits; each mantissa is within one step
    # u = 2**(floor(log2 max|x|) - 6) of x, so two mantissas of one element differ by at most
    # u, two means by at most u, centred values c by at most 2u, and the standard deviations
    # (L2 norms of c over sqrt(n), Minkowski) by at most 2u. Then, with sigma >= sigma_x - 2u,
    # |xhat_a - xhat_b| <= 2u (1 + |xhat|) / sigma, plus xhat's own fixed point (2**-16
    # half-up, twice) and the reciprocal square root's 31 bits; gamma's mantissa is the same
    # in both (same key). The output is gamma xhat + beta, each rounded once to float32.
    u = 2.0 ** (torch.frexp(x.abs().max()).exponent.item() - 1 - 6)
    mean = x.double().mean((0, 2, 3), keepdim=True)
    sigma = (x.double().var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    low = sigma - 2 * u
    xhat = (x.double() - mean).abs() / sigma
    xhat = xhat + 2 * u * (1 + xhat) / low  # bound on either run's |xhat|
    gamma = _model(torch.nn.BatchNorm2d, "fp32")[0].weight.detach().double().view(1, -1, 1, 1).abs() * (1 + 2.0**-6)
    bound = gamma * (2 * u * (1 + xhat) / low + 2.0**-15 + 2.0**-29 * xhat) + 2.0**-23 * (y.abs() + single["y"].abs())
    assert bool(((y - single["y"].double()).abs() <= bound).all())
    # Backward: dx = gamma / sigma (g - mean g - xhat mean(g xhat)) over the channel's n values.
    # The mapped gradients of the two runs are each within one step v of the upstream G (one
    # shared exponent in both), so they differ by at most v per element and v in the mean; xhat
    # differs by delta (above) with |xhat| <= X; 1/sigma by at most 2u / low**2. Then
    # |dh| <= 2v + delta M + X mean(v X + (|G| + v) delta) with M = mean((|G| + v) X), and
    # |h| <= H = (|G| + v) + mean(|G| + v) + X M; the integer backward adds four roundings of
    # 2**-16 v (its FRACTION_BITS) and one float32 rounding of dx in each run.
    upstream = _batch(2)[1].double()
    v = 2.0 ** (torch.frexp(upstream.abs().max()).exponent.item() - 1 - 6)
    delta = 2 * u * (1 + xhat) / low + 2.0**-15 + 2.0**-29 * xhat
    g = upstream.abs() + v
    dims = (0, 2, 3)
    m = (g * xhat).mean(dims, keepdim=True)
    h = g + g.mean(dims, keepdim=True) + xhat * m
    dh = 2 * v + delta * m + xhat * (v * xhat + g * delta).mean(dims, keepdim=True) + 4 * 2.0**-16 * v
    dx = torch.cat([r["dx"] for r in ranks]).double()
    bound = gamma * (dh / low + h * 2 * u / low**2) + 2.0**-22 * (dx.abs() + single["dx"].double().abs())
    assert bool(((dx - single["dx"].double()).abs() <= bound).all())
    assert not torch.equal(y.float(), single["y"])  # different draws: the bound is what is tested
    assert torch.equal(ranks[0]["running"][0], ranks[1]["running"][0])  # ranks agree on the running statistics
