"""Data sources: the CIFAR archive layout, image folders with their cache, synthetic data."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from cifar_lab.data import archive as archive_mod
from cifar_lab.data import image_folder as image_folder_mod
from cifar_lab.data.archive import CifarArchive
from cifar_lab.data.image_folder import ImageFolderSource
from cifar_lab.data.splits import DataError
from cifar_lab.data.synthetic import SyntheticSource
from conftest import CLASSES10, write_cifar_batches


def test_archive_folder_loads_with_structure(cifar_root: Path) -> None:
    splits = CifarArchive(cifar_root, download=False).load()
    assert splits.train_x.shape == (100, 3, 32, 32) and splits.train_x.dtype == torch.uint8
    assert splits.test_x.shape == (30, 3, 32, 32)
    assert splits.train_y.dtype == torch.int64 and splits.train_y.max() == 9
    assert splits.classes == CLASSES10


def test_archive_tarball_is_extracted(tmp_path: Path) -> None:
    folder = write_cifar_batches(tmp_path / "src")
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    splits = CifarArchive(root, download=False).load()
    assert len(splits.train_x) == 100


def test_missing_data_without_download_names_path_and_remedies(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        CifarArchive(tmp_path / "nowhere", download=False).prepare()
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "data=imagefolder" in message and "data=synthetic" in message


def test_offline_download_failure_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def offline(url, root, md5=None, **kwargs):
        calls.append((url, md5))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(archive_mod, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="Network is unreachable") as err:
        CifarArchive(tmp_path, download=True).prepare()
    # the real download is asked for the official archive with its md5
    assert calls == [(archive_mod.CIFAR10.url, archive_mod.CIFAR10.tgz_md5)]
    assert "data=synthetic" in str(err.value)


def test_successful_download_is_used(tmp_path: Path, monkeypatch) -> None:
    def fake_download(url, root, md5=None, **kwargs):
        write_cifar_batches(Path(root))

    monkeypatch.setattr(archive_mod, "download_and_extract_archive", fake_download)
    assert len(CifarArchive(tmp_path, download=True).load().test_x) == 30


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_batch_file_is_named(cifar_root: Path, damage: str) -> None:
    path = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3"):
        CifarArchive(cifar_root, download=False).load()


def test_corrupted_tarball_is_named(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08broken")
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        CifarArchive(tmp_path, download=False).prepare()


def test_batch_file_with_code_is_refused(cifar_root: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="refusing to load"):
        CifarArchive(cifar_root, download=False).load()


def test_wrong_shape_batch_is_rejected(cifar_root: Path) -> None:
    import pickle

    import numpy as np

    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DataError, match="3072"):
        CifarArchive(cifar_root, download=False).load()


def test_image_folder_decodes_and_caches(image_root: Path, monkeypatch) -> None:
    splits = ImageFolderSource(image_root).load()
    assert splits.classes == ["class0", "class1", "class2"]
    assert splits.train_x.shape == (18, 3, 32, 32) and splits.test_x.shape == (6, 3, 32, 32)
    assert (image_root / "cifar_lab_cache_32px.pt").is_file()

    # Second load must come from the cache: decoding would now fail (both decoders).
    monkeypatch.setattr(image_folder_mod, "decode_image_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError))
    again = ImageFolderSource(image_root).load()
    assert torch.equal(again.train_x, splits.train_x)


def test_image_folder_cache_rebuilt_when_source_changes(image_root: Path) -> None:
    from torchvision.io import write_png

    first = ImageFolderSource(image_root).load()
    write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(image_root / "train" / "class1" / "extra.png"))
    second = ImageFolderSource(image_root).load()
    assert len(second.train_x) == len(first.train_x) + 1


def test_image_folder_faults(image_root: Path) -> None:
    bad = image_root / "train" / "class0" / "0001.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match="0001.png"):
        ImageFolderSource(image_root, cache=False).load()
    splits = ImageFolderSource(image_root, cache=False, skip_bad_images=True).load()
    assert len(splits.train_x) == 17


def test_image_folder_wrong_size_and_layout(tmp_path: Path) -> None:
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "big", size=40)
    with pytest.raises(DataError, match="40x40"):
        ImageFolderSource(root, cache=False).load()
    (tmp_path / "nosplit" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="test"):
        ImageFolderSource(tmp_path / "nosplit").prepare()


def test_synthetic_is_deterministic_and_balanced() -> None:
    a = SyntheticSource(num_classes=5, train_size=100, test_size=50, seed=3).load()
    b = SyntheticSource(num_classes=5, train_size=100, test_size=50, seed=3).load()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.bincount(a.train_y).tolist() == [20] * 5
    # class-dependent content: the per-class mean images differ clearly
    means = torch.stack([a.train_x[a.train_y == c].float().mean(0) for c in range(5)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 50


def test_batches_pickled_with_bytes_keys_load(tmp_path: Path) -> None:
    """Copies re-pickled by Python 3 often use bytes keys and bytes class names."""
    import pickle

    folder = write_cifar_batches(tmp_path / "cifar")
    for path in folder.iterdir():
        with open(path, "rb") as f:
            content = pickle.load(f)
        as_bytes = {k.encode(): ([n.encode() for n in v] if k == "label_names" else v) for k, v in content.items()}
        with open(path, "wb") as f:
            pickle.dump(as_bytes, f)
    splits = CifarArchive(tmp_path / "cifar", download=False).load()
    assert splits.classes == CLASSES10 and len(splits.train_x) == 100


def test_archive_split_keeps_file_order_with_uneven_batches(tmp_path: Path) -> None:
    """Batches of different sizes (a larger one later forces the buffer to grow) concatenate in order."""
    import pickle

    import numpy as np

    folder = write_cifar_batches(tmp_path / "cifar")
    expected_x, expected_y = [], []
    for i, n in enumerate([3, 20, 7, 31, 1], start=1):
        data = np.full((n, 3072), i, dtype=np.uint8)
        data[:, 0] = np.arange(n)
        labels = [(i + j) % 10 for j in range(n)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        expected_x.append(torch.from_numpy(data).view(n, 3, 32, 32))
        expected_y.append(torch.tensor(labels))
    splits = CifarArchive(tmp_path / "cifar", download=False).load()
    assert torch.equal(splits.train_x, torch.cat(expected_x)) and torch.equal(splits.train_y, torch.cat(expected_y))
