"""Integer SGD (docs/numerics-contract.md section 8): PyTorch's SGD update in fixed point.

Master weights and momentum buffers are wide integer mantissas (``numerics.master_bits``) with
one exponent per tensor. The coefficients become fixed-point constants each step. The
arithmetic (sgd_update.py): the gradient on a 62-bit grid, integer products in int64, sums
aligned on a 62-bit grid, and each stored result (momentum, master) re-normalised to
``master_bits`` with one rounding of the run's kind: two random draws per element and step.
On a CPU, one C++ call updates a whole group in place (native_sgd.py); elsewhere, and for
masters wider than 32 bits, compiled torch kernels do: large parameters one by one, the small
ones of a group together in flat buffers. Both give the definition's bits.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from . import native_sgd
from .fixed_point import FixedPoint, NonFiniteError, fixed_constant, from_fixed, map_deferred, nonfinite_message
from .flat_layout import FlatLayout, spread_segment_max
from .numerics import Numerics
from .ops.weights import attach_master, contexts_of
from .rounding import RoundingStream
from .sgd_update import (apply_kernel, coefficient_bits, direction_kernel, run_staged, state_dtype,
                         update_alone_kernel)

__all__ = ["IntSGD", "build_optimizer", "coefficient_bits", "state_dtype"]

# The optimiser's random stream is offset from the model's, which starts at the same seed.
STREAM_SEED_OFFSET = 0x5DEECE66D

# From this size on a parameter is updated alone, by one fused kernel whose passes find it in
# cache; smaller ones are updated together in flat buffers, where one call serves them all.
# On a 2-core Xeon (2026-11-30) the flat kernels streamed ResNet-18's 11M elements at 13 ns
# each, the kernel per parameter at 9 ns plus 0.3 ms a call.
ALONE_NUMEL = 1 << 16


class _FlatState:
    """The masters and momenta of some parameters in flat buffers, and the views of them that
    the optimiser's per-parameter state holds (a state entry that is not that view was changed
    from outside: loaded, or replaced)."""

    def __init__(self, params):
        self.layout = FlatLayout([p.shape for p in params], params[0].device)
        self.grad = self.layout.empty(torch.float32)
        self.master = self.master_exp = self.momentum = self.momentum_exp = None
        self.master_views = self.momentum_views = [None] * len(params)


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
        self._flat: dict[tuple, _FlatState] = {}  # by the ids of the parameters updated together

    def _master(self, p: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed-point master; read again from ``p`` if ``p`` changed since the last step
        (its version counter moved: an in-place write such as ``load_state_dict``)."""
        if "master" in state and state.get("version") == p._version:
            return state["master"], state["master_exponent"]
        # float32 has 24 significant bits, so a >= 24-bit master holds p exactly.
        fp, _ = map_deferred(p.detach(), self.numerics.master_bits, "nearest", 0)
        return fp.mantissa.to(state_dtype(self.numerics.master_bits)), fp.exponent

    def _check_finite(self, params: list[torch.Tensor], gradients: bool = True) -> None:
        """One read of the device per step: the mappings of the model's forward and backward,
        and every gradient (unless the C++ step checks them, before it writes anything).
        Nothing is updated when one of them held NaN or Inf."""
        for context in contexts_of(params):
            context.check_finite()
        if not gradients:
            return
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
        cbits = coefficient_bits(self.numerics.master_bits)
        with_grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        native = None
        if with_grads and native_sgd.serves(with_grads, self.numerics.master_bits):
            native = native_sgd.module()
        if with_grads:
            # With several groups, a later group's bad gradient must stop the earlier ones too.
            self._check_finite(with_grads, gradients=native is None or len(self.param_groups) > 1)
        used = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if not params:
                continue
            constants = [fixed_constant(value, cbits) for value in
                         (-group["lr"], group["momentum"], 1.0 - group["dampening"], group["weight_decay"])]
            # Two keys per parameter, in order: its momentum's, then its master's.
            keys = self.stream.next_keys(2 * len(params), params[0].device).view(-1, 2)
            momentum = constants[1][0] != 0
            starts = [momentum and "momentum" not in self.state[p] for p in params]
            if native is not None:
                self._update_native(native, group, params, keys, constants, starts, with_grads)
                continue
            # Tensors: the learning rate changes every step, and a compiled kernel must not
            # be specialised for it.
            coefficients = tuple((torch.tensor(m), torch.tensor(e)) for m, e in constants)
            flags = [(constants[3][0] != 0, momentum, first, group["nesterov"], group["maximize"],
                      group["dampening"] != 0) for first in starts]
            small = [i for i, p in enumerate(params) if p.numel() < ALONE_NUMEL]
            for i in sorted(set(range(len(params))) - set(small)):
                self._update_alone(params[i], keys[i], coefficients, flags[i])
            for first in sorted({starts[i] for i in small}):  # a momentum that starts runs apart
                chosen = [i for i in small if starts[i] == first]
                chosen_params = [params[i] for i in chosen]
                flat = used[tuple(map(id, chosen_params))] = self._flat_state(chosen_params, momentum and not first)
                self._update_flat(flat, chosen_params, keys[chosen], coefficients, flags[chosen[0]])
        self._flat = used  # buffers of a set of parameters no longer updated together are dropped
        return loss

    def _update_native(self, extension, group, params, keys, constants, starts, with_grads):
        """The whole group in one C++ call that writes masters, momenta and parameters in place."""
        bits = self.numerics.master_bits
        stored = state_dtype(bits)
        momentum = constants[1][0] != 0
        masters, master_exps, momenta, momentum_exps, grads = [], [], [], [], []
        for p, first in zip(params, starts):
            state = self.state[p]
            w, w_exp = self._master(p, state)
            masters.append(w if w.dtype == stored and w.is_contiguous()
                           else w.to(stored).contiguous())  # a state loaded as int64 becomes int32
            master_exps.append(w_exp)
            if momentum:
                buf = torch.zeros(p.shape, dtype=stored) if first else state["momentum"]
                momenta.append(buf if buf.dtype == stored and buf.is_contiguous() else buf.to(stored).contiguous())
                momentum_exps.append(w_exp if first else state["momentum_exponent"])
            grads.append(p.grad if p.grad.dtype == torch.float32 and p.grad.is_contiguous()
                         else p.grad.to(torch.float32).contiguous())
        master_exps = torch.stack(master_exps)
        momentum_exps = torch.stack(momentum_exps) if momentum else master_exps[:0]
        flags = [constants[3][0] != 0, momentum, group["nesterov"], group["maximize"], group["dampening"] != 0,
                 self.numerics.rounding == "stochastic"]
        bad = extension.int_sgd_step(grads, masters, momenta, params, master_exps, momentum_exps, keys.contiguous(),
                                     starts, [int(v) for c in constants for v in c], flags, bits)
        if bad >= 0:
            self.stream.counter -= keys.numel()  # nothing was updated: the next step draws these keys
            p = params[bad]
            index = next(i for i, q in enumerate(with_grads) if q is p)
            raise NonFiniteError(nonfinite_message(f"IntSGD gradient of parameter {index} (shape {tuple(p.shape)})"))
        torch.autograd.graph.increment_version(params)
        master_exps = master_exps.unbind()
        momentum_exps = momentum_exps.unbind() if momentum else ()
        for i, p in enumerate(params):
            state = self.state[p]
            state["master"], state["master_exponent"] = masters[i], master_exps[i]
            if momentum:
                state["momentum"], state["momentum_exponent"] = momenta[i], momentum_exps[i]
            state["version"] = p._version
            attach_master(p, FixedPoint(state["master"], master_exps[i], bits))

    def _update_alone(self, p, keys, coefficients, flags):
        state = self.state[p]
        w, w_exp = self._master(p, state)
        buf, buf_exp = state.get("momentum", w), state.get("momentum_exponent", w_exp)
        w, w_exp, buf, buf_exp, value = update_alone_kernel(
            p.grad.reshape(-1), w.reshape(-1), w_exp, buf.reshape(-1), buf_exp, keys, coefficients, flags,
            self.numerics.master_bits, self.numerics.rounding)
        if flags[1]:
            state["momentum"], state["momentum_exponent"] = buf.view(p.shape), buf_exp
        state["master"], state["master_exponent"] = w.view(p.shape), w_exp
        p.copy_(value.view(p.shape))
        state["version"] = p._version
        attach_master(p, FixedPoint(state["master"], w_exp, self.numerics.master_bits))

    def _update_flat(self, flat: _FlatState, params, keys, coefficients, flags):
        bits, rounding = self.numerics.master_bits, self.numerics.rounding
        layout = flat.layout
        grad = layout.gather([p.grad for p in params], torch.float32, out=flat.grad)
        where = (layout.row_segment, layout.first_row, layout.row_offset)
        momentum, momentum_exp, step, step_exp, step_max = run_staged(
            direction_kernel, where, grad, flat.master, flat.master_exp, flat.momentum, flat.momentum_exp,
            keys[:, 0], coefficients, flags, bits, rounding)
        step_max = spread_segment_max(step_max, layout.row_segment, layout.first_row)
        master, master_exp, values = run_staged(apply_kernel, where, flat.master, flat.master_exp,
                                                momentum if step is None else step, step_exp, step_max,
                                                keys[:, 1], coefficients[0], bits, rounding)
        torch._foreach_copy_(params, layout.views(values))
        flat.master, flat.master_exp, flat.master_views = master, master_exp, layout.views(master)
        exponents = master_exp.unbind()
        if momentum is not None:
            flat.momentum, flat.momentum_exp, flat.momentum_views = momentum, momentum_exp, layout.views(momentum)
            momentum_exponents = momentum_exp.unbind()
        for i, p in enumerate(params):
            state = self.state[p]
            if momentum is not None:
                state["momentum"], state["momentum_exponent"] = flat.momentum_views[i], momentum_exponents[i]
            state["master"], state["master_exponent"] = flat.master_views[i], exponents[i]
            state["version"] = p._version
            attach_master(p, FixedPoint(state["master"], exponents[i], bits))

    def _flat_state(self, params, continues_momentum: bool) -> _FlatState:
        """The flat buffers of ``params``, refilled from the per-parameter state where it was
        changed from outside (a new parameter, a loaded state dict, a parameter written to)."""
        flat = self._flat.get(tuple(map(id, params)))
        if flat is None:
            flat = self._flat[tuple(map(id, params))] = _FlatState(params)
        states = [self.state[p] for p in params]
        dtype = state_dtype(self.numerics.master_bits)
        if any(s.get("master") is not v or s.get("version") != p._version
               for s, v, p in zip(states, flat.master_views, params)):
            masters = [self._master(p, s) for p, s in zip(params, states)]
            flat.master = flat.layout.gather([m for m, _ in masters], dtype)
            flat.master_exp = torch.stack([e for _, e in masters])
            flat.master_views = [None] * len(params)
        if continues_momentum and any(s["momentum"] is not v for s, v in zip(states, flat.momentum_views)):
            flat.momentum = flat.layout.gather([s["momentum"] for s in states], dtype)
            flat.momentum_exp = torch.stack([s["momentum_exponent"] for s in states])
            flat.momentum_views = [None] * len(params)
        return flat

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
