"""A small, fast-training convolutional network for CIFAR speedruns.

Layout (defaults in brackets)::

    whiten:  Conv(in -> whiten_width, kernel whiten_kernel [2], no padding, bias)   frozen weight
             activation
    blocks:  for each width w in widths [64, 256, 256]:
                 Conv3x3(c -> w) -> MaxPool(2) -> BN -> act
                 (Conv3x3(w -> w) -> BN -> act) x (convs_per_block - 1)
    head:    global max pool -> Linear(widths[-1] -> num_classes, no bias) -> x logit_scale

Speed-oriented choices:

* The first layer is meant to be a *patch-whitening* filter bank computed from training
  images (:func:`cifar_lab.models.whitening.init_whitening_`, applied at fit start by
  :class:`cifar_lab.callbacks.whitening.WhiteningInit`); its weight is frozen
  (``whiten_trainable=False``), only its bias learns.
* BatchNorm scales are frozen at 1 (``bn_scale_trainable=False``); only the shifts learn.
  The shifts are the parameters that tolerate (and benefit from) a much larger learning
  rate, see :func:`cifar_lab.optim.grouped_sgd.grouped_sgd`.
* Convolutions after the first start as a partial identity (``dirac_init``): the first
  ``min(in, out)`` filters pass their input channel through unchanged, the others keep
  PyTorch's default init. Deep plain stacks then train from the first step.
* A small ``logit_scale`` keeps the initial logits near zero.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SpeedrunNet", "ConvGroup"]

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _batch_norm(width: int, eps: float, momentum: float, scale_trainable: bool) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(width, eps=eps, momentum=momentum)
    bn.weight.requires_grad_(scale_trainable)
    return bn


@torch.no_grad()
def partial_dirac_(conv: nn.Conv2d) -> None:
    """The first ``min(in, out)`` filters of ``conv`` become identity maps of their channel."""
    n = min(conv.in_channels, conv.out_channels)
    nn.init.dirac_(conv.weight[:n])


class ConvGroup(nn.Sequential):
    """``Conv -> MaxPool(2) -> BN -> act``, then ``convs - 1`` times ``Conv -> BN -> act``.

    Pooling right after the first convolution halves the cost of everything that follows.
    """

    def __init__(self, in_channels: int, width: int, convs: int = 2, activation: str = "gelu",
                 bn_eps: float = 1e-12, bn_momentum: float = 0.4, bn_scale_trainable: bool = False,
                 pool: bool = True) -> None:
        if convs < 1:
            raise ValueError(f"convs_per_block must be >= 1, got {convs}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [_batch_norm(width, bn_eps, bn_momentum, bn_scale_trainable), _activation(activation)]
        for _ in range(convs - 1):
            layers += [
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                _batch_norm(width, bn_eps, bn_momentum, bn_scale_trainable),
                _activation(activation),
            ]
        super().__init__(*layers)


class SpeedrunNet(nn.Module):
    """Whitening stem, ``len(widths)`` conv groups with pooling, global max pool, linear head.

    Args:
        num_classes: outputs.
        widths: output channels of each conv group (each group halves the resolution).
        convs_per_block: convolutions per group (the first one is followed by the pooling).
        whiten_kernel: patch size of the first (whitening) convolution.
        whiten_width: its output channels; ``null`` = ``2 * in_channels * whiten_kernel**2``
            (every whitening direction with both signs, as :func:`patch_whitening_weights` makes).
        whiten_trainable: train the first layer's weight (its bias always trains).
        activation: ``gelu``, ``relu`` or ``silu``.
        bn_eps, bn_momentum: BatchNorm settings (torch's momentum convention: the weight of
            the newest batch in the running statistics).
        bn_scale_trainable: learn BatchNorm scales (frozen at 1 when false).
        dirac_init: partial identity init of the 3x3 convolutions.
        logit_scale: constant multiplier of the logits.
        in_channels: input channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (64, 256, 256),
        convs_per_block: int = 2,
        whiten_kernel: int = 2,
        whiten_width: int | None = None,
        whiten_trainable: bool = False,
        activation: str = "gelu",
        bn_eps: float = 1e-12,
        bn_momentum: float = 0.4,
        bn_scale_trainable: bool = False,
        dirac_init: bool = True,
        logit_scale: float = 1.0 / 9.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths:
            raise ValueError("widths must name at least one conv group")
        if whiten_kernel < 1:
            raise ValueError(f"whiten_kernel must be >= 1, got {whiten_kernel}")
        whiten_width = int(whiten_width or 2 * in_channels * whiten_kernel**2)
        self.whiten = nn.Conv2d(in_channels, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(whiten_trainable)
        self.whiten_act = _activation(activation)
        groups = []
        channels = whiten_width
        for width in widths:
            groups.append(ConvGroup(channels, width, convs_per_block, activation, bn_eps, bn_momentum,
                                    bn_scale_trainable))
            channels = width
        self.blocks = nn.Sequential(*groups)
        self.head = nn.Linear(channels, num_classes, bias=False)
        self.logit_scale = float(logit_scale)
        if dirac_init:
            for module in self.blocks.modules():
                if isinstance(module, nn.Conv2d):
                    partial_dirac_(module)

    def features(self, x: Tensor) -> Tensor:
        x = self.blocks(self.whiten_act(self.whiten(x)))
        return x.amax(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)) * self.logit_scale
