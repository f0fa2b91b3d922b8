"""A run's ``metrics.json``: the final metrics and facts of one train or evaluate job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cifar_lab.callbacks.reports import scalars

__all__ = ["METRICS_FILE", "scalars", "write_summary"]

METRICS_FILE = "metrics.json"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` as the run directory's metrics.json."""
    path = Path(run_dir) / METRICS_FILE
    path.write_text(json.dumps(summary, indent=2))
    return path
