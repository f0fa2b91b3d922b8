"""Small generated data that needs no download yet is learnable, for smoke runs and tests."""

from __future__ import annotations

import math

import torch

from cifar_lab.data.splits import ImageSplits


class SyntheticSource:
    """Each class is a colour plus a stripe pattern (orientation and frequency) under noise.

    A model that learns gets well above chance within an epoch or two; one that does not
    stays at chance, which is what the tests need to tell the two apart.
    """

    def __init__(
        self,
        num_classes: int = 10,
        train_size: int = 2000,
        test_size: int = 500,
        image_size: int = 32,
        noise: float = 0.35,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.train_size = train_size
        self.test_size = test_size
        self.image_size = image_size
        self.noise = noise
        self.seed = seed

    def describe(self) -> str:
        return f"synthetic data ({self.num_classes} classes, {self.train_size}+{self.test_size} images)"

    def prepare(self) -> None:
        """Nothing to download."""

    def _prototypes(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(12345)
        size = self.image_size
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        protos = []
        for c in range(self.num_classes):
            angle = math.pi * c / self.num_classes
            freq = 2 * math.pi * (1 + c % 3) / size
            stripes = torch.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)))
            colour = torch.rand(3, 1, 1, generator=g)
            protos.append(0.5 + 0.25 * stripes[None] * (0.5 + colour) + 0.2 * (colour - 0.5))
        return torch.stack(protos)

    def _split(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % self.num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        images = self._prototypes()[labels]
        images = images + self.noise * torch.randn(images.shape, generator=generator)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.int64)

    def load(self) -> ImageSplits:
        g = torch.Generator().manual_seed(self.seed)
        train_x, train_y = self._split(self.train_size, g)
        test_x, test_y = self._split(self.test_size, g)
        splits = ImageSplits(train_x, train_y, test_x, test_y, [f"class_{i}" for i in range(self.num_classes)])
        splits.validate("synthetic data")
        return splits
