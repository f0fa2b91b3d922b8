"""Image-folder faults: formats torchvision does not decode, classes emptied by skipped files,
and a cache that cannot be written."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_lab import fileio
from cifar_lab.data.image_folder import ImageDecodeError, ImageFolderSource, decode_image_file
from cifar_lab.data.splits import DataError
from conftest import write_image_folder

CACHE = "cifar_lab_cache_32px.pt"


def _rgb(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _mixed_folder(root: Path) -> dict[Path, np.ndarray]:
    """train/ and test/ with two classes whose images are BMP, TIFF and PNG files; their pixels by path."""
    pixels = {}
    formats = [("bmp", "BMP", {}), ("tif", "TIFF", {}), ("tiff", "TIFF", {"compression": "tiff_lzw"}),
               ("png", "PNG", {})]
    seed = 0
    for split in ("train", "test"):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for suffix, fmt, options in formats:
                seed += 1
                path = folder / f"{seed:03d}.{suffix}"
                Image.fromarray(_rgb(seed)).save(path, fmt, **options)
                pixels[path] = _rgb(seed)
    return pixels


@pytest.mark.parametrize("suffix,fmt", [("bmp", "BMP"), ("tif", "TIFF"), ("tiff", "TIFF")])
def test_bmp_and_tiff_decode_to_the_pixels_of_a_png_copy(tmp_path: Path, suffix: str, fmt: str) -> None:
    pixels = _rgb(7, size=13)
    Image.fromarray(pixels).save(tmp_path / f"a.{suffix}", fmt)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = decode_image_file(tmp_path / f"a.{suffix}")
    png = decode_image_file(tmp_path / "a.png")  # through torchvision's decoder
    assert image.dtype == torch.uint8 and image.shape == (3, 13, 13)
    assert torch.equal(image, png)
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_bmp_and_tiff_of_other_modes_become_rgb_like_torchvision_does(tmp_path: Path, mode: str) -> None:
    source = Image.fromarray(_rgb(3, size=8))
    image = source.convert(mode) if mode != "P" else source.quantize(16)
    for fmt, suffix in (("TIFF", "tif"), ("BMP", "bmp")):
        if mode == "CMYK" and fmt == "BMP":
            continue  # BMP cannot hold CMYK
        image.save(tmp_path / f"x.{suffix}", fmt)
        decoded = decode_image_file(tmp_path / f"x.{suffix}")
        assert decoded.dtype == torch.uint8 and decoded.shape == (3, 8, 8)
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(decoded, expected), (mode, fmt)
        if mode in ("L", "P", "RGBA"):  # the same image as PNG, decoded by torchvision, agrees
            image.save(tmp_path / "x.png")
            assert torch.equal(decoded, decode_image_file(tmp_path / "x.png")), (mode, fmt)


def test_sixteen_bit_images_keep_their_high_byte(tmp_path: Path) -> None:
    gray = np.array([[0, 255, 256, 40000, 65535, 511]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g.tif", "TIFF")
    Image.fromarray(gray).save(tmp_path / "g.png")  # torchvision decodes a 16-bit PNG as uint16
    expected = torch.from_numpy((gray >> 8).astype(np.uint8)).expand(3, 1, 6)
    for name in ("g.tif", "g.png"):
        decoded = decode_image_file(tmp_path / name)
        assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected), name


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (10, 200)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    decoded = decode_image_file(tmp_path / "a.gif")
    assert decoded.shape == (3, 8, 8) and int(decoded.float().mean()) in range(5, 15)


@pytest.mark.parametrize("content,reason", [
    (b"", "the file is empty"),
    (b"not an image at all", "not an image in a format read here"),
    (b"BM\x00\x01 a damaged bitmap", "Truncated File Read"),  # Pillow's reason: torchvision cannot read BMP
    (None, "Out of bound read"),  # a truncated PNG: torchvision's reason, not Pillow's
])
def test_undecodable_file_raises_one_clear_error(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / ("bad.png" if content is None else "bad.bmp")
    if content is None:
        Image.fromarray(_rgb(1)).save(tmp_path / "good.png")
        raw = (tmp_path / "good.png").read_bytes()
        content = raw[: len(raw) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason) as err:
        decode_image_file(path)
    assert ".cpp:" not in str(err.value) and "BytesIO" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        decode_image_file(tmp_path / "missing.png")


def test_image_folder_of_bmp_and_tiff_loads_and_caches(tmp_path: Path) -> None:
    pixels = _mixed_folder(tmp_path / "images")
    splits = ImageFolderSource(tmp_path / "images").load()
    assert splits.classes == ["class0", "class1"]
    assert splits.train_x.shape == (8, 3, 32, 32) and splits.test_x.shape == (8, 3, 32, 32)
    by_split = {"train": splits.train_x, "test": splits.test_x}
    for split in ("train", "test"):  # sorted files, class by class
        paths = sorted(p for p in pixels if p.parts[-3] == split)
        expected = torch.stack([torch.from_numpy(pixels[p]).permute(2, 0, 1) for p in paths])
        assert torch.equal(by_split[split], expected), split
    assert (tmp_path / "images" / CACHE).is_file()
    assert torch.equal(ImageFolderSource(tmp_path / "images").load().train_x, splits.train_x)


def test_undecodable_bmp_is_named_or_skipped_like_any_bad_file(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images")
    (root / "train" / "class2" / "0003.bmp").write_bytes(b"BM\x00\x01 damaged")
    with pytest.raises(DataError, match=r"0003\.bmp: cannot decode \(not an image in a format read here") as err:
        ImageFolderSource(root, cache=False).load()
    assert "skip_bad_images=true" in str(err.value)
    assert len(ImageFolderSource(root, cache=False, skip_bad_images=True).load().train_x) == 18


@pytest.mark.parametrize("split", ["train", "test"])
def test_class_left_without_images_by_skipped_files_is_an_error(tmp_path: Path, split: str, caplog) -> None:
    root = write_image_folder(tmp_path / "images")
    folder = root / split / "class1"
    for path in folder.iterdir():
        path.write_bytes(b"not an image")
    count = len(list(folder.iterdir()))
    with caplog.at_level(logging.WARNING, logger="cifar_lab.data"):
        with pytest.raises(DataError) as err:
            ImageFolderSource(root, skip_bad_images=True).load()
    message = str(err.value)
    assert message.startswith(f"class folder {folder} has no usable images left: all {count} of its image files "
                               "were skipped (data.source.skip_bad_images=true)"), message
    assert "cannot decode (not an image in a format read here" in message  # why
    assert "remove the class folder from both train/ and test/" in message  # the fix
    assert "skipping" not in caplog.text  # one error, not a stream of warnings first
    assert not (root / CACHE).exists()


def test_several_emptied_classes_and_a_wholly_unusable_split(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", classes=4)
    for name in ("class1", "class3"):
        for path in (root / "train" / name).iterdir():
            path.write_bytes(b"")
    with pytest.raises(DataError, match=r"train/class1 has no usable images left \(nor has class3\): all 6 .*"
                                        r"cannot decode \(the file is empty\)"):
        ImageFolderSource(root, cache=False, skip_bad_images=True).load()
    for name in ("class0", "class2"):
        for path in (root / "train" / name).iterdir():
            path.write_bytes(b"")
    with pytest.raises(DataError, match=r"none of the 24 image files in .*train can be used"):
        ImageFolderSource(root, cache=False, skip_bad_images=True).load()


def test_skipped_files_that_leave_every_class_some_images_still_warn_and_load(image_root: Path, caplog) -> None:
    (image_root / "test" / "class0" / "0000.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="cifar_lab.data"):
        splits = ImageFolderSource(image_root, skip_bad_images=True).load()
    assert len(splits.test_x) == 5 and "skipping" in caplog.text and "0000.png" in caplog.text


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*cifar_lab_cache*"))


def _partial_then_full(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a cache")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["save", "fsync", "mkstemp"])
def test_cache_that_cannot_be_written_is_one_warning(image_root: Path, monkeypatch, caplog, failure: str) -> None:
    if failure == "save":  # the disk fills up while writing
        monkeypatch.setattr(fileio.torch, "save", _partial_then_full)
    elif failure == "fsync":  # ... or when the written data is flushed
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(fileio.os, "fsync", full)
    else:  # a read-only folder
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(image_root))
        monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    with caplog.at_level(logging.WARNING, logger="cifar_lab.data"):
        splits = ImageFolderSource(image_root).load()
    assert splits.train_x.shape == (18, 3, 32, 32) and len(splits.test_x) == 6  # the run goes on
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    message = warnings[0].getMessage()
    assert str(image_root / CACHE) in message
    assert ("Read-only file system" if failure == "mkstemp" else "No space left on device") in message
    assert "free of" in message and "on that filesystem" in message
    assert "data.source.cache_dir" in message
    assert _leftovers(image_root) == []  # neither a cache nor a temporary file


def test_failed_cache_write_keeps_an_existing_cache_file_whole(image_root: Path, monkeypatch) -> None:
    ImageFolderSource(image_root).load()
    before = (image_root / CACHE).read_bytes()
    from torchvision.io import write_png

    write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(image_root / "train" / "class0" / "new.png"))
    monkeypatch.setattr(fileio.torch, "save", _partial_then_full)
    assert len(ImageFolderSource(image_root).load().train_x) == 19
    assert (image_root / CACHE).read_bytes() == before  # the stale one, untouched (and ignored next time)
    assert _leftovers(image_root) == [CACHE]


def test_cache_dir_that_cannot_be_created_is_one_warning(image_root: Path, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="cifar_lab.data"):
        splits = ImageFolderSource(image_root, cache_dir=blocker / "cache").load()
    assert len(splits.train_x) == 18
    assert "could not write the cache" in caplog.text and str(blocker / "cache") in caplog.text
    assert "free of" in caplog.text


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_data_folder_loads_without_a_cache(image_root: Path, caplog) -> None:
    image_root.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="cifar_lab.data"):
            splits = ImageFolderSource(image_root).load()
    finally:
        image_root.chmod(0o755)
    assert len(splits.train_x) == 18
    assert "could not write the cache" in caplog.text and "Permission denied" in caplog.text
    assert _leftovers(image_root) == []
