"""Tensor caches trusted only while their source is unchanged (written with cifar_lab.fileio)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable

import torch

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
