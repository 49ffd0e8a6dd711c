"""What a converted model keeps for its backward (docs/numerics-contract.md section 7 and the
memory goal: no activation-size float32 between the forward and the backward)."""
from collections import Counter

import torch
import torch.nn.functional as F
import torchvision

from intrain_core import Numerics, convert
from intrain_core.ops.activation import MaskedReLU


def saved_bytes_by_dtype(model, x) -> Counter:
    saved = Counter()

    def pack(t):
        saved[t.dtype] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return saved


def small_resnet():
    """ResNet-18's first two stages with the CIFAR stem (max pooling keeps PyTorch's own saved
    input and indices)."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    model.layer3, model.layer4 = torch.nn.Identity(), torch.nn.Identity()
    model.fc = torch.nn.Linear(128, 10)
    return model


def test_a_converted_resnet_saves_no_float_activation():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    saved = saved_bytes_by_dtype(convert(small_resnet(), Numerics.preset("int8")), x)
    assert saved[torch.float32] == 0, dict(saved)
    assert saved[torch.int8] > 0
    # The float model saves float32 activations; the integer one saves a quarter of that or
    # less (int8 mantissas and one-byte ReLU masks, at most as many elements).
    reference = saved_bytes_by_dtype(small_resnet(), x)
    assert sum(saved.values()) <= reference[torch.float32] / 2, (dict(saved), dict(reference))


def test_masked_relu_gives_torch_gradients_bit_for_bit():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-40, 3.0, float("nan"), float("inf"), -float("inf")], requires_grad=True)
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, float("inf"), 6.0, 7.0, float("nan")])
    ours = MaskedReLU.apply(x)
    ours.backward(grad)
    ours_grad, x.grad = x.grad.clone(), None
    theirs = F.relu(x)
    theirs.backward(grad)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert torch.equal(ours_grad.nan_to_num(123.0), x.grad.nan_to_num(123.0))
