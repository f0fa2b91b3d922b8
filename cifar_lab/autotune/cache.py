"""The decisions cache: ``$CIFAR_LAB_CACHE_DIR`` (default ``~/.cache/cifar_lab``)/``autotune.json``.

One entry per setup (device kind, network config, optimizer, candidates: the ``setup`` hash) and
the conditions it was measured under (torch version, threads, CPU or GPU name, batch size, image
size: ``under``). A run whose setup is cached under other conditions measures again and says which
changed; an entry a run found too optimistic is marked ``stale`` and measured again next time. No
torch here: ``python -m cifar_lab.autotune show|clear`` reads it without loading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "CIFAR_LAB_CACHE_DIR"
VERSION = 2  # entries of another version are ignored (and replaced at the next write)
UNDER_NAMES = {"torch": "torch", "threads": "threads", "device": "device", "batch_size": "batch size",
               "image_size": "image size"}


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cifar_lab")
    return Path(root) / "autotune.json"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry_key(setup: str, under: dict[str, Any]) -> str:
    return digest({"setup": setup, "under": under})


def read(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The entries (key -> entry); an unreadable file or another version reads as none."""
    data = read_file(path or cache_path())
    return data["entries"] if data.get("version") == VERSION and isinstance(data.get("entries"), dict) else {}


def read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write(entries: dict[str, dict[str, Any]], path: Path | None = None) -> None:
    write_json(path or cache_path(), {"version": VERSION, "entries": entries})


def store(key: str, entry: dict[str, Any]) -> None:
    """Add or replace one entry (read, change, write: a concurrent writer's entry may be lost, never half)."""
    entries = read()
    entries[key] = entry
    write(entries)


def mark_stale(key: str, reason: str) -> bool:
    """Mark one entry stale (measured again by the next run); False when it is not there."""
    entries = read()
    if key not in entries:
        return False
    entries[key]["stale"] = reason
    write(entries)
    return True


def why_again(entries: dict[str, dict[str, Any]], key: str, setup: str, under: dict[str, Any]) -> str:
    """Why a setup is measured although something of it is cached: the entry is stale, or what changed
    since its newest entry ("threads 2 -> 1"); "" when it was never measured."""
    if key in entries:
        return f"stale: {entries[key].get('stale')}"
    same = [e for e in entries.values() if e.get("setup") == setup and e.get("kind") == "pair"]
    if not same:
        return ""
    newest = max(same, key=lambda e: str(e.get("measured_at", "")))
    old = newest.get("under") or {}
    changes = [f"{UNDER_NAMES[k]} {old.get(k)} -> {under[k]}" for k in UNDER_NAMES
               if k in under and old.get(k) != under[k]]
    return ", ".join(changes) or "another setting"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically; a cache that cannot be written is only a warning."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write %s (%s); the measurement will be repeated next time", path, err)
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
