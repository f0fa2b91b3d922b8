"""CIFAR-10.1 loader: the release's .npy layout becomes a test split; wrong files get one clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from cifar_lab.data.cifar10_1 import CIFAR10_CLASSES, Cifar101Source, load_npy_test_set
from cifar_lab.data.splits import DataError
from conftest import compose_cfg


def write_release(root: Path, n: int = 40, images=None, labels=None) -> tuple[Path, Path]:
    """The two files of a CIFAR-10.1 release: uint8 (N, 32, 32, 3) images, int64 (N,) labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) if images is None else images
    labels = (np.arange(n) % 10).astype(np.int64) if labels is None else labels
    np.save(root / "cifar10.1_v6_data.npy", images)
    np.save(root / "cifar10.1_v6_labels.npy", labels)
    return root / "cifar10.1_v6_data.npy", root / "cifar10.1_v6_labels.npy"


def test_loads_channels_last_images_as_nchw(tmp_path: Path) -> None:
    images, labels = write_release(tmp_path)
    x, y = load_npy_test_set(images, labels)
    raw = np.load(images)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x[3], torch.from_numpy(raw[3]).permute(2, 0, 1))
    assert y.tolist() == [i % 10 for i in range(40)]


def test_the_data_option_serves_it_as_the_test_set(tmp_path: Path) -> None:
    write_release(tmp_path / "data")
    cfg = compose_cfg(["data=cifar10_1", f"data.root={tmp_path / 'data'}", "trainer=cpu"])
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("test")
    x, y = datamodule.splits["test"]
    assert len(x) == 40 and datamodule.classes == CIFAR10_CLASSES
    assert datamodule.source.describe() == "CIFAR-10.1 test set (cifar10.1_v6_data.npy)"


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 3, 32, 32), np.uint8), None, r"expected uint8 images of shape \(N, 32, 32, 3\), got uint8 \(4, 3, 32, 32\)"),
    (np.zeros((4, 32, 32, 3), np.float32), None, "expected uint8 images .* got float32"),
    (None, np.zeros((4, 1), np.int64), r"expected integer labels of shape \(N,\), got int64 \(4, 1\)"),
    (None, np.zeros(3, np.int64), "holds 4 images but .* holds 3 labels"),
    (None, np.array([0, 1, 2, 10]), r"labels must lie in \[0, 9\], found \[0, 10\]"),
    (None, np.zeros(4, np.float32), "expected integer labels"),
])
def test_wrong_files_are_refused(tmp_path: Path, images, labels, message: str) -> None:
    if images is None:
        images = np.zeros((4, 32, 32, 3), np.uint8)
    paths = write_release(tmp_path, images=images, labels=labels if labels is not None else np.zeros(4, np.int64))
    with pytest.raises(DataError, match=message):
        Cifar101Source(*map(str, paths)).load()


def test_missing_files_name_the_release(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar10.1_v6_data.npy not found; download the .npy files"):
        Cifar101Source(str(tmp_path / "cifar10.1_v6_data.npy"), str(tmp_path / "labels.npy")).prepare()
