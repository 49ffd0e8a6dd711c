"""Integer SGD (docs/numerics-contract.md section 8): PyTorch's SGD update in fixed point.

Master weights and momentum buffers are wide integer mantissas (``numerics.master_bits``) with
one exponent per tensor. The coefficients become fixed-point constants each step; each parameter
is updated by one fused kernel: the gradient on a 62-bit grid, integer products in int64, sums
aligned on a 62-bit grid, and each stored result (momentum, master) re-normalised to
``master_bits`` with one rounding of the run's kind: two random draws per element and step.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .compiled import fused
from .fixed_point import (FixedPoint, NonFiniteError, add_fixed, fixed_constant, from_fixed,
                          map_deferred, map_kernel, nonfinite_message, requantize_kernel)
from .numerics import Numerics
from .ops.weights import attach_master, contexts_of
from .rounding import RoundingStream


def coefficient_bits(master_bits: int) -> int:
    """Significant bits of the coefficients (lr, momentum, 1 - dampening, weight decay).

    A master mantissa (< 2**(master_bits-1)) times a coefficient (< 2**bits) stays below
    2**61, and the sum of two aligned such terms below 2**62: int64 holds every product.
    """
    return min(30, 61 - master_bits)


# The optimiser's random stream is offset from the model's, which starts at the same seed.
STREAM_SEED_OFFSET = 0x5DEECE66D

# The gradient enters on a 62-bit grid: exact for every element within 37 binades of its
# largest (float32 has 24 significant bits); smaller ones round to nearest, as in an alignment.
WIDE_BITS = 62


def _narrow(m, e, bits: int, rounding: str, key):
    """``m 2**e`` re-normalised to ``bits`` (section 1's exponent)."""
    narrowed, exponent, _ = requantize_kernel.eager(m, e, bits, rounding, key)
    return narrowed.to(torch.int64), exponent


def state_dtype(master_bits: int) -> torch.dtype:
    """Masters and momenta are stored in int32 when their mantissas fit (the default 32 bits):
    half the bytes of int64 for the optimiser state and for the update's memory traffic."""
    return torch.int32 if master_bits <= 32 else torch.int64


@fused
def _update(grad, w, w_exp, buf, buf_exp, coefficients, flags, bits: int, rounding: str, keys):
    """One parameter's step, flattened: returns (master, exponent, momentum, exponent, value).

    Intermediates stay on the 62-bit grid (alignments round to nearest); a term narrows to
    ``bits``, to nearest, only where it is multiplied by a coefficient. The two stored results,
    momentum and master, are each rounded once, with the run's rounding.

    ``coefficients``: fixed-point (mantissa, exponent) of -lr, momentum, 1 - dampening and
    weight decay; ``flags``: (weight decay, momentum, first step, nesterov, maximize, dampening)."""
    lr, mu, keep, wd = coefficients
    has_wd, has_momentum, first, nesterov, maximize, damped = flags
    stored = state_dtype(bits)
    w, buf = w.to(torch.int64), buf.to(torch.int64)
    g = grad.to(torch.float32)
    if maximize:
        g = -g
    d, d_exp, _, _ = map_kernel.eager(g, WIDE_BITS, "nearest", keys[0])
    d = d.to(torch.int64)
    if has_wd:
        d, d_exp = add_fixed(d, d_exp, w * wd[0], w_exp + wd[1])
    if has_momentum:
        if first:  # torch: the buffer starts as the gradient itself, undamped
            buf, buf_exp = _narrow(d, d_exp, bits, rounding, keys[0])
        else:
            term, term_exp = d, d_exp
            if damped:
                term, term_exp = _narrow(d, d_exp, bits, "nearest", keys[0])
                term, term_exp = term * keep[0], term_exp + keep[1]
            total, grid = add_fixed(buf * mu[0], buf_exp + mu[1], term, term_exp)
            buf, buf_exp = _narrow(total, grid, bits, rounding, keys[0])
        if nesterov:
            d, d_exp = add_fixed(d, d_exp, buf * mu[0], buf_exp + mu[1])
        else:
            d, d_exp = buf, buf_exp
    step, step_exp = _narrow(d, d_exp, bits, "nearest", keys[1])
    total, grid = add_fixed(w, w_exp, step * lr[0], step_exp + lr[1])
    w, w_exp = _narrow(total, grid, bits, rounding, keys[1])
    return w.to(stored), w_exp, buf.to(stored), buf_exp, from_fixed(w, w_exp)


_update.min_numel = 0  # every parameter: the compiled kernel beats a dozen small eager ops


class IntSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` semantics (momentum, dampening, nesterov, weight decay, maximize)
    computed in integer arithmetic on fixed-point masters."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 numerics: Numerics | Mapping | str | None = None, maximize=False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0 (got {lr}, {momentum}, {weight_decay})")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires a momentum and zero dampening")
        if isinstance(numerics, str):
            numerics = Numerics.preset(numerics)
        elif isinstance(numerics, Mapping):  # from a config file (mmengine's optimiser registry)
            numerics = Numerics.from_dict(dict(numerics))
        numerics = numerics or Numerics.preset("int8")
        self.numerics = numerics
        self.stream = RoundingStream(numerics.seed + STREAM_SEED_OFFSET)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def _master(self, p: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed-point master; read again from ``p`` if ``p`` changed since the last step
        (its version counter moved: an in-place write such as ``load_state_dict``)."""
        if "master" in state and state.get("version") == p._version:
            return state["master"], state["master_exponent"]
        # float32 has 24 significant bits, so a >= 24-bit master holds p exactly.
        fp, _ = map_deferred(p.detach(), self.numerics.master_bits, "nearest", 0)
        return fp.mantissa.to(state_dtype(self.numerics.master_bits)), fp.exponent

    def _check_finite(self, params: list[torch.Tensor]) -> None:
        """One read of the device per step: the mappings of the model's forward and backward,
        and every gradient. Nothing is updated when one of them held NaN or Inf."""
        for context in contexts_of(params):
            context.check_finite()
        grads = [p.grad for p in params]
        found = torch.zeros(1, device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=found.device))
        if bool(found):
            index, p = next((i, p) for i, p in enumerate(params) if not bool(torch.isfinite(p.grad).all()))
            raise NonFiniteError(nonfinite_message(f"IntSGD gradient of parameter {index} (shape {tuple(p.shape)})"))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        bits, rounding = self.numerics.master_bits, self.numerics.rounding
        cbits = coefficient_bits(bits)
        with_grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if with_grads:
            self._check_finite(with_grads)
        for group in self.param_groups:
            constants = [fixed_constant(value, cbits) for value in
                         (-group["lr"], group["momentum"], 1.0 - group["dampening"], group["weight_decay"])]
            # Tensors: the learning rate changes every step, and a compiled kernel must not
            # be specialised for it.
            coefficients = tuple((torch.tensor(m), torch.tensor(e)) for m, e in constants)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                w, w_exp = self._master(p, state)
                first = "momentum" not in state
                buf = state.get("momentum", w)
                buf_exp = state.get("momentum_exponent", w_exp)
                flags = (constants[3][0] != 0, constants[1][0] != 0, first, group["nesterov"], group["maximize"],
                         group["dampening"] != 0)
                keys = (self.stream.next_key(), self.stream.next_key())
                w, w_exp, buf, buf_exp, value = _update(p.grad.reshape(-1), w.reshape(-1), w_exp, buf.reshape(-1),
                                                        buf_exp, coefficients, flags, bits, rounding, keys)
                if flags[1]:
                    state["momentum"], state["momentum_exponent"] = buf.view(p.shape), buf_exp
                state["master"], state["master_exponent"] = w.view(p.shape), w_exp
                p.copy_(value.view(p.shape))
                state["version"] = p._version
                attach_master(p, FixedPoint(state["master"], w_exp, bits))
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["stream"] = self.stream.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        stream = state_dict.pop("stream", None)
        super().load_state_dict(state_dict)
        # torch casts every state tensor to the parameter's float dtype: put the integer
        # mantissas back exactly.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        current = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, current))
        for param_id, saved in state_dict["state"].items():
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and not value.is_floating_point():
                    p = by_id[param_id]
                    self.state[p][key] = value.to(p.device, copy=True)
        if stream is not None:
            self.stream.load_state_dict(stream)
        # Layers map weights from the masters again, as they did before the save, where the
        # parameters hold the masters' values.
        for p in current:
            state = self.state.get(p, {})
            if "master" in state and torch.equal(from_fixed(state["master"], state["master_exponent"]), p.detach()):
                state["version"] = p._version
                attach_master(p, FixedPoint(state["master"], state["master_exponent"], self.numerics.master_bits))


def build_optimizer(params, numerics: Numerics, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD for float numerics and presets that ask for it (int8_fwd, int8_floatsgd), IntSGD otherwise."""
    if not numerics.integer or numerics.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                               weight_decay=weight_decay, nesterov=nesterov)
    return IntSGD(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                  nesterov=nesterov, numerics=numerics)
