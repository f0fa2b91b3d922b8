"""CIFAR-10.1 (Recht et al. 2018): a new test set for CIFAR-10 models, in its ``.npy`` format.

The release holds ``cifar10.1_<version>_data.npy`` (uint8 ``(N, 32, 32, 3)``, channels last)
and ``cifar10.1_<version>_labels.npy`` (integer class indices ``(N,)``, CIFAR-10's class order).
:class:`Cifar101Source` serves them as a test set: ``python -m cifar_lab.evaluate
ckpt_path=<run> data=cifar10_1`` measures a CIFAR-10 model on it. The source has no training
images of its own; its train split repeats the test images so a data module can be built, and it
is meant for evaluation only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cifar_lab.data.splits import DataError, ImageSplits

__all__ = ["CIFAR10_CLASSES", "load_npy_test_set", "Cifar101Source"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"CIFAR-10.1 {what} file {path} not found; download the .npy files of the release "
                        "(github.com/modestyachts/CIFAR-10.1, datasets/) and set data.source.images/labels")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - truncated or not a .npy file
        raise DataError(f"{path} is not a readable .npy file ({type(err).__name__}: {err})") from None


def load_npy_test_set(images: str | Path, labels: str | Path, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """uint8 images ``(N, 3, 32, 32)`` and int64 labels from the two ``.npy`` files, checked."""
    x = _load(Path(images), "images")
    y = _load(Path(labels), "labels")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{images}: expected uint8 images of shape (N, 32, 32, 3), got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{labels}: expected integer labels of shape (N,), got {y.dtype} {tuple(y.shape)}")
    if len(y) != len(x):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{images} holds no images")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{labels}: labels must lie in [0, {num_classes - 1}], found [{y.min()}, {y.max()}]")
    images_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return images_t, torch.from_numpy(y.astype(np.int64))


class Cifar101Source:
    """CIFAR-10.1's ``.npy`` images and labels as the test split (evaluation only; see the module docstring)."""

    def __init__(self, images: str, labels: str, classes: list[str] | None = None) -> None:
        self.images = Path(str(images)).expanduser()
        self.labels = Path(str(labels)).expanduser()
        self.classes = list(classes or CIFAR10_CLASSES)

    def describe(self) -> str:
        return f"CIFAR-10.1 test set ({self.images.name})"

    def prepare(self) -> None:
        """Nothing to download: check the files exist."""
        for path, what in ((self.images, "images"), (self.labels, "labels")):
            if not path.is_file():
                _load(path, what)

    def load(self) -> ImageSplits:
        x, y = load_npy_test_set(self.images, self.labels, len(self.classes))
        splits = ImageSplits(x, y, x, y, self.classes)
        splits.validate(self.describe())
        return splits
