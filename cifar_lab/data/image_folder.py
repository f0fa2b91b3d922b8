"""A folder of images, ``train/<class>/*`` and ``test/<class>/*``, decoded once and cached."""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from cifar_lab.data.cache import fingerprint, load_if_fresh
from cifar_lab.fileio import atomic_torch_save
from cifar_lab.data.splits import DataError, ImageSplits

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_CACHE_KEYS = ("classes", "train_x", "train_y", "test_x", "test_y")


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as err:  # permissions, a file where a folder should be, a vanished mount
        raise DataError(f"cannot list {folder} ({type(err).__name__}: {err.strerror or err})") from None


class ImageFolderSource:
    """Images in one folder per class; the class order is the sorted folder names.

    Decoding 55k JPEGs takes tens of seconds on a laptop, so the decoded uint8 tensors are
    cached (next to the data, or under ``cache_dir``) and reused while the files are unchanged.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 32,
        cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
        skip_bad_images: bool = False,
        decode_threads: int | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.skip_bad_images = skip_bad_images
        self.decode_threads = decode_threads or min(8, os.cpu_count() or 1)

    def describe(self) -> str:
        return f"image folder {self.root}"

    def prepare(self) -> None:
        self._class_files()  # fail fast on a missing split or empty class

    def _class_files(self) -> dict[str, dict[str, list[Path]]]:
        if not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} is not a folder. data=imagefolder expects train/<class>/ and "
                "test/<class>/ folders of images there (extract the archive first); for a smoke run "
                "without data use data=synthetic"
            )
        found: dict[str, dict[str, list[Path]]] = {}
        for split in ("train", "test"):
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise DataError(f"{split_dir} is missing: data=imagefolder needs both train/ and test/ in {self.root}")
            # Hidden folders (.ipynb_checkpoints, .DS_Store's kin) are not classes.
            classes = sorted(p.name for p in _entries(split_dir) if p.is_dir() and not p.name.startswith("."))
            if not classes:
                raise DataError(f"{split_dir} has no class folders (expected {split}/<class>/<image files>)")
            found[split] = {}
            for name in classes:
                entries = _entries(split_dir / name)
                files = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
                if not files:
                    others = sorted(p.name for p in entries)[:3]
                    seen = f"; it holds only {', '.join(others)}{' ...' if len(entries) > 3 else ''}" if others else \
                        " (it is empty)"
                    raise DataError(
                        f"class folder {split_dir / name} holds no image files{seen}. Every class needs images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}) directly inside its folder: "
                        "add them or remove the folder"
                    )
                found[split][name] = files
        if list(found["train"]) != list(found["test"]):
            raise DataError(
                f"train/ and test/ in {self.root} have different class folders: "
                f"{sorted(set(found['train']) ^ set(found['test']))}"
            )
        return found

    def _cache_path(self) -> Path:
        name = f"cifar_lab_cache_{self.image_size}px.pt"
        if self.cache_dir is not None:
            tag = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]
            return self.cache_dir / f"{tag}_{name}"
        return self.root / name

    def load(self) -> ImageSplits:
        files = self._class_files()
        all_files = [p for split in files.values() for paths in split.values() for p in paths]
        key = fingerprint(all_files, self.root) + f"|{self.image_size}|{self.skip_bad_images}"
        cache_path = self._cache_path()
        if self.cache:
            cached = load_if_fresh(cache_path, key, required=_CACHE_KEYS)
            if cached is not None:
                try:
                    splits = ImageSplits(cached["train_x"], cached["train_y"], cached["test_x"], cached["test_y"],
                                         [str(c) for c in cached["classes"]])
                    splits.validate(str(cache_path))
                    if splits.classes != list(files["train"]):
                        raise DataError(f"{cache_path}: classes {splits.classes} differ from the folders")
                except (DataError, TypeError, AttributeError, ValueError) as err:
                    log.warning("ignoring damaged cache %s (%s); rebuilding it", cache_path, err)
                else:
                    log.info("loaded decoded images from cache %s", cache_path)
                    return splits
        classes = list(files["train"])
        train_x, train_y = self._decode_split(files["train"], classes)
        test_x, test_y = self._decode_split(files["test"], classes)
        splits = ImageSplits(train_x, train_y, test_x, test_y, classes)
        splits.validate(str(self.root))
        if self.cache:
            payload = dict(fingerprint=key, classes=classes, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
            try:
                atomic_torch_save(payload, cache_path)
                log.info("cached decoded images in %s", cache_path)
            except OSError as err:  # read-only data folder: keep going without a cache
                log.warning("could not write cache %s (%s); set data.source.cache_dir to a writable folder", cache_path, err)
        return splits

    def _decode(self, path: Path) -> torch.Tensor | str:
        """The image as uint8 (3, H, W), or a message saying what is wrong with the file."""
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except Exception as err:
            return f"{path}: cannot decode ({type(err).__name__}: {err})"
        if tuple(image.shape[1:]) != (self.image_size, self.image_size):
            return f"{path}: image is {image.shape[2]}x{image.shape[1]}, expected {self.image_size}x{self.image_size}"
        return image

    def _decode_split(self, files: dict[str, list[Path]], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [p for name in classes for p in files[name]]
        labels = [i for i, name in enumerate(classes) for _ in files[name]]
        # decode_image releases the GIL, so threads decode in parallel.
        with ThreadPoolExecutor(self.decode_threads) as pool:
            decoded = list(pool.map(self._decode, paths, chunksize=256))
        bad = [d for d in decoded if isinstance(d, str)]
        if bad and not self.skip_bad_images:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}. Fix or remove the file, or set data.source.skip_bad_images=true")
        for message in bad:
            log.warning("skipping %s", message)
        keep = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        if not keep:
            raise DataError(f"no readable images among {len(paths)} files in {self.root}")
        images = torch.stack([decoded[i] for i in keep])
        return images, torch.tensor([labels[i] for i in keep], dtype=torch.int64)
