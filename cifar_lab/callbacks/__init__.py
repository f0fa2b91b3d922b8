"""Lightning callbacks: run reports (metrics, figures, files) and test-time augmentation."""

from cifar_lab.callbacks.reports import ClassificationReport
from cifar_lab.callbacks.tta import TestTimeAugmentation, TTACallback

__all__ = ["ClassificationReport", "TestTimeAugmentation", "TTACallback"]
