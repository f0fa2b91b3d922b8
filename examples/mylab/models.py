"""A network of your own: a plain ``nn.Module`` whose constructor takes ``num_classes``."""

from __future__ import annotations

from torch import Tensor, nn


class TinyNet(nn.Module):
    """Two conv stages and a linear head: (N, 3, H, W) float images -> (N, num_classes) logits."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
