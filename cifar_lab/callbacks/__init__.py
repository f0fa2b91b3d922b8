"""Lightning callbacks: run reports (metrics, figures, files) and test-time augmentation.

Names are imported on first use, so tools that only need the plotting helpers
(``cifar_lab.callbacks.plots``) do not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClassificationReport": "cifar_lab.callbacks.reports",
    "TestTimeAugmentation": "cifar_lab.models.tta",
    "TTACallback": "cifar_lab.callbacks.tta",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
