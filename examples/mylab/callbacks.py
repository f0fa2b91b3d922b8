"""A callback of your own: any Lightning ``Callback``."""

from __future__ import annotations

import time

from lightning.pytorch import Callback


class EpochClock(Callback):
    """Prints how long each training epoch took."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"epoch {trainer.current_epoch} took {time.perf_counter() - self._start:.1f} s", flush=True)
