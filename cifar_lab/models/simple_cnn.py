"""Plain convolutional baselines (report 2: vanilla CNN and CNN with custom edits)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["SimpleCNN"]


class SimpleCNN(nn.Module):
    """Stacked ``conv -> [BN] -> ReLU -> maxpool 2`` stages, then a one-hidden-layer MLP.

    Layout::

        for each (filters[i], kernel_sizes[i]): Conv(k, padding k//2) [BN] ReLU MaxPool(2)
        Dropout(dropout) -> Flatten -> Linear(fc_units) -> ReLU -> Dropout(dropout) -> Linear(num_classes)

    The defaults are the vanilla network (32 -> 64 filters, FC 512, no dropout);
    ``batch_norm=True, dropout=0.5, fc_units=256`` gives the edited variant. The
    flattened size is computed from ``input_size`` and the conv/pool arithmetic,
    so any filter counts and kernel sizes work.
    """

    def __init__(
        self,
        num_classes: int = 10,
        filters: Sequence[int] = (32, 64),
        kernel_sizes: Sequence[int] = (3, 3),
        fc_units: int = 512,
        dropout: float = 0.0,
        batch_norm: bool = False,
        in_channels: int = 3,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        filters, kernel_sizes = list(filters), list(kernel_sizes)
        if len(filters) != len(kernel_sizes) or not filters:
            raise ValueError("filters and kernel_sizes must be non-empty and of equal length")
        layers: list[nn.Module] = []
        ch, size = in_channels, input_size
        for f, k in zip(filters, kernel_sizes):
            pad = k // 2
            layers.append(nn.Conv2d(ch, f, k, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(f))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            size = (size + 2 * pad - k + 1) // 2
            if size < 1:
                raise ValueError(f"input_size {input_size} is too small for {len(filters)} pooling stages")
            ch = f
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(ch * size * size, fc_units),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_units, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
