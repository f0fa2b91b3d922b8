"""Tensor caches trusted only while their source is unchanged (written with cifar_lab.fileio)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from cifar_lab.fileio import atomic_torch_save

log = logging.getLogger(__name__)


def fingerprint(files: Iterable[Path], root: Path) -> str:
    """Hash of relative paths, sizes and modification times: changes when the source does."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_if_fresh(path: Path, expected_fingerprint: str, required: Iterable[str] = ()) -> dict | None:
    """The cached dict if it exists, loads safely, matches the fingerprint and has the ``required`` keys; else None.

    Loaded with ``weights_only=True``: a cache file is data, and one that holds anything
    else is treated as unreadable and rebuilt.
    """
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: rebuild rather than trust it
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, err)
        return None
    if not isinstance(cached, dict) or cached.get("fingerprint") != expected_fingerprint:
        log.info("cache %s is stale (its source changed); rebuilding it", path)
        return None
    missing = [key for key in required if key not in cached]
    if missing:
        log.warning("ignoring cache %s: it lacks %s; rebuilding it", path, ", ".join(missing))
        return None
    return cached


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def free_space(path: Path) -> str:
    """Free space on the filesystem that holds ``path`` (or its nearest existing folder), in words."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError as err:
        return f"free space unknown ({err.strerror or err})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on that filesystem"


def write_cache(payload: dict[str, Any], path: Path, remedy: str = "") -> bool:
    """Write ``payload`` to ``path`` atomically; True when written.

    A cache is optional: when it cannot be written (a full disk, a read-only folder, any
    ``OSError``), this logs one warning naming the path, the error and the free space there,
    and returns False. Nothing is left behind: the temporary file is removed and an existing
    cache at ``path`` is untouched.
    """
    try:
        atomic_torch_save(payload, path)
    except OSError as err:
        needed = sum(v.numel() * v.element_size() for v in payload.values() if isinstance(v, torch.Tensor))
        log.warning(
            "could not write the cache %s (%s: %s; it needs about %s, %s); continuing without it, "
            "with the data in memory%s",
            path, type(err).__name__, err, _size(needed), free_space(path), f". To cache: {remedy}" if remedy else "",
        )
        return False
    log.info("wrote the cache %s", path)
    return True
