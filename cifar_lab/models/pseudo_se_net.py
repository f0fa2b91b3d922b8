"""Pseudo-SE net (report 1): four input-weighted multi-branch blocks at full resolution."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .blocks import BranchMixBlock, PooledMLPHead
from .init import init_weights

__all__ = ["PseudoSENet"]


class PseudoSENet(nn.Module):
    """Blocks of K parallel 3x3 convs mixed by weights computed from the block input.

    Each block: ``w = weighting(Linear(C_in -> K)(avgpool(x)))``, ``y = ReLU(sum_k w_k conv_k(x))``.
    No pooling between blocks (the map stays 32x32). Head: global average pool,
    ``Linear(C -> hidden_units) -> ReLU -> Linear(hidden_units -> num_classes)``.

    The report names only "an activation" for the weights; ``weighting`` defaults
    to ``sigmoid`` (squeeze-and-excitation style gates) and accepts
    ``softmax | sigmoid | relu | identity``. The head's hidden size is not stated
    either; ``hidden_units`` defaults to 128.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (10, 25, 50, 150),
        branches: int = 5,
        kernel_size: int = 3,
        weighting: str = "sigmoid",
        hidden_units: int = 128,
        in_channels: int = 3,
        init: str = "default",
    ) -> None:
        super().__init__()
        blocks = []
        ch = in_channels
        for out in channels:
            blocks.append(
                BranchMixBlock(ch, out, branches=branches, kernel_size=kernel_size, weighting=weighting, out_act="relu")
            )
            ch = out
        self.features = nn.Sequential(*blocks)
        self.head = PooledMLPHead(ch, hidden_units, num_classes)  # no dropout layer
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
