"""Where a run's images come from: a CIFAR-10 copy (python batches or an image folder), else
generated images; and the config overrides that point cifar-lab's data config at them."""

from __future__ import annotations

import os
from pathlib import Path

from cifar_lab.tools.bench.settings import Settings

# the files of the python-batches layout (``cifar-10-batches-py/``)
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def detect_data(root: Path) -> str:
    """``batches`` (cifar-10-batches-py/), ``folder`` (train/<class>/, test/<class>/) or ``generated``."""
    if all((root / "cifar-10-batches-py" / name).is_file() for name in CIFAR10_FILES):
        return "batches"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder"
    return "generated"


def default_data_root() -> Path:
    """What ``paths.data_dir`` resolves to: ``$CIFAR_LAB_DATA`` or ``data``."""
    return Path(os.environ.get("CIFAR_LAB_DATA", "data"))


def data_overrides(kind: str, root: Path, settings: Settings) -> list[str]:
    if kind == "batches":
        return ["data=cifar10", f"data.root={root}", "data.source.download=false"]
    if kind == "folder":
        return ["data=imagefolder", f"data.root={root}"]
    return ["data=synthetic", f"data.source.train_size={settings.generated_train}",
            f"data.source.test_size={settings.generated_test}", f"data.val_size={settings.generated_train // 10}"]
