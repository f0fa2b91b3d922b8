"""Attention net (report 5): softmax-weighted two-branch blocks with residual macro blocks."""

from __future__ import annotations

from torch import Tensor, nn

from .blocks import BranchMixBlock, PooledMLPHead, ResidualPair
from .init import init_weights

__all__ = ["AttentionNet"]


class AttentionNet(nn.Module):
    """Intermediate blocks of L parallel ``conv -> BN -> ReLU`` branches mixed by
    ``softmax(Linear(mean_hw(x)))``, in the report's layout (32x32 input)::

        B1  3 -> 64   k3 s1                     32x32
        B2  64 -> 128 k5 s2 p2                  16x16
        Macro1: B3 128 -> 256 k3, B4 256 -> 256 k3, 1x1-conv skip; maxpool 2   -> 8x8
        B5  256 -> 384 k3
        Macro2: B6, B7 384 -> 384 k3, identity skip; maxpool 2                -> 4x4
        conv 384 -> 256 k3 p0, BN, ReLU                                        -> 2x2
        avgpool; Linear 256 -> 128, ReLU, Dropout; Linear 128 -> num_classes
    """

    def __init__(
        self,
        num_classes: int = 10,
        branches: int = 2,
        weighting: str = "softmax",
        head_hidden: int = 128,
        dropout: float = 0.5,
        in_channels: int = 3,
        init: str = "kaiming",
    ) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int = 3, stride: int = 1) -> BranchMixBlock:
            return BranchMixBlock(
                cin, cout, branches=branches, kernel_size=k, stride=stride, padding=k // 2,
                weighting=weighting, branch_norm=True, branch_act="relu",
            )

        self.features = nn.Sequential(
            block(in_channels, 64, 3),
            block(64, 128, 5, stride=2),
            ResidualPair(block(128, 256), block(256, 256), 128, 256),
            nn.MaxPool2d(2),
            block(256, 384),
            ResidualPair(block(384, 384), block(384, 384), 384, 384),
            nn.MaxPool2d(2),
            nn.Conv2d(384, 256, 3, padding=0, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
        )
        self.head = PooledMLPHead(256, head_hidden, num_classes, dropout=dropout)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
