"""Optuna pruning for Lightning: report the optimized metric every epoch, stop hopeless trials.

In a job of the Optuna sweeper (``hparams_search=optuna``) the callback reports ``monitor`` after
each validation epoch to the job's trial (through the study's storage, so it works wherever the
job runs) and asks the study's pruner whether to go on; if not, it raises
:class:`cifar_lab.sweeps.runner.TrialPruned`: the job is recorded as pruned and the trial as PRUNED.
Outside such a job it does nothing.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from cifar_lab.sweeps.runner import TrialPruned

__all__ = ["OptunaPruning"]


class OptunaPruning(Callback):
    """Report ``monitor`` to the Optuna trial after every validation epoch; prune when the pruner says so."""

    def __init__(self, monitor: str = "val/acc_best") -> None:
        self.monitor = monitor
        self.trial: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            from cifar_lab.sweeps.job import current_trial

            self.trial = current_trial()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        prune, value = False, None
        if self.trial is not None and self.monitor in trainer.callback_metrics:
            value = float(trainer.callback_metrics[self.monitor])
            self.trial.report(value, trainer.current_epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):  # every rank stops together
            shown = "" if value is None else f" ({self.monitor}={value:.4g})"
            raise TrialPruned(f"pruned after epoch {trainer.current_epoch + 1} of {trainer.max_epochs}{shown}", value)
