"""Conv-block net (report 3): ten softmax-weighted multi-branch blocks with residual convs."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .blocks import BranchMixBlock, PooledMLPHead
from .init import init_weights

__all__ = ["ConvBlockNet"]


class ConvBlockNet(nn.Module):
    """Ten ``ConvBlock``s from 3 to 1024 channels, then an MLP head.

    ConvBlock(C_in, C_out): ``w = softmax(Linear(C_in -> K)(avgpool(x)))``,
    ``y = sum_k w_k ReLU(conv3x3_k(x))`` (+ ``ReLU(BN(conv(x)))`` on residual
    blocks). BatchNorm + LeakyReLU sit between consecutive blocks (not after the
    last one). Every ``residual_every``-th block (the 2nd, 4th, ...) is residual.

    The report does not say where the resolution drops; ``pool_after`` lists the
    (0-based) blocks followed by a 2x2 max pool; the default ``[1, 3, 5]`` runs
    the last four blocks at 4x4. Head: global average pool ->
    ``Linear(C -> head_hidden) -> ReLU -> [Dropout] -> Linear(head_hidden -> num_classes)``.
    ``init: xavier`` (the report's xavier_normal) applies to every conv and linear layer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 64, 128, 128, 256, 256, 512, 512, 1024),
        branches: int = 5,
        kernel_size: int = 3,
        weighting: str = "softmax",
        residual_every: int = 2,
        residual_kernel_size: int = 3,
        pool_after: Sequence[int] = (1, 3, 5),
        between_act: str = "leaky_relu",
        head_hidden: int = 512,
        head_dropout: float = 0.0,
        in_channels: int = 3,
        init: str = "xavier",
    ) -> None:
        super().__init__()
        channels, pools = list(channels), set(pool_after)
        layers: list[nn.Module] = []
        ch = in_channels
        for i, out in enumerate(channels):
            last = i == len(channels) - 1
            residual = residual_every > 0 and (i + 1) % residual_every == 0
            layers.append(
                BranchMixBlock(
                    ch, out, branches=branches, kernel_size=kernel_size, weighting=weighting,
                    branch_act="relu", residual="conv" if residual else None,
                    residual_kernel_size=residual_kernel_size,
                    out_norm=not last, out_act=None if last else between_act,
                )
            )
            if i in pools:
                layers.append(nn.MaxPool2d(2))
            ch = out
        self.features = nn.Sequential(*layers)
        self.head = PooledMLPHead(ch, head_hidden, num_classes, dropout=head_dropout)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
