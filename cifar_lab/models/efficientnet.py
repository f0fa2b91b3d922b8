"""EfficientNet b0..b7 from scratch, with a stem adapted to 32x32 inputs (report 2)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from .blocks import DropPath, SqueezeExcite
from .init import init_weights

__all__ = ["MBConv", "EfficientNet", "SCALING", "B0_STAGES", "round_channels"]

# version -> (width coefficient, depth coefficient, dropout before the classifier)
SCALING: dict[str, tuple[float, float, float]] = {
    "b0": (1.0, 1.0, 0.2),
    "b1": (1.0, 1.1, 0.2),
    "b2": (1.1, 1.2, 0.3),
    "b3": (1.2, 1.4, 0.3),
    "b4": (1.4, 1.8, 0.4),
    "b5": (1.6, 2.2, 0.4),
    "b6": (1.8, 2.6, 0.5),
    "b7": (2.0, 3.1, 0.5),
}

# b0 stages: (expand ratio, output channels, repeats, stride, kernel size)
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)


def round_channels(channels: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never dropping more than 10%."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: [expand 1x1] -> depthwise kxk -> SE -> project 1x1 (+ stochastic-depth residual)."""

    def __init__(
        self, cin: int, cout: int, expand: int, kernel_size: int, stride: int,
        se_ratio: float = 0.25, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1))
        layers.append(_conv_bn_act(hidden, hidden, kernel_size, stride=stride, groups=hidden))
        if se_ratio > 0:
            layers.append(SqueezeExcite(hidden, max(1, int(cin * se_ratio)), act="silu"))
        layers.append(_conv_bn_act(hidden, cout, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if self.use_residual else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_residual:
            out = x + self.drop_path(out)
        return out


class EfficientNet(nn.Module):
    """EfficientNet with compound scaling (``version`` b0..b7).

    Widths are scaled by the width coefficient and rounded to multiples of 8,
    stage repeats by ``ceil(depth coefficient * repeats)``; the classifier dropout
    is the version's unless ``dropout`` is given. Stochastic depth grows linearly
    from 0 to ``stochastic_depth`` over the blocks.

    ``stem``:
      - ``imagenet``: the paper's stride-2 stem (total stride 32: 32x32 -> 1x1).
      - ``cifar``: stride-1 stem and the first stride-2 stage (24 channels) at
        stride 1, total stride 8: maps are 32x32 up to the 40-channel stage,
        then 16, 8 and 4 (4x4 before the head).
    """

    def __init__(
        self,
        num_classes: int = 10,
        version: str = "b0",
        stem: str = "cifar",
        stochastic_depth: float = 0.2,
        dropout: float | None = None,
        se_ratio: float = 0.25,
        in_channels: int = 3,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if version not in SCALING:
            raise ValueError(f"version must be one of {sorted(SCALING)}, got {version!r}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        width, depth, default_dropout = SCALING[version]
        dropout = default_dropout if dropout is None else dropout

        stages = [list(s) for s in B0_STAGES]
        stem_stride = 2
        if stem == "cifar":
            stem_stride = 1
            first_s2 = next(i for i, s in enumerate(stages) if s[3] == 2)
            stages[first_s2][3] = 1

        stem_ch = round_channels(32 * width)
        self.stem = _conv_bn_act(in_channels, stem_ch, 3, stride=stem_stride)

        repeats = [math.ceil(depth * s[2]) for s in stages]
        total = sum(repeats)
        blocks: list[nn.Module] = []
        cin, idx = stem_ch, 0
        for (expand, ch, _, stride, k), n in zip(stages, repeats):
            cout = round_channels(ch * width)
            for i in range(n):
                blocks.append(
                    MBConv(cin, cout, expand, k, stride if i == 0 else 1, se_ratio, stochastic_depth * idx / total)
                )
                cin, idx = cout, idx + 1
        self.blocks = nn.Sequential(*blocks)
        head_ch = round_channels(1280 * width)
        self.head = _conv_bn_act(cin, head_ch, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_ch, num_classes))
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))
