"""Integer SGD (NUMERICS.md section 8): PyTorch's SGD update in fixed-point arithmetic.

Master weights and momentum buffers are wide integer mantissas (``numerics.master_bits``) with
one exponent per tensor. The coefficients become fixed-point constants each step, products are
integer multiplies in int64, operands are aligned by right shifts with stochastic rounding,
and every result is re-normalised to ``master_bits``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .fixed_point import FixedPoint, WideFixed, fixed_constant, from_fixed, to_fixed
from .numerics import Numerics
from .ops.weights import attach_master


def coefficient_bits(master_bits: int) -> int:
    """Significant bits of the coefficients (lr, momentum, 1 - dampening, weight decay).

    A master mantissa (< 2**(master_bits-1)) times a coefficient (< 2**bits) stays below
    2**61, and the sum of two aligned such terms below 2**62: int64 holds every product.
    """
    return min(30, 62 - master_bits)

# The optimiser's random stream is offset from the model's, which starts at the same seed.
GENERATOR_SEED_OFFSET = 0x5DEECE66D


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
        self._generators: dict[str, torch.Generator] = {}
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.numerics.seed + GENERATOR_SEED_OFFSET)
        return self._generators[key]

    def _master(self, p: torch.Tensor, state: dict) -> WideFixed:
        """The fixed-point master, re-read from ``p`` if something else changed ``p``."""
        if "master" in state:
            master = WideFixed(state["master"], state["master_exponent"])
            if torch.equal(from_fixed(master.m, master.e), p.detach()):
                return master
        # float32 has 24 significant bits, so a >= 24-bit master holds p exactly.
        fp = to_fixed(p.detach(), self.numerics.master_bits, "nearest", where="IntSGD master weight")
        return WideFixed(fp.mantissa.to(torch.int64), fp.exponent)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        bits, rounding = self.numerics.master_bits, self.numerics.rounding
        cbits = coefficient_bits(bits)
        for group_index, group in enumerate(self.param_groups):
            lr = fixed_constant(-group["lr"], cbits)
            mu = fixed_constant(group["momentum"], cbits)
            keep = fixed_constant(1.0 - group["dampening"], cbits)
            wd = fixed_constant(group["weight_decay"], cbits)
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                gen = self._generator(p.device)
                where = f"IntSGD gradient of parameter {index} (shape {tuple(p.shape)}) in group {group_index}"
                grad = -p.grad if group["maximize"] else p.grad
                g = to_fixed(grad, bits, rounding, gen, where)
                d = WideFixed(g.mantissa.to(torch.int64), g.exponent)
                state = self.state[p]
                w = self._master(p, state)
                if wd[0]:
                    d = d.plus(w.times(wd), rounding, gen).normalised(bits, rounding, gen)
                if mu[0]:
                    if "momentum" not in state:
                        buf = WideFixed(d.m.clone(), d.e)
                    else:
                        buf = WideFixed(state["momentum"], state["momentum_exponent"]).times(mu)
                        buf = buf.plus(d.times(keep), rounding, gen).normalised(bits, rounding, gen)
                    state["momentum"], state["momentum_exponent"] = buf.m, buf.e
                    d = d.plus(buf.times(mu), rounding, gen).normalised(bits, rounding, gen) if group["nesterov"] else buf
                w = w.plus(d.times(lr), rounding, gen).normalised(bits, rounding, gen)
                state["master"], state["master_exponent"] = w.m, w.e
                p.data.copy_(from_fixed(w.m, w.e))
                attach_master(p, FixedPoint(w.m, w.e, bits))
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["generators"] = {k: g.get_state() for k, g in self._generators.items()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators", {})
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
        for key, rng_state in generators.items():
            self._generator(torch.device(key)).set_state(rng_state)
        # Layers map weights from the masters again, as they did before the save.
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if "master" in state:
                    master = WideFixed(state["master"], state["master_exponent"])
                    if torch.equal(from_fixed(master.m, master.e), p.detach()):
                        attach_master(p, FixedPoint(master.m, master.e, self.numerics.master_bits))


def build_optimizer(params, numerics: Numerics, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD for float numerics and presets that ask for it (int8_fwd, int8_floatsgd), IntSGD otherwise."""
    if not numerics.integer or numerics.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                               weight_decay=weight_decay, nesterov=nesterov)
    return IntSGD(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                  nesterov=nesterov, numerics=numerics)
