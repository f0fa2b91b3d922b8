"""Per-batch hooks dispatched only to the callbacks that act in them.

Lightning calls every per-batch hook (six per training step) on every callback, whether the
callback defines it or not, and each call pays for a profiler context and the callback's
``state_key`` (ModelCheckpoint's formats a dict): a few microseconds each, most of a run's
per-step callback cost with a dozen callbacks. :class:`SkipIdleHooks` makes the hooks a
callback's class does not override non-callable on that callback for the time of a fit or test
(``None`` on the instance, which Lightning's dispatcher skips: ``if callable(fn)``), and removes
them again at teardown. The callbacks themselves, their order, their state in checkpoints and
``trainer.callbacks`` stay as they were.
"""

from __future__ import annotations

from typing import Any

import lightning as L

__all__ = ["BATCH_HOOKS", "SkipIdleHooks", "idle_hooks"]

# the hooks Lightning calls once (or more) per batch
BATCH_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end",
)


def idle_hooks(callback: L.Callback) -> list[str]:
    """The per-batch hooks ``callback``'s class leaves as Lightning's no-op."""
    return [name for name in BATCH_HOOKS
            if getattr(type(callback), name, None) is getattr(L.Callback, name) and name not in vars(callback)]


class SkipIdleHooks(L.Callback):
    """For the time of each fit, validation or test: no per-batch dispatch of hooks a callback does not define."""

    def __init__(self) -> None:
        self._skipped: list[tuple[L.Callback, str]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
        for callback in trainer.callbacks:
            for name in idle_hooks(callback):
                setattr(callback, name, None)
                self._skipped.append((callback, name))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for callback, name in self._skipped:
            vars(callback).pop(name, None)
        self._skipped = []

    def __getstate__(self) -> dict[str, Any]:
        return {"_skipped": []}  # a copy holds no other callback
