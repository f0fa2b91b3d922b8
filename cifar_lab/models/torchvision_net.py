"""Any torchvision classification model, adapted to CIFAR-sized inputs and ``num_classes``."""

from __future__ import annotations

import os
import warnings
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import get_model, get_model_weights

__all__ = ["TorchvisionNet", "replace_head", "adapt_stem_", "load_pretrained"]


def load_pretrained(arch: str) -> nn.Module:
    """Build ``arch`` with its default pretrained weights; explain how to get them if that fails."""
    weights = get_model_weights(arch).DEFAULT
    try:
        return get_model(arch, weights=weights)
    except Exception as err:
        cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        filename = os.path.basename(urlparse(weights.url).path)
        raise RuntimeError(
            f"Could not fetch the pretrained weights {weights} for torchvision model {arch!r} "
            f"({type(err).__name__}: {err}).\n"
            f"  weights URL: {weights.url}\n"
            f"  cache dir:   {cache_dir}  (torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it)\n"
            f"To use them offline, on a machine with internet access run\n"
            f"  python -c \"import torchvision; torchvision.models.get_model('{arch}', weights='DEFAULT')\"\n"
            f"(or download the URL above), then copy {filename} into {cache_dir} on this machine. "
            f"Otherwise train from scratch with model.pretrained=false."
        ) from err


def replace_head(model: nn.Module, num_classes: int, original_classes: int = 1000) -> nn.Module:
    """Replace the last ``Linear``/``Conv2d`` producing ``original_classes`` outputs with a fresh
    layer producing ``num_classes`` (same input size, kernel and bias setting)."""
    target = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == original_classes) or (
            isinstance(m, nn.Conv2d) and m.out_channels == original_classes
        ):
            target = (name, m)
    if target is None:
        raise ValueError(f"no classifier layer with {original_classes} outputs found in {type(model).__name__}")
    name, old = target
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(
            old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=old.bias is not None
        )
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def adapt_stem_(model: nn.Module) -> str:
    """Make an ImageNet stem keep more resolution on 32x32 inputs. Returns what was done.

    - ResNet-style models (``conv1`` + ``maxpool`` attributes): ``conv1`` becomes a
      fresh 3x3 stride-1 conv (a pretrained stem conv is lost) and the max pool is
      removed; if ``conv1`` is not a plain conv (ShuffleNet), its first stride-2 conv
      gets stride 1 instead.
    - Other models: the first stride-2 convolution gets stride 1 (weights kept).
    - Models without a stride-2 conv (patchify stems of ViT/Swin/ConvNeXt, VGG):
      no change, with a warning; use ``upsample`` for those.
    """
    done = []
    conv1, maxpool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if isinstance(maxpool, nn.MaxPool2d):
        if isinstance(conv1, nn.Conv2d):
            model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=conv1.bias is not None)
            done.append("conv1 -> 3x3 stride 1")
        model.maxpool = nn.Identity()
        done.append("maxpool removed")
    if not any(d.startswith("conv1") for d in done):
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2):
                m.stride = (1, 1)
                done.append(f"{name} stride 2 -> 1")
                break
    if not done:
        warnings.warn(f"adapt_stem: no stride-2 stem found in {type(model).__name__}; left unchanged", stacklevel=2)
        return "unchanged"
    return ", ".join(done)


class TorchvisionNet(nn.Module):
    """``torchvision.models.get_model(arch)`` with a ``num_classes`` head.

    Args:
        arch: any name from ``torchvision.models.list_models(torchvision.models)``.
        pretrained: load the arch's default ImageNet weights (downloaded into the
            torch hub cache; fails with instructions when offline).
        adapt_stem: see :func:`adapt_stem_`.
        upsample: if set, inputs are resized (bilinear) to ``upsample x upsample``
            inside ``forward`` (e.g. 224 for ViTs or to match pretrained statistics).

    Auxiliary classifiers (GoogLeNet, Inception v3) are removed so ``forward``
    always returns a logits tensor.
    """

    def __init__(
        self,
        num_classes: int = 10,
        arch: str = "resnet18",
        pretrained: bool = False,
        adapt_stem: bool = True,
        upsample: int | None = None,
    ) -> None:
        super().__init__()
        model = load_pretrained(arch) if pretrained else get_model(arch, weights=None)
        if getattr(model, "aux_logits", False):
            model.aux_logits = False
            for aux in ("AuxLogits", "aux1", "aux2"):
                if hasattr(model, aux):
                    setattr(model, aux, None)
        replace_head(model, num_classes)
        self.stem_change = adapt_stem_(model) if adapt_stem else "unchanged"
        self.net = model
        self.arch = arch
        self.upsample = int(upsample) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        if self.upsample is not None and tuple(x.shape[-2:]) != (self.upsample, self.upsample):
            x = F.interpolate(x, size=(self.upsample, self.upsample), mode="bilinear", align_corners=False)
        return self.net(x)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, stem={self.stem_change!r}, upsample={self.upsample}"
