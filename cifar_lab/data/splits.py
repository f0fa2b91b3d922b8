"""The in-memory representation every data source produces."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cifar_lab.errors import DataError

__all__ = ["DataError", "ImageSplits"]


@dataclass
class ImageSplits:
    """Train and test images as uint8 ``(N, 3, H, W)`` tensors with int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]

    def validate(self, origin: str) -> None:
        """Check structure rather than checksums, so re-encoded copies load too."""
        for name in ("train", "test"):
            x, y = getattr(self, f"{name}_x"), getattr(self, f"{name}_y")
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
                raise DataError(
                    f"{origin}: {name} images must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}"
                )
            if y.ndim != 1 or len(y) != len(x):
                raise DataError(f"{origin}: {len(x)} {name} images but {len(y)} labels")
            if len(x) == 0:
                raise DataError(f"{origin}: the {name} split is empty")
            if y.min() < 0 or y.max() >= len(self.classes):
                raise DataError(
                    f"{origin}: {name} labels must lie in [0, {len(self.classes) - 1}], "
                    f"found [{int(y.min())}, {int(y.max())}]"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(
                f"{origin}: train images are {tuple(self.train_x.shape[1:])} but test images are "
                f"{tuple(self.test_x.shape[1:])}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)
