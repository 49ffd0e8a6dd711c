"""Same seed, device and backend: bit-identical integer training (docs/numerics-contract.md section 9)."""
import dataclasses

import torch
import torch.nn.functional as F
import torchvision

from intrain_core import Numerics, context_of, convert
from intrain_core.optim import IntSGD


def train_losses(seed: int, steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem: keeps 16x16 maps
    model.maxpool = torch.nn.Identity()
    numerics = dataclasses.replace(Numerics.preset("int8"), seed=seed)
    convert(model, numerics)
    opt = IntSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, numerics=numerics)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=data)
        y = torch.randint(0, 10, (4,), generator=data)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert context_of(model).counters["nonfinite"] == 0
    return losses


def test_same_seed_is_bit_identical_and_seed_matters():
    first, second = train_losses(seed=3), train_losses(seed=3)
    assert first == second
    assert train_losses(seed=4, steps=3) != first[:3]
