"""A data source of your own: ``describe()``, ``prepare()`` and ``load()`` returning ImageSplits."""

from __future__ import annotations

import torch

from cifar_lab.data.splits import ImageSplits


class SquaresSource:
    """A square of one colour on noise; the class is its colour (red, green, blue or white).

    Replace ``load`` with reading your own files: any uint8 ``(N, 3, H, W)`` images with int64 labels.
    """

    def __init__(self, train_size: int = 800, test_size: int = 200, image_size: int = 32, seed: int = 0) -> None:
        self.train_size, self.test_size, self.image_size, self.seed = train_size, test_size, image_size, seed

    def describe(self) -> str:
        return f"squares ({self.train_size}+{self.test_size} generated images)"

    def prepare(self) -> None:
        """Download or check files here (called once, before load)."""

    def _split(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.image_size
        labels = torch.randint(0, 4, (n,), generator=g)
        images = torch.randint(0, 96, (n, 3, size, size), generator=g, dtype=torch.uint8)
        corners = torch.randint(0, size // 2, (n, 2), generator=g)
        for i, (label, (top, left)) in enumerate(zip(labels.tolist(), corners.tolist())):
            channels = [0, 1, 2] if label == 3 else [label]  # white, or one colour
            images[i, channels, top:top + size // 2, left:left + size // 2] = 255
        return images, labels

    def load(self) -> ImageSplits:
        g = torch.Generator().manual_seed(self.seed)
        train_x, train_y = self._split(self.train_size, g)
        test_x, test_y = self._split(self.test_size, g)
        splits = ImageSplits(train_x, train_y, test_x, test_y, ["red", "green", "blue", "white"])
        splits.validate("squares")
        return splits
