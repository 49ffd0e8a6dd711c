"""IntSGD against torch.optim.SGD fed the same gradients (docs/numerics-contract.md section 8)."""
import dataclasses
import platform

import pytest
import torch

from intrain_core import Numerics, NonFiniteError, from_fixed, native_sgd
from intrain_core.fixed_point import fixed_constant, map_deferred
from intrain_core.flat_layout import ROW
from intrain_core.ops.weights import master_of
from intrain_core.optim import ALONE_NUMEL, STREAM_SEED_OFFSET, IntSGD, build_optimizer, coefficient_bits
from intrain_core.rounding import RoundingStream
from intrain_core.sgd_update import update_definition

STEPS = 100
SHAPES = [(7, 5), (5,), (3, 4, 2)]


def gradients(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * 0.1 for s in SHAPES] for _ in range(STEPS)]


def params(dtype):
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def master_values(p):
    m = master_of(p)
    if m is None:  # never updated: the parameter itself
        return p.detach().double()
    return m.mantissa.double() * 2.0**m.exponent


def run_pair(options, master_bits=32, groups=False, scheduler=None, steps=STEPS, absent=lambda step, i: False):
    """Run IntSGD and a float64 torch SGD on the same gradients; return the largest error of
    each parameter and its derived bound. ``absent(step, i)``: parameter i has no gradient."""
    numerics = dataclasses.replace(Numerics.preset("int8"), master_bits=master_bits)
    ours, ref = params(torch.float32), params(torch.float64)

    def param_groups(ps):
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": options["lr"] / 4}] if groups else ps

    opt = IntSGD(param_groups(ours), numerics=numerics, **options)
    ref_opt = torch.optim.SGD(param_groups(ref), **options)
    scheds = [scheduler(o) for o in (opt, ref_opt)] if scheduler else []
    mu = options.get("momentum", 0.0)
    # Worst case per step, in units u(x) = max|x| * 2**-(bits - 2) of the master (its largest
    # magnitude lands in [2**(bits-2), 2**(bits-1))): the weight's alignment and
    # re-normalisation, one unit each; the momentum's re-normalisation and the narrowings before
    # the dampening and learning-rate products (at most four), one unit each of a quantity of
    # size at most max(|g| + wd|w|) / (1 - mu), entering the weight times the learning rate.
    # The coefficients carry a relative error of 2**-cbits each; lr, momentum and weight decay
    # (or 1 - dampening) enter the update once each. The errors add up at worst linearly.
    unit = 2.0 ** -(master_bits - 2)
    coefficient_error = 3 * 2.0 ** -coefficient_bits(master_bits)
    bounds = [0.0] * len(SHAPES)
    for step, step_grads in enumerate(gradients()[:steps]):
        for i, (p, q, g) in enumerate(zip(ours, ref, step_grads)):
            p.grad, q.grad = (None, None) if absent(step, i) else (g.clone(), g.double())
        opt.step()
        ref_opt.step()
        for s in scheds:
            s.step()
        for i, (q, g) in enumerate(zip(ref, step_grads)):
            if absent(step, i):
                continue
            lr = max(group["lr"] for group in ref_opt.param_groups)
            d_size = (g.abs().max().item() + options.get("weight_decay", 0.0) * q.abs().max().item()) / (1 - mu)
            bounds[i] += unit * (2 * q.abs().max().item() + 4 * lr * d_size) + coefficient_error * lr * d_size
    errors = [(master_values(p) - q.detach()).abs().max().item() for p, q in zip(ours, ref)]
    return errors, bounds, ours, opt


CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "dampening": dict(lr=0.1, momentum=0.8, dampening=0.3),
    "weight_decay": dict(lr=0.1, momentum=0.9, weight_decay=5e-2),
    "maximize": dict(lr=0.1, momentum=0.5, maximize=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tracks_float_sgd_within_derived_bound(name):
    errors, bounds, ours, _ = run_pair(CASES[name])
    for error, bound in zip(errors, bounds):
        assert error <= bound, (errors, bounds)
    # param.data is the float32 nearest to the master
    for p in ours:
        assert torch.equal(p.data, from_fixed(master_of(p).mantissa, master_of(p).exponent))


def test_param_groups_and_scheduler():
    errors, bounds, _, opt = run_pair(
        dict(lr=0.2, momentum=0.9, weight_decay=1e-2), groups=True,
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=2 * STEPS),
    )
    assert all(e <= b for e, b in zip(errors, bounds)), (errors, bounds)
    assert opt.param_groups[1]["lr"] < opt.param_groups[0]["lr"] < 0.2


def test_parameters_without_gradients_are_skipped_and_join_later():
    """torch semantics: no update without a gradient; a late parameter starts its own momentum."""
    initial = [p.detach().clone() for p in params(torch.float32)]
    _, _, held, _ = run_pair(CASES["momentum"], steps=5, absent=lambda step, i: i == 1)
    assert torch.equal(held[1].detach(), initial[1]) and not torch.equal(held[0].detach(), initial[0])
    errors, bounds, _, _ = run_pair(CASES["momentum"], absent=lambda step, i: i == 1 and step < STEPS // 2)
    assert all(e <= b for e, b in zip(errors, bounds)), (errors, bounds)


def test_sixteen_bit_masters_are_measurably_worse():
    errors32, _, _, _ = run_pair(CASES["momentum"])
    errors16, bounds16, _, _ = run_pair(CASES["momentum"], master_bits=16)
    assert all(e16 <= b for e16, b in zip(errors16, bounds16))
    assert max(errors16) > 100 * max(errors32)


def test_state_dict_round_trip_continues_bit_identically():
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    grads = gradients(3)

    def run(ps, opt, steps):
        for step_grads in steps:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()

    straight = params(torch.float32)
    opt = IntSGD(straight, **options)
    run(straight, opt, grads[:20])

    first = params(torch.float32)
    opt1 = IntSGD(first, **options)
    run(first, opt1, grads[:10])
    saved_params = [p.detach().clone() for p in first]
    saved_state = opt1.state_dict()

    resumed = params(torch.float32)
    with torch.no_grad():
        for p, saved in zip(resumed, saved_params):
            p.copy_(saved)
    opt2 = IntSGD(resumed, **options)
    opt2.load_state_dict(saved_state)
    assert all(master_of(p) is not None for p in resumed)  # layers use the masters again
    run(resumed, opt2, grads[10:20])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("master_bits, stored", [(32, torch.int32), (40, torch.int64)])
def test_state_is_stored_narrow_and_int64_state_continues_identically(master_bits, stored):
    """32-bit masters and momenta are kept in int32; a state saved as int64 (as this optimiser
    stored it before) continues bit for bit like the int32 one."""
    numerics = dataclasses.replace(Numerics.preset("int8"), master_bits=master_bits)
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, numerics=numerics)
    grads = gradients(4)
    runs = []
    for widen in (False, True):
        ps = params(torch.float32)
        opt = IntSGD(ps, **options)
        for step, step_grads in enumerate(grads[:12]):
            if step == 6:
                assert all(opt.state[p][k].dtype == stored for p in ps for k in ("master", "momentum"))
                if widen:
                    for p in ps:
                        for k in ("master", "momentum"):
                            opt.state[p][k] = opt.state[p][k].to(torch.int64)
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_outside_change_reinitialises_the_master():
    p = torch.nn.Parameter(torch.ones(4))
    opt = IntSGD([p], lr=0.5)
    p.grad = torch.ones(4)
    opt.step()
    with torch.no_grad():
        p.fill_(3.0)  # e.g. model.load_state_dict
    assert master_of(p) is None  # the stale master is not used by layers
    p.grad = torch.ones(4)
    opt.step()
    assert torch.equal(p.data, torch.full((4,), 2.5))


def test_non_finite_gradient_is_named():
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = IntSGD([p], lr=0.1)
    p.grad = torch.tensor([[1.0, float("nan"), 0.0]] * 2)
    with pytest.raises(NonFiniteError, match=r"parameter 0 \(shape \(2, 3\)\)"):
        opt.step()


def test_build_optimizer_follows_the_preset():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert type(build_optimizer(p, Numerics.preset("fp32"), lr=0.1)) is torch.optim.SGD
    assert type(build_optimizer(p, Numerics.preset("int8_fwd"), lr=0.1)) is torch.optim.SGD
    assert type(build_optimizer(p, Numerics.preset("int8_floatsgd"), lr=0.1)) is torch.optim.SGD
    assert isinstance(build_optimizer(p, Numerics.preset("int8"), lr=0.1, momentum=0.9), IntSGD)


# Shapes around the flat layout's rows (shorter than one, exactly one, one element, several rows
# with a partial last one), and one large enough to be updated alone.
FLAT_SHAPES = [(3 * ROW - 5,), (7, 5), (ROW,), (1,), (33, 40), (2 * ROW, 3), (ALONE_NUMEL // 64 + 1, 64)]


# The ways IntSGD computes a step on a CPU: the C++ call, deciding grids from bounds where it
# can (``native``) or measuring every largest magnitude (``exhaustive``); the torch kernels.
PATHS = ["native", "exhaustive", "torch"]


@pytest.fixture
def path(request, monkeypatch):
    """Run a test's IntSGD steps the way ``request.param`` names."""
    if request.param == "torch":
        monkeypatch.setenv("INTRAIN_NATIVE_SGD", "0")
        yield request.param
        return
    if request.param == "avx2":
        if platform.machine() != "x86_64" or "avx2" not in open("/proc/cpuinfo").read():
            pytest.skip("AVX2 code runs on x86 CPUs with AVX2 only")
        monkeypatch.setattr(native_sgd, "_module", native_sgd.build("haswell"))
    extension = native_sgd.module()
    if extension is None:
        pytest.skip("IntSGD's C++ step could not be built here")
    extension.set_exhaustive(request.param == "exhaustive")
    yield request.param
    extension.set_exhaustive(False)


def definition_steps(options, numerics, steps, shapes=FLAT_SHAPES):
    """Each parameter updated alone by ``update_definition``, drawing the optimiser's keys in
    its order: per group, two per parameter with a gradient."""
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(s, generator=gen) for s in shapes]
    stream = RoundingStream(numerics.seed + STREAM_SEED_OFFSET)
    cbits = coefficient_bits(numerics.master_bits)
    constants = [fixed_constant(v, cbits) for v in (-options["lr"], options.get("momentum", 0.0),
                                                    1.0 - options.get("dampening", 0.0),
                                                    options.get("weight_decay", 0.0))]
    coefficients = tuple((torch.tensor(m), torch.tensor(e)) for m, e in constants)
    states = [{} for _ in values]
    for step_grads in steps:
        for i, g in enumerate(step_grads):
            if g is None:
                continue
            state = states[i]
            if "master" not in state:
                fp, _ = map_deferred(values[i], numerics.master_bits, "nearest", 0)
                state["master"], state["exponent"] = fp.mantissa, fp.exponent
            flags = (constants[3][0] != 0, constants[1][0] != 0, "momentum" not in state,
                     options.get("nesterov", False), options.get("maximize", False), options.get("dampening", 0) != 0)
            keys = (stream.next_key(), stream.next_key())
            master, exponent, momentum, momentum_exp, value = update_definition(
                g.reshape(-1), state["master"].reshape(-1), state["exponent"],
                state.get("momentum", state["master"]).reshape(-1), state.get("momentum_exp", state["exponent"]),
                coefficients, flags, numerics.master_bits, numerics.rounding, keys)
            if flags[1]:
                state["momentum"], state["momentum_exp"] = momentum, momentum_exp
            state["master"], state["exponent"] = master, exponent
            values[i] = value.view(values[i].shape)
    return values, states


OPTIONS = {**CASES, "weight_decay_only": dict(lr=0.1, weight_decay=1e-3),
           "nesterov_weight_decay": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
           "zero_lr": dict(lr=0.0, momentum=0.9)}


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("master_bits", [32, 16, 40])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_update_is_the_definition_bit_for_bit(name, master_bits, path):
    """Every way of computing a step gives the integers of the definition applied to each
    parameter (the C++ call serves masters up to 32 bits; 40-bit ones take the torch kernels,
    which update small parameters together in flat buffers and a large one alone): the
    gradient's scale spans seven binades, one gradient is all zero, one parameter joins late."""
    assert_definition_bit_for_bit(OPTIONS[name], master_bits, FLAT_SHAPES)


# Parameters that the C++ call splits over threads (from 2**18 elements on), in pieces of 2**15
# with a partial last one, next to one it updates whole.
LARGE_SHAPES = [(2**18 + 2**15 + 7,), (600, 512), (3, 5)]


@pytest.mark.parametrize("path", ["native", "exhaustive"], indirect=True)
@pytest.mark.parametrize("name", ["momentum", "weight_decay", "nesterov_weight_decay", "weight_decay_only"])
def test_large_parameters_are_the_definition_bit_for_bit(name, path):
    assert_definition_bit_for_bit(OPTIONS[name], 32, LARGE_SHAPES, steps=3)


@pytest.mark.parametrize("path", ["avx2"], indirect=True)
@pytest.mark.parametrize("name", ["dampening", "nesterov_weight_decay", "weight_decay"])
def test_avx2_code_is_the_definition_bit_for_bit(name, path):
    """The C++ step compiled for AVX2, as on a CPU without AVX-512 (no 64-bit vector multiply):
    the same bits, checked on any x86 CPU with AVX2."""
    assert_definition_bit_for_bit(OPTIONS[name], 32, FLAT_SHAPES + LARGE_SHAPES[:1], steps=3)


def test_nearest_rounding_is_the_definition_bit_for_bit():
    assert_definition_bit_for_bit(OPTIONS["weight_decay"], 32, FLAT_SHAPES, rounding="nearest")


def assert_definition_bit_for_bit(options, master_bits, shapes, steps=5, rounding="stochastic"):
    numerics = dataclasses.replace(Numerics.preset("int8"), master_bits=master_bits, rounding=rounding)
    gen = torch.Generator().manual_seed(5)
    schedule = []
    for step in range(steps):
        scales = 10.0 ** torch.randint(-6, 2, (len(shapes),), generator=gen)
        grads = [torch.randn(s, generator=gen) * float(k) for s, k in zip(shapes, scales)]
        grads[-1] = torch.zeros(grads[-1].shape) if step == 2 else grads[-1]
        grads[1] = None if step < 2 else grads[1]
        schedule.append(grads)
    expected, states = definition_steps(options, numerics, schedule, shapes)

    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = IntSGD(params, numerics=numerics, **options)
    for grads in schedule:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    for p, value, state in zip(params, expected, states):
        assert torch.equal(p.detach(), value)
        assert torch.equal(opt.state[p]["master"].reshape(-1), state["master"].reshape(-1))
        assert int(opt.state[p]["master_exponent"]) == int(state["exponent"])
        if "momentum" in state:
            assert torch.equal(opt.state[p]["momentum"].reshape(-1), state["momentum"].reshape(-1))


def test_bounds_spare_the_passes_of_a_typical_step():
    """On a trained-like step (momentum, weight decay, a gradient of the momentum's size), the
    C++ call decides every grid from bounds and the float64 estimate: after the pass for the
    largest magnitudes, one pass stores the momentum and the master together."""
    extension = native_sgd.module()
    if extension is None:
        pytest.skip("IntSGD's C++ step could not be built here")
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in [(256, 256), (4096,)]]
    opt = IntSGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        extension.pass_counts()
        opt.step()
    counts = extension.pass_counts()
    total = sum(p.numel() for p in params)
    assert counts["store_both"] == total, counts
    assert sum(counts.values()) == total, counts


def test_nesterov_steps_take_the_fused_pass_with_the_definitions_bits():
    """With Nesterov momentum the step's sum d + mu m is decided from the momentum's bounds and
    a second float64 estimate: after the first step (which has no estimate: the momentum
    starts), one pass stores the momentum and the master, and the integers are the
    definition's."""
    extension = native_sgd.module()
    if extension is None:
        pytest.skip("IntSGD's C++ step could not be built here")
    options = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    shapes = [(256, 256), (4096,)]
    numerics = Numerics.preset("int8")
    gen = torch.Generator().manual_seed(9)
    schedule = [[torch.randn(s, generator=gen) * 1e-3 for s in shapes] for _ in range(6)]
    expected, states = definition_steps(options, numerics, schedule, shapes)
    gen = torch.Generator().manual_seed(1)  # the definition's starting values
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = IntSGD(params, numerics=numerics, **options)
    for step, grads in enumerate(schedule):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        extension.pass_counts()
        opt.step()
        counts = extension.pass_counts()
        if step > 0:  # (d's own pass may run: the weight decay term is of the gradient's size here)
            total = sum(p.numel() for p in params)
            assert counts["store_both"] == total, (step, counts)
            assert counts["store_momentum"] == counts["nesterov_sum"] == counts["store_master"] == 0, (step, counts)
    for p, value, state in zip(params, expected, states):
        assert torch.equal(p.detach(), value)
        assert torch.equal(opt.state[p]["master"].reshape(-1), state["master"].reshape(-1))
        assert torch.equal(opt.state[p]["momentum"].reshape(-1), state["momentum"].reshape(-1))


def test_non_finite_gradient_leaves_everything_as_it_was():
    gen = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (4,)]]
    opt = IntSGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    counter = opt.stream.counter
    params[1].grad[2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"parameter 1 \(shape \(4,\)\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())
    assert opt.stream.counter == counter


def test_without_a_compiler_the_torch_kernels_take_over(monkeypatch, tmp_path):
    """Where the C++ step cannot be built (no g++, say), IntSGD warns once and computes the
    same bits with its torch kernels."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: command not found")

    def run():
        gen = torch.Generator().manual_seed(9)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 4), (3,)]]
        opt = IntSGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return ps

    expected = run()
    monkeypatch.setattr(native_sgd, "_module", None)
    monkeypatch.setattr(native_sgd, "_failed", False)
    monkeypatch.setenv("INTRAIN_EXTENSION_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built.*c\\+\\+: command not found"):
        got = run()
    assert native_sgd.module() is None
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_the_cpp_build_is_kept_apart_per_instruction_set(monkeypatch):
    """Code built with -march=native on an AVX-512 machine must not be loaded on an AVX2-only one
    of the same name (virtual machines of this kind differ so): the build directory follows
    the CPU's flags, not only its name."""
    from intrain_core import extension

    if platform.system() == "Linux":
        assert "flags" in extension.cpu_model()
    monkeypatch.setattr(extension, "cpu_model", lambda: "model name: Xeon|flags: sse avx2")
    avx2 = extension.build_directory("int_sgd")
    monkeypatch.setattr(extension, "cpu_model", lambda: "model name: Xeon|flags: sse avx2 avx512f")
    assert extension.build_directory("int_sgd") != avx2
