"""The reference pipeline of the reports: PIL images with per-image torchvision transforms in a
multi-worker ``DataLoader``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# CIFAR-10 channel statistics of the reference ``Normalize``
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class PILImages(Dataset):
    """HWC uint8 images served as PIL images, exactly as ``torchvision.datasets.CIFAR10`` does."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.data = images_hwc
        self.targets = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import PIL.Image

        return self.transform(PIL.Image.fromarray(self.data[index])), self.targets[index]


def reference_transform() -> Callable:
    """The per-image training transform of the reports (torchvision v1 API)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def reference_dataset(kind: str, root: Path, generated: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Dataset, str]:
    """The reports' training dataset and a description of what it is."""
    transform = reference_transform()
    if kind == "batches":
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(str(root), train=True, download=False, transform=transform), "torchvision CIFAR10"
        except RuntimeError:
            # torchvision insists on the official md5 sums; a re-encoded copy is read here
            # and served by the same __getitem__ (Image.fromarray + transform)
            from cifar_lab.data.archive import CifarArchive

            splits = CifarArchive(root, download=False).load()
            images = splits.train_x.permute(0, 2, 3, 1).contiguous().numpy()
            return PILImages(images, splits.train_y.numpy(), transform), "PIL images from the batch files (CIFAR10.__getitem__)"
    if kind == "folder":
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(root / "train"), transform=transform), "torchvision ImageFolder (JPEG decode per image)"
    assert generated is not None
    images, labels = generated
    return PILImages(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy(), transform), "PIL images from generated tensors"


def reference_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=True)


def reference_batches(dataset: Dataset, batch_size: int, workers: int, device: torch.device):
    loader = reference_loader(dataset, batch_size, workers, device)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
