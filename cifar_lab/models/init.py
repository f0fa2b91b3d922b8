"""Weight initialisation schemes selectable from model configs (``init: ...``).

- ``default``: keep PyTorch's per-layer defaults.
- ``xavier``: ``xavier_normal_`` on Conv2d and Linear weights, zero biases.
- ``kaiming``: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` on Conv2d
  weights, ``kaiming_normal_(mode="fan_in", nonlinearity="relu")`` on Linear
  weights, zero biases.

For all non-default schemes BatchNorm weights are set to 1 and biases to 0.
A :class:`~cifar_lab.models.blocks.StackedConv2d` holding K branch convolutions
is initialised branch by branch, so fan-out is that of one branch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import StackedConv2d

__all__ = ["INIT_SCHEMES", "init_weights"]

INIT_SCHEMES = ("default", "xavier", "kaiming")


def _init_weight(w: Tensor, scheme: str, is_conv: bool) -> None:
    if scheme == "xavier":
        nn.init.xavier_normal_(w)
    elif is_conv:
        nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    else:
        nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")


@torch.no_grad()
def init_weights(module: nn.Module, scheme: str = "default") -> nn.Module:
    """Initialise every Conv2d / Linear / BatchNorm inside ``module`` with ``scheme``."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    if scheme == "default":
        return module
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            chunks = m.weight.chunk(m.branches, dim=0) if isinstance(m, StackedConv2d) else (m.weight,)
            for w in chunks:
                _init_weight(w, scheme, is_conv=True)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            _init_weight(m.weight, scheme, is_conv=False)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module
