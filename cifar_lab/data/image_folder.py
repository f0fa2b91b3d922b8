"""A folder of images, ``train/<class>/*`` and ``test/<class>/*``, decoded once and cached."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from cifar_lab.data.cache import fingerprint, load_if_fresh, write_cache
from cifar_lab.data.splits import DataError, ImageSplits

log = logging.getLogger(__name__)

# Every suffix here is read by decode_image_file: JPEG, PNG, GIF and WebP by torchvision's
# decoders, BMP and TIFF (which torchvision does not read) by Pillow.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_CACHE_KEYS = ("classes", "train_x", "train_y", "test_x", "test_y")

# torchvision prefixes its decoder errors with "<function>, <source>.cpp:<line>, ".
_TORCHVISION_PREFIX = re.compile(r"^[\w()]+, \S+\.(?:cpp|h):\d+, ")


# The largest image decoded (width x height): 16 megapixels, 48 MB as uint8 RGB. Its size is read from
# the file's header first, so a small file declaring a huge image is refused before anything is decoded.
MAX_PIXELS = 4096 * 4096


class ImageDecodeError(ValueError):
    """Neither torchvision nor Pillow can decode a file; the message says why (without the path)."""


def _check_declared_size(data: bytes) -> None:
    """Refuse an image whose header declares more than :data:`MAX_PIXELS` (read without decoding)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            declared = "x".join(map(str, img.size)) if img.size[0] * img.size[1] > MAX_PIXELS else None
    except Image.DecompressionBombError:  # Pillow's own limit (far above ours) was hit by the header
        declared = "over 178 million"
    except Exception:  # noqa: BLE001 - no header Pillow knows: the decoders below say why
        return
    if declared:
        raise ImageDecodeError(f"the image declares {declared} pixels, more than the {MAX_PIXELS:,} (4096x4096) "
                               "decoded here; resize it first")


def _reason(err: BaseException) -> str:
    if type(err).__name__ == "UnidentifiedImageError":
        return "not an image in a format read here: JPEG, PNG, GIF, WebP, BMP or TIFF"
    message = _TORCHVISION_PREFIX.sub("", str(err))
    message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", message)  # Pillow names its buffer
    return f"{type(err).__name__}: {message.strip()}"


def decode_image_file(path: str | os.PathLike) -> torch.Tensor:
    """The image in ``path`` as a uint8 ``(3, H, W)`` RGB tensor.

    torchvision decodes JPEG, PNG, GIF and WebP; a file it cannot decode (BMP, TIFF, or one it
    rejects) is decoded by Pillow and converted to RGB. Both drop alpha and expand grayscale and
    palette images to RGB; 16-bit images keep their high byte; an animated GIF gives its first
    frame. Raises ``OSError`` when the file cannot be read and :class:`ImageDecodeError` when
    neither decoder can decode it, or when its header declares more than :data:`MAX_PIXELS`.
    """
    data = Path(path).read_bytes()
    if not data:
        raise ImageDecodeError("the file is empty")
    _check_declared_size(data)
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as torchvision_err:  # noqa: BLE001 - a format it does not read, or a damaged file
        try:
            return _decode_with_pil(data)
        except Exception as pil_err:  # noqa: BLE001
            # Report the decoder that knows the format: torchvision for the formats it reads (a
            # truncated PNG), Pillow for the others (a damaged BMP).
            unsupported = "Unsupported image file" in str(torchvision_err)
            raise ImageDecodeError(_reason(pil_err if unsupported else torchvision_err)) from None
    if image.ndim == 4:  # an animated GIF: (frames, 3, H, W)
        image = image[0]
    if image.dtype == torch.uint16:  # a 16-bit PNG: keep the high byte
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def _decode_with_pil(data: bytes) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode.startswith("I;16"):  # 16-bit gray, which convert() would clip: keep the high byte
            gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
            return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(gray, (3, *gray.shape))))
        rgb = img.convert("RGB")  # decodes the first frame; palette, gray, alpha, CMYK -> RGB
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy())


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
        train_x, train_y = self._decode_split("train", files["train"], classes)
        test_x, test_y = self._decode_split("test", files["test"], classes)
        splits = ImageSplits(train_x, train_y, test_x, test_y, classes)
        splits.validate(str(self.root))
        if self.cache:
            payload = dict(fingerprint=key, classes=classes, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
            # A full disk or a read-only folder costs only the cache: one warning, and the run
            # continues with the images decoded in memory.
            write_cache(payload, cache_path, remedy=(
                "set data.source.cache_dir to a writable folder with enough space, or data.source.cache=false"))
        return splits

    def _decode(self, path: Path) -> torch.Tensor | str:
        """The image as uint8 (3, H, W), or a message saying what is wrong with the file."""
        try:
            image = decode_image_file(path)
        except ImageDecodeError as err:
            return f"{path}: cannot decode ({err})"
        except OSError as err:
            return f"{path}: cannot read ({type(err).__name__}: {err.strerror or err})"
        except Exception as err:  # noqa: BLE001 - any other failure is still this file's fault
            return f"{path}: cannot decode ({type(err).__name__}: {err})"
        if tuple(image.shape[1:]) != (self.image_size, self.image_size):
            return f"{path}: image is {image.shape[2]}x{image.shape[1]}, expected {self.image_size}x{self.image_size}"
        return image

    def _decode_split(
        self, split: str, files: dict[str, list[Path]], classes: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [p for name in classes for p in files[name]]
        labels = [i for i, name in enumerate(classes) for _ in files[name]]
        # torchvision's decoders release the GIL, so threads decode in parallel.
        with ThreadPoolExecutor(self.decode_threads) as pool:
            decoded = list(pool.map(self._decode, paths, chunksize=256))
        bad = [d for d in decoded if isinstance(d, str)]
        if bad and not self.skip_bad_images:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}. Fix or remove the file, or set data.source.skip_bad_images=true")
        self._check_no_class_emptied(split, files, classes, labels, decoded)
        for message in bad:
            log.warning("skipping %s", message)
        keep = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        images = torch.stack([decoded[i] for i in keep])
        return images, torch.tensor([labels[i] for i in keep], dtype=torch.int64)

    def _check_no_class_emptied(
        self, split: str, files: dict[str, list[Path]], classes: list[str], labels: list[int],
        decoded: list[torch.Tensor | str],
    ) -> None:
        """Skipping bad files must not leave a class (in train or test) without images: that is an error."""
        kept = [0] * len(classes)
        first_reason: dict[int, str] = {}
        for label, result in zip(labels, decoded):
            if isinstance(result, str):
                first_reason.setdefault(label, result)
            else:
                kept[label] += 1
        emptied = [i for i, n in enumerate(kept) if n == 0]
        if not emptied:
            return
        split_dir = self.root / split
        reason = first_reason[emptied[0]]
        if len(emptied) == len(classes):
            skipped = sum(len(paths) for paths in files.values())
            raise DataError(
                f"none of the {skipped} image files in {split_dir} can be used: every one was skipped "
                f"(data.source.skip_bad_images=true), e.g. {reason}. Check that data.root holds "
                f"{self.image_size}x{self.image_size} images ({', '.join(sorted(IMAGE_SUFFIXES))}), and fix "
                "or replace the damaged files"
            )
        name = classes[emptied[0]]
        others = [classes[j] for j in emptied[1:]]
        also = ""
        if others:
            listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            also = f" (nor {'has' if len(others) == 1 else 'have'} {listed})"
        raise DataError(
            f"class folder {split_dir / name} has no usable images left{also}: all {len(files[name])} of its "
            f"image files were skipped (data.source.skip_bad_images=true), e.g. {reason}. Every class needs at "
            f"least one readable {self.image_size}x{self.image_size} image in both train/ and test/: replace the "
            "damaged files (re-export them, e.g. as PNG), or remove the class folder from both train/ and test/"
        )
