"""ReLU that keeps a one-byte mask for its backward instead of its float32 output.

ReLU needs no arithmetic (docs/numerics-contract.md section 7), but PyTorch's saves its float
output for the backward, and in a converted model that output is the only activation-size
float kept alive between the forward and the backward (the integer ops save int8 mantissas).
``F.relu(x, inplace=True)`` returns a new tensor: a model that uses the return value, as
torchvision's and timm's do, sees no difference. ``x.relu_()`` stays PyTorch's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compiled import fused
from ..registry import FALLBACK, implements, is_float32


# The mask is int8 (1 where the gradient stops), not bool: inductor's CPU code (torch 2.14)
# stores and loads bool tensors element by element. On a 64x64x32x32 tensor the compiled ReLU
# with a bool mask took 38 ms, with an int8 mask 1.2 ms; the masked gradient 12 ms against
# 1.0 ms (2-core Xeon, 2026-11-30).
@fused
def _relu_and_mask(x):
    y = torch.relu(x)
    # PyTorch's rule: a NaN output passes its gradient on.
    return y, (y <= 0).to(torch.float32).to(torch.int8)


@fused
def _masked(grad, blocked):
    return torch.where(blocked.to(torch.float32) > 0.5, 0, grad)  # not grad * mask: Inf * 0 would be NaN


class MaskedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, blocked = _relu_and_mask(x)
        ctx.save_for_backward(blocked)
        return y

    @staticmethod
    def backward(ctx, grad):
        (blocked,) = ctx.saved_tensors
        return _masked(grad, blocked)


@implements(F.relu, torch.relu, torch.Tensor.relu)
def relu(context, x, inplace=False):
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad and is_float32(x)):
        return FALLBACK
    context.record("relu", "forward", "exact")
    return MaskedReLU.apply(x)
