"""torchvision SqueezeNet 1.1 with a replaced classifier conv (report 2's "MobileNet")."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import squeezenet1_1

__all__ = ["SqueezeNet"]


class SqueezeNet(nn.Module):
    """``squeezenet1_1(weights=None)`` whose final 1x1 classifier conv is replaced by a
    fresh ``Conv2d(512, num_classes, 1)`` (PyTorch default init), with classifier dropout ``dropout``.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.net = squeezenet1_1(weights=None)
        self.net.classifier[0] = nn.Dropout(p=dropout)
        self.net.classifier[1] = nn.Conv2d(self.net.classifier[1].in_channels, num_classes, kernel_size=1)
        self.net.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
