"""Classification models by name from their zoo (torchvision or timm), with a CIFAR stem option."""
from __future__ import annotations

import difflib

import torch.nn as nn
from omegaconf import DictConfig

from tasks.common.errors import ConfigError


def build_model(task: DictConfig | dict, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The task's model from its zoo, with ``num_classes`` outputs and random weights."""
    name, zoo = task["model"], task.get("zoo", "auto")
    kwargs = dict(task.get("model_kwargs") or {})
    if zoo == "auto":
        zoo = "torchvision" if name in _torchvision_models() else "timm"
    if zoo == "torchvision":
        model = _torchvision_model(name, num_classes, in_channels, kwargs, bool(task.get("cifar_stem")))
    elif zoo == "timm":
        model = _timm_model(name, num_classes, in_channels, image_size, task.get("patch_size"), kwargs)
    else:
        raise ConfigError(f"task.zoo={zoo!r} is not one of ['torchvision', 'timm', 'auto']")
    return model


def _torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_model(name, num_classes, in_channels, kwargs, cifar_stem) -> nn.Module:
    import torchvision

    available = _torchvision_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise ConfigError(f"torchvision has no classification model {name!r}"
                          + (f"; did you mean {close}?" if close else "") + " (for a timm model set task.zoo=timm)")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    stem = _first_conv(model)
    if stem is None:
        if cifar_stem or in_channels != 3:
            raise ConfigError(f"task.cifar_stem / {in_channels}-channel input is not supported for torchvision {name!r}")
        return model
    parent, attr, conv = stem
    if cifar_stem or conv.in_channels != in_channels:
        kernel, stride, padding = ((3, 3), (1, 1), (1, 1)) if cifar_stem else (conv.kernel_size, conv.stride, conv.padding)
        if cifar_stem and name.startswith(("mobilenet", "efficientnet", "mnasnet", "regnet")):
            kernel, padding = conv.kernel_size, conv.padding  # 3x3 already: only the stride changes
        setattr(parent, attr, nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None))
    if cifar_stem and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


def _first_conv(model: nn.Module):
    """(parent module, attribute name, conv) of the stem: the first Conv2d in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    return None


def _timm_model(name, num_classes, in_channels, image_size, patch_size, kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ConfigError(f"timm has no model {name!r}" + (f"; did you mean {close}?" if close else ""))
    if patch_size is not None:
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("patch_size", patch_size)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
