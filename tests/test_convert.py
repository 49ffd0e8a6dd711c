"""convert + coverage on zoo models, built through the zoos' own doors (no pretrained weights)."""
import timm
import pytest
import torch
import torch.nn.functional as F
import torchvision

import intrain_core
from intrain_core import Numerics, NonFiniteError, check_finite, context_of, convert, coverage, revert
from intrain_core.optim import IntSGD

# (builder, input shape): small spatial sizes keep CPU time low; ViTs keep their 224 geometry.
MODELS = {
    "resnet18": (lambda: torchvision.models.get_model("resnet18", weights=None, num_classes=10), (2, 3, 64, 64)),
    "resnet50": (lambda: torchvision.models.get_model("resnet50", weights=None, num_classes=10), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=10), (2, 3, 64, 64)),
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10), (2, 3, 224, 224)),
    "deit_small_patch16_224": (lambda: timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=10), (2, 3, 224, 224)),
}

# Ops that the integer core leaves in float by design (docs/numerics-contract.md section 7): non-linear
# functions and the loss. Anything else in float is a coverage gap and fails the test.
EXPECTED_FLOAT = {"softmax", "gelu", "silu", "sigmoid", "tanh", "cross_entropy", "log_softmax", "mul", "sum", "hardswish"}


def make(name, seed=0):
    torch.manual_seed(seed)
    build, shape = MODELS[name]
    return build(), torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def labels(batch):
    return torch.arange(batch) % 10


def test_coverage_share_and_float_ops_named(model_name):
    model, x = make(model_name)
    convert(model, "int8")
    report = coverage(model, x, loss_fn=lambda out: F.cross_entropy(out, labels(len(x))))
    assert report.integer_mac_share >= 0.99, report.table()
    assert set(report.float_op_names()) <= EXPECTED_FLOAT, report.table()
    phases = {e.phase for e in report.entries if e.arithmetic == "integer"}
    assert {"forward", "backward"} <= phases
    table = report.table()
    assert "integer MAC share" in table and "float ops" in table


def test_converted_model_loss_goes_down(model_name):
    model, x = make(model_name, seed=1)
    convert(model, "int8")
    y = labels(len(x))
    # MobileNetV2 on a batch of 2 diverges at lr 0.1 in float32 too (loss 33 by step 5): 0.02.
    lr = 0.05 if "patch" in model_name else 0.02 if model_name == "mobilenet_v2" else 0.1
    opt = IntSGD(model.parameters(), lr=lr, momentum=0.9, numerics=Numerics.preset("int8"))
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-2:]) < losses[0], losses


def pytest_generate_tests(metafunc):
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", sorted(MODELS))


def test_float_preset_leaves_model_untouched():
    model, x = make("resnet18")
    before = model(x)
    assert convert(model, "fp32") is model and context_of(model) is None
    assert torch.equal(model(x), before)
    report = coverage(model, x)
    assert report.integer_mac_share == 0.0 and "conv2d (forward) @ conv1" in report.float_ops()


def test_revert_restores_float_and_convert_twice_is_refused():
    model, x = make("resnet18")
    model.eval()
    reference = model(x)
    convert(model, "int8")
    assert not torch.equal(model(x), reference)
    try:
        convert(model, "int8")
        raise AssertionError("converting twice must fail")
    except ValueError as err:
        assert "already converted" in str(err)
    revert(model)
    assert torch.equal(model(x), reference)


def test_non_finite_activation_names_the_layer():
    model, x = make("resnet18")
    convert(model, "int8")
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    model(x)  # the check is deferred: a device flag, read once per step
    try:
        check_finite(model)
        raise AssertionError("a NaN weight must not be mapped silently")
    except NonFiniteError as err:
        assert "layer2.0.conv1" in str(err)
    assert context_of(model).counters["nonfinite"] == 1


@pytest.mark.parametrize("on_host", [True, False])
def test_the_first_non_finite_place_is_named_read_at_once_or_on_the_device(monkeypatch, on_host):
    """Host flags are read as they come; an accelerator's stay on the device, reduced every
    FOLD_EVERY and at the check (played here with CPU tensors): both name the first bad place
    noted since the last check, and a check starts over."""
    from intrain_core.context import NonFiniteWatch

    monkeypatch.setattr(NonFiniteWatch, "reads_at_once", staticmethod(lambda device: on_host))
    watch = NonFiniteWatch()
    flags = [True] * 70 + [False] + [True] * 5 + [False]  # the first bad one after a reduction
    for i, finite in enumerate(flags):
        watch.note(torch.tensor(finite), f"place {i}")
    try:
        watch.check()
        raise AssertionError("a non-finite flag must raise")
    except NonFiniteError as err:
        assert "place 70" in str(err)
    watch.note(torch.tensor(True), "after")
    watch.check()  # started over: nothing bad since


def test_float_families_are_reported_when_left_out():
    model, x = make("resnet18")
    numerics = Numerics.from_dict({**Numerics.preset("int8").to_dict(), "integer_ops": ["linear", "conv"]})
    convert(model, numerics)
    report = coverage(model, x)
    assert "batch_norm" in report.float_op_names() and "add" in report.float_op_names()
    assert report.integer_mac_share > 0.9


def test_attention_without_sdpa_is_integer():
    # timm's non-fused attention path: q @ k.transpose(-2, -1), softmax, attn @ v.
    model, x = make("vit_tiny_patch16_224")
    for block in model.blocks:
        block.attn.fused_attn = False
    convert(model, "int8")
    ops = {(e.op, e.arithmetic) for e in coverage(model, x).entries}
    assert ("matmul", "integer") in ops and ("softmax", "float") in ops


def test_public_api_names():
    for name in ("to_fixed", "from_fixed", "Numerics", "convert", "coverage", "IntSGD", "CoverageReport"):
        assert hasattr(intrain_core, name), name


class _BoxesBesideFeatures(torch.nn.Module):
    """A detector in miniature: a residual layer, and box arithmetic the root does on constants."""

    def __init__(self):
        super().__init__()
        self.block = _Residual()

    def forward(self, x):
        centres = torch.arange(8, dtype=torch.float32) * 97.0  # an anchor grid up to 679 px
        anchors = centres[:, None] + torch.tensor([-16.5, 16.5])
        return self.block(x), anchors


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) + x


@pytest.mark.parametrize("detector_filter", [True, False])
def test_the_detection_filter_keeps_root_bookkeeping_on_constants_in_float(detector_filter):
    from tasks.detection import network_adds_only

    model = convert(_BoxesBesideFeatures(), "int8", op_filter=network_adds_only if detector_filter else None)
    features, anchors = model(torch.randn(3, 4, requires_grad=True))
    exact = (torch.arange(8) * 97.0)[:, None] + torch.tensor([-16.5, 16.5])
    adds = {(key.layer, key.arithmetic) for key in context_of(model).ops if key.op == "add"}
    assert ("block", "integer") in adds
    if detector_filter:
        assert torch.equal(anchors, exact) and ("<model>", "float") in adds
    else:
        # In int8 with one shared scale, 679 px rounds to multiples of 8 px; float keeps .5 px.
        assert not torch.equal(anchors, exact) and ("<model>", "integer") in adds


def test_op_filter_sees_the_op_and_its_layers():
    seen = []

    def no_linear(op, layers, args):
        seen.append((op, layers))
        return op != "linear"

    model = convert(_Residual(), "int8", op_filter=no_linear)
    model(torch.randn(3, 4))
    assert ("linear", ("<model>", "linear")) in seen and ("add", ("<model>",)) in seen
    arithmetic = {key.op: key.arithmetic for key in context_of(model).ops}
    assert arithmetic["linear"] == "float" and arithmetic["add"] == "integer"


def test_non_finite_bias_names_the_layer():
    model, x = make("resnet18")
    convert(model, "int8")
    with torch.no_grad():
        model.fc.bias[3] = float("inf")
    model(x)
    with pytest.raises(NonFiniteError, match="linear bias of layer 'fc'"):
        check_finite(model)
