"""ResNet with squeeze-and-excitation (report 4, 4,993,166 parameters at the defaults)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .blocks import SqueezeExcite

__all__ = ["BasicBlock", "ResNetSE"]


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN [-> SE] -> + shortcut -> ReLU.

    The shortcut is the identity, or conv1x1(stride) + BN when the shape changes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, se_reduction: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, max(1, out_ch // se_reduction)) if se_reduction else nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


class ResNetSE(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem (no max pool) + SE, four stages of BasicBlocks.

    Defaults reproduce the report: stem 3 -> 64 + SE(64 -> 4 -> 64); stages
    64 x4 (s1), 128 x3 (s2), 128 x2 (s1), 256 x3 (s2); 8x8 map -> avgpool -> Linear.
    ``se_stem`` / ``se_in_blocks`` place SE blocks (reduction ``se_reduction``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        depths: Sequence[int] = (4, 3, 2, 3),
        widths: Sequence[int] = (64, 128, 128, 256),
        strides: Sequence[int] = (1, 2, 1, 2),
        stem_width: int = 64,
        se_stem: bool = True,
        se_in_blocks: bool = False,
        se_reduction: int = 16,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not len(depths) == len(widths) == len(strides):
            raise ValueError("depths, widths and strides must have the same length")
        stem: list[nn.Module] = [
            nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        ]
        if se_stem:
            stem.append(SqueezeExcite(stem_width, max(1, stem_width // se_reduction)))
        self.stem = nn.Sequential(*stem)
        stages = []
        ch = stem_width
        for depth, width, stride in zip(depths, widths, strides):
            blocks = []
            for i in range(depth):
                blocks.append(BasicBlock(ch, width, stride if i == 0 else 1, se_reduction if se_in_blocks else None))
                ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))
