"""Tensor caches written atomically and trusted only while their source is unchanged."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)


def fingerprint(files: Iterable[Path], root: Path) -> str:
    """Hash of relative paths, sizes and modification times: changes when the source does."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_if_fresh(path: Path, expected_fingerprint: str) -> dict | None:
    """The cached dict if it exists, loads safely and matches the fingerprint; else None."""
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
    return cached
