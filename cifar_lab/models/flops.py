"""Counting a network's compute: FLOPs of a forward pass, as ``torch.utils.flop_counter`` counts them.

One convention everywhere (the model table, the benchmark, every run's ``metrics.json``):

* ``FlopCounterMode`` counts 2 FLOPs per multiply-add of the convolutions and matrix products
  (elementwise ops, BatchNorm and pooling are not counted; they are a few percent here);
* a training step costs 3 forward passes (the backward pass computes two products per forward
  product: the gradients of the inputs and of the weights).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["TRAIN_STEP_FORWARDS", "forward_flops", "forward_flops_per_image", "count_macs"]

# forward + backward (input and weight gradients) = 3 forward passes of products
TRAIN_STEP_FORWARDS = 3


def forward_flops(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``net`` on the batch ``x``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return int(counter.get_total_flops())


def forward_flops_per_image(net: nn.Module, image_shape: tuple[int, ...],
                            device: torch.device | str = "cpu") -> int:
    """FLOPs of ``net``'s forward pass on one image of ``image_shape`` (C, H, W).

    Counted in eval mode on one zero image, so BatchNorm running statistics and every other
    piece of training state are left exactly as they were.
    """
    modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        return forward_flops(net, torch.zeros((1, *image_shape), device=device))
    finally:
        for module, training in modes.items():
            module.training = training


def count_macs(net: nn.Module, size: int = 32, channels: int = 3) -> int:
    """Multiply-adds of ``net`` for one ``channels`` x ``size`` x ``size`` image."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    return forward_flops_per_image(net, (channels, size, size), device) // 2
