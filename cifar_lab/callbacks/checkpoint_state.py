"""Checkpoint state is data, not instructions: paths in restored callback state stay inside the run.

On a resume Lightning hands every callback its saved state (``checkpoint["callbacks"]``), and
``ModelCheckpoint`` later deletes the files that state names (a previous ``last.ckpt``, checkpoints
that fell out of the top k), recursively, through fsspec: a crafted ``best_k_models`` or
``last_model_path`` would make training delete anything the user can delete, and a URL scheme
other than ``file`` passes Lightning's own inside-the-folder check.

:class:`CheckpointStateGuard` runs in ``on_load_checkpoint``, which Lightning calls for every
callback before any callback's ``load_state_dict``: every path in any callback's state (a value
under a key ending in ``path``, a key of a ``*_models`` mapping) must be a local file inside this
run's checkpoint folder (or the folder of the checkpoint it resumes from, whose best checkpoint a
resume into a new directory still tests), else it is dropped with a warning. So training only
ever removes files the run's own checkpointing wrote there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

__all__ = ["CheckpointStateGuard", "drop_foreign_paths"]


def _inside(value: str, roots: tuple[Path, ...]) -> bool:
    text = value[len("file://"):] if value.startswith("file://") else value
    if "://" in text or "::" in text:  # another fsspec protocol (s3://, memory://, chained urls)
        return False
    try:
        path = Path(os.path.realpath(os.path.expanduser(text)))
        return any(path.is_relative_to(root) for root in roots)
    except (OSError, ValueError):
        return False


def drop_foreign_paths(state: Any, roots: tuple[Path, ...], where: str = "") -> list[str]:
    """Remove from ``state`` (in place) every path outside ``roots``; return what was dropped."""
    dropped: list[str] = []
    if not isinstance(state, dict):
        return dropped
    for key in list(state):
        value, here = state[key], f"{where}.{key}" if where else str(key)
        name = str(key)
        if name.endswith("path") and isinstance(value, (str, os.PathLike)) and str(value):
            if not _inside(str(value), roots):
                dropped.append(f"{here}={value}")
                state[key] = ""  # emptied, not removed: Lightning reads some of these keys unconditionally
        elif name.endswith("_models") and isinstance(value, dict):
            for path in [p for p in value if not _inside(str(p), roots)]:
                dropped.append(f"{here}[{path}]")
                del value[path]
        elif isinstance(value, dict):
            dropped += drop_foreign_paths(value, roots, here)
    return dropped


class CheckpointStateGuard(L.Callback):
    """Drops paths outside ``checkpoint_dir`` (and ``resumed_from``'s folder) from restored callback states."""

    def __init__(self, checkpoint_dir: str | Path, resumed_from: str | Path | None = None) -> None:
        folders = [checkpoint_dir] + ([Path(resumed_from).parent] if resumed_from else [])
        self.roots = tuple(Path(os.path.realpath(f)) for f in folders)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict):
            return
        dropped = [entry for state in states.values() for entry in drop_foreign_paths(state, self.roots)]
        if dropped:
            log.warning("ignoring %d path(s) in the checkpoint's callback state outside %s (nothing there is read "
                        "or removed): %s", len(dropped), " and ".join(map(str, self.roots)), "; ".join(dropped[:5]))
