"""MobileNetV2 adapted to 32x32 inputs, built from torchvision's implementation."""

from __future__ import annotations

from torchvision.models.mobilenetv2 import MobileNetV2 as _TVMobileNetV2

__all__ = ["MobileNetV2", "CIFAR_SETTING", "IMAGENET_SETTING"]

# (expand ratio t, channels c, repeats n, first stride s)
IMAGENET_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
# The first stride-2 stage (24 channels) runs at stride 1.
CIFAR_SETTING = [[t, c, n, 1 if c == 24 else s] for t, c, n, s in IMAGENET_SETTING]


class MobileNetV2(_TVMobileNetV2):
    """torchvision MobileNetV2 with ``width_mult`` and a 32x32-friendly layout.

    ``cifar=True`` (default): the stem conv runs at stride 1 and the 24-channel
    stage at stride 1, so the total stride is 8 (32x32 -> 4x4 before the head).
    ``cifar=False`` is the ImageNet network (total stride 32).
    """

    def __init__(
        self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2, cifar: bool = True
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            width_mult=width_mult,
            inverted_residual_setting=CIFAR_SETTING if cifar else IMAGENET_SETTING,
            dropout=dropout,
        )
        if cifar:
            self.features[0][0].stride = (1, 1)
