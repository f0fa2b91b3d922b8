"""The official CIFAR python archives (or any copy in the same layout), read directly.

torchvision's ``CIFAR10`` dataset insists on the official md5 sums of every batch file and
yields PIL images one at a time; reading the batch files ourselves lets a re-encoded copy
load (checked by structure instead) and hands the datamodule one uint8 tensor per split.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from cifar_lab.data.splits import DataError, ImageSplits
from cifar_lab.fileio import load_array_pickle

log = logging.getLogger(__name__)

# File layout of each variant, with its training-set size and classes (the config check reads them before
# any file); URL, archive name, md5 and folder come from torchvision.
VARIANTS = {
    "cifar10": dict(
        train_images=50_000,
        num_classes=10,
        dataset=CIFAR10,
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": dict(
        train_images=50_000,
        num_classes=100,
        dataset=CIFAR100,
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"missing CIFAR batch file {path}") from None
    except OSError as err:  # permissions, a folder in its place, I/O errors
        raise DataError(f"cannot read CIFAR batch file {path} ({type(err).__name__}: {err.strerror or err})") from None
    try:
        content = load_array_pickle(raw)
    except Exception as err:  # truncated, corrupted, or not a pickle at all
        raise DataError(
            f"cannot read CIFAR batch file {path} ({type(err).__name__}: {err}); the file is truncated "
            "or corrupted: delete it (and its archive) so it is downloaded again, or replace it"
        ) from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a CIFAR batch file (it holds a {type(content).__name__}, not a dict)")
    # The official files were pickled by Python 2 (str keys); copies re-pickled by Python 3
    # often carry bytes keys and bytes class names. Both mean the same.
    return {_text(key): value for key, value in content.items()}


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


class CifarArchive:
    """CIFAR-10/100 from ``root``: the extracted folder, the archive, or a download."""

    def __init__(self, root: str | os.PathLike, variant: str = "cifar10", download: bool = True) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"data.source.variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        self.root = Path(root).expanduser()
        self.variant = variant
        self.download = download
        self.layout = VARIANTS[variant]
        dataset = self.layout["dataset"]
        self.url: str = dataset.url
        self.archive = self.root / dataset.filename
        self.md5: str = dataset.tgz_md5
        self.folder = self.root / dataset.base_folder

    def describe(self) -> str:
        return f"{self.variant} archive in {self.folder}"

    def _files(self) -> list[Path]:
        names = self.layout["train"] + self.layout["test"] + [self.layout["meta"]]
        return [self.folder / name for name in names]

    def _extracted(self) -> bool:
        return all(path.is_file() for path in self._files())

    def prepare(self) -> None:
        """Make the batch files exist: extract a present archive, else download (md5-checked)."""
        if self._extracted():
            return
        if self.archive.is_file():
            self._extract()
            return
        if not self.download:
            raise self._not_found("data.source.download=false")
        with self._staging() as staging:
            try:
                download_and_extract_archive(self.url, str(staging), md5=self.md5)
            except Exception as err:  # offline, proxy, disk full, bad checksum
                raise self._not_found(f"download from {self.url} failed: {type(err).__name__}: {err}") from None
            self._install(staging)
        if not self._extracted():
            raise DataError(f"{self.archive} was downloaded but lacks {self.variant} batch files")

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        """A private folder in ``root`` for downloads and extraction, removed afterwards.

        Nothing appears under its final name until it is complete, so an interrupted
        download or extraction (Ctrl-C, a full disk, two runs at once) leaves no partial
        archive or batch file behind to trip the next run.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".cifar_lab-staging-", dir=self.root))
        except OSError as err:
            raise DataError(f"cannot write to data.root={self.root} ({type(err).__name__}: {err.strerror or err}); "
                            "point data.root (or CIFAR_LAB_DATA) at a writable folder") from None
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _install(self, staging: Path) -> None:
        """Move the archive and batch files from ``staging`` into place, each with one atomic rename."""
        archive = staging / self.archive.name
        if archive.is_file():
            os.replace(archive, self.archive)
        extracted = staging / self.folder.name
        if extracted.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            for item in extracted.iterdir():
                if item.is_file():
                    os.replace(item, self.folder / item.name)

    def _extract(self) -> None:
        if not check_integrity(str(self.archive), self.md5):
            log.warning("%s does not match the official md5; reading it anyway (structure is checked)", self.archive)
        with self._staging() as staging:
            try:
                with tarfile.open(self.archive) as tar:
                    tar.extractall(staging, filter="data")
            except (tarfile.TarError, EOFError, OSError) as err:
                raise DataError(
                    f"cannot extract {self.archive} ({type(err).__name__}: {err}); the archive is truncated or "
                    "corrupted: delete it so it is downloaded again"
                ) from None
            self._install(staging)

    def _not_found(self, reason: str) -> DataError:
        return DataError(
            f"no {self.variant} data found: looked for {self.folder} and {self.archive} ({reason}).\n"
            "Remedies:\n"
            f"  - put {self.archive.name} (or the extracted {self.folder.name}/ folder) in {self.root}, "
            "or point data.root / the CIFAR_LAB_DATA environment variable at where it is;\n"
            "  - use a folder of images: data=imagefolder data.root=<dir with train/<class>/ and test/<class>/>;\n"
            "  - for a smoke run without any download: data=synthetic"
        )

    def load(self) -> ImageSplits:
        self.prepare()
        try:
            return self._load()
        except DataError as err:
            if not self.archive.is_file():
                raise
            # A damaged batch file next to its archive: extract it again rather than stop.
            log.warning("%s\nextracting %s again", err, self.archive)
            self._extract()
            return self._load()

    def _load(self) -> ImageSplits:
        meta = _read_pickle(self.folder / self.layout["meta"])
        classes = [str(_text(c)) for c in meta[self.layout["names_key"]]]
        train_x, train_y = self._read_split(self.layout["train"])
        test_x, test_y = self._read_split(self.layout["test"])
        splits = ImageSplits(train_x, train_y, test_x, test_y, classes)
        splits.validate(str(self.folder))
        return splits

    def _read_split(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Filled batch by batch into one preallocated tensor (sized from the first file, grown
        # only if a later file is larger): concatenating at the end would hold every image twice.
        images = labels = None
        filled = 0
        for name in names:
            path = self.folder / name
            batch = _read_pickle(path)
            try:
                data = np.asarray(batch["data"], dtype=np.uint8)
                target = np.asarray(batch[self.layout["label_key"]], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"{path} is not a CIFAR batch file ({type(err).__name__}: {err})") from None
            del batch
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(target) != len(data):
                raise DataError(
                    f"{path}: expected a (N, 3072) uint8 array with N labels, got {data.shape} "
                    f"and {len(target)} labels; the file is corrupted or from another dataset"
                )
            if images is None:
                images = torch.empty(len(data) * len(names), 3, 32, 32, dtype=torch.uint8)
                labels = torch.empty(len(data) * len(names), dtype=torch.int64)
            if filled + len(data) > len(images):
                extra = filled + len(data) - len(images)
                images = torch.cat([images, images.new_empty(extra, 3, 32, 32)])
                labels = torch.cat([labels, labels.new_empty(extra)])
            images[filled:filled + len(data)] = torch.from_numpy(data.reshape(-1, 3, 32, 32))
            labels[filled:filled + len(data)] = torch.from_numpy(target)
            filled += len(data)
            del data, target
        assert images is not None and labels is not None, "a split lists at least one batch file"
        return images[:filled], labels[:filled]
