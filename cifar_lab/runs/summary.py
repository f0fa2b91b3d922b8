"""A run's ``metrics.json``: the final metrics and facts of one train or evaluate job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor
from cifar_lab.fileio import atomic_write_text

__all__ = ["METRICS_FILE", "data_record", "scalars", "write_summary"]

METRICS_FILE = "metrics.json"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` as the run directory's metrics.json."""
    path = Path(run_dir) / METRICS_FILE
    atomic_write_text(path, json.dumps(summary, indent=2))
    return path


def scalars(metrics: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, float]:
    """The entries of a Lightning metrics mapping whose keys start with ``prefixes``, as floats."""
    return {key: float(value.item() if isinstance(value, Tensor) else value)
            for key, value in sorted(metrics.items()) if key.startswith(prefixes)}


def data_record(source: str, splits: Mapping[str, Any], validated: bool = True) -> dict[str, Any]:
    """What a run read: ``source`` (the data choice, e.g. ``cifar10``) and its split sizes.

    ``splits`` maps split names to ``(images, labels)``; a validation split that is the test set
    is recorded as ``"test"``, and ``0`` when the run did not validate.
    """
    test = splits.get("test")
    sizes: dict[str, Any] = {}
    for name, split in splits.items():
        sizes[name] = "test" if name != "test" and test is not None and split[0] is test[0] else len(split[1])
    if not validated and "val" in sizes:
        sizes["val"] = 0
    return {"source": source, "splits": sizes}
