"""Weight averaging during training: exponential moving average (EMA) and Lookahead.

Both build on Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging`, which keeps
an :class:`~torch.optim.swa_utils.AveragedModel` copy of the LightningModule, swaps the
average in for validation, saves it as the checkpoint's ``state_dict`` (the training weights
go to ``current_model_state``, so resuming continues both) and copies it into the module when
training ends (so testing and ``metrics.json`` see the averaged weights). Unlike the base class,
testing from a checkpoint after fitting in the same process also uses the average.

:class:`ScheduledAveraging` adds two things to that:

* a decay that ramps up during training: every ``every_n_steps`` optimizer steps the
  average moves towards the current weights, ``avg <- d * avg + (1 - d) * w`` with
  ``d = decay ** every_n_steps * (t / T) ** ramp_power`` at step ``t`` of ``T``. Early on
  the average follows the weights closely (``d ~ 0``), late in training it smooths over
  roughly ``1 / (1 - decay)`` steps;
* ``write_back``: after each update the training weights are reset to the average.
  That is Lookahead (Zhang et al., 2019): "fast" weights explore for ``every_n_steps``
  steps, then the "slow" weights take a partial step towards them and the fast weights
  restart from there. Without write-back it is a plain EMA.

With ``use_buffers`` (the default) BatchNorm running statistics are averaged too, and
integer buffers (``num_batches_tracked``) follow the training model.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

__all__ = ["ScheduledAveraging", "Lookahead", "EMA"]

log = logging.getLogger(__name__)


class ScheduledAveraging(WeightAveraging):
    """EMA of the weights with a ramped decay; ``write_back=True`` makes it Lookahead.

    Args:
        decay: per-step decay; an update every ``k`` steps uses ``decay ** k``.
        every_n_steps: optimizer steps between updates.
        ramp_power: the decay is scaled by ``(t / T) ** ramp_power`` (0: constant decay).
        write_back: reset the training weights to the average after every update.
        start_step: first optimizer step (0-based) that may update the average.
        use_buffers: average buffers (BatchNorm statistics) as well.
        device: where the average lives (default: with the model).
    """

    def __init__(self, decay: float = 0.95, every_n_steps: int = 5, ramp_power: float = 3.0,
                 write_back: bool = True, start_step: int = 0, use_buffers: bool = True,
                 device: str | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if ramp_power < 0:
            raise ValueError(f"ramp_power must be >= 0, got {ramp_power}")
        super().__init__(device=device, use_buffers=use_buffers)
        self.decay = float(decay)
        self.every_n_steps = int(every_n_steps)
        self.ramp_power = float(ramp_power)
        self.write_back = write_back
        self.start_step = int(start_step)
        self.total_steps: int | None = None
        self.current_decay = 0.0

    # ---------------------------------------------------------------- schedule
    def decay_at(self, step: int, total: int | None) -> float:
        """The decay of an update made after optimizer step ``step`` (1-based count) of ``total``."""
        base = self.decay ** self.every_n_steps
        if self.ramp_power == 0 or not total:
            return base
        return base * min(1.0, step / total) ** self.ramp_power

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        return step_idx >= self.start_step and (step_idx + 1) % self.every_n_steps == 0

    # ------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        self.total_steps = int(total) if total not in (None, float("inf")) else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.current_decay = self.decay_at(trainer.global_step, self.total_steps)
        # the base class's rule (step_idx is 0-based), with an update that reads nothing from the device
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self._update_average(pl_module)
            self._latest_update_step = trainer.global_step
            if self.write_back:
                self._copy_average_to_current(pl_module)

    @torch.no_grad()
    def _update_average(self, pl_module: L.LightningModule) -> None:
        """``AveragedModel.update_parameters`` (the first update copies, later ones average) with the first
        update told apart on the device: the torch version reads its update count back twice per update."""
        model = self._average_model
        assert model is not None
        averaged_tensors = [*model.module.parameters(), *(model.module.buffers() if self._use_buffers else ())]
        current_tensors = [*pl_module.parameters(), *(pl_module.buffers() if self._use_buffers else ())]
        # avg <- avg + (1 - decay) * (w - avg); the first update's weight is 1: lerp then returns w exactly
        weight = torch.where(model.n_averaged == 0, 1.0, 1.0 - self.current_decay)
        weights: dict[torch.dtype, Tensor] = {}
        for averaged, current in zip(averaged_tensors, current_tensors, strict=True):
            current = current.detach().to(averaged.device)
            if averaged.is_floating_point():
                if averaged.dtype not in weights:
                    weights[averaged.dtype] = weight.to(averaged.dtype)
                averaged.lerp_(current.to(averaged.dtype), weights[averaged.dtype])
            else:
                averaged.copy_(current)
        if not self._use_buffers:  # the buffers follow the training model
            for averaged, current in zip(model.module.buffers(), pl_module.buffers(), strict=True):
                averaged.copy_(current.detach().to(averaged.device))
        model.n_averaged += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._warn_if_stale(trainer.global_step)
        super().on_train_end(trainer, pl_module)

    def _warn_if_stale(self, steps: int) -> None:
        """A run so short that the averaged weights it keeps miss a large part of its training says so."""
        updated = int(self._latest_update_step or 0)  # the optimizer steps the average has seen
        missed = steps - updated
        if steps <= 0 or missed <= 0.1 * steps:
            return
        log.warning("the averaged weights this run keeps (and tests) were last updated at step %d of %d (every %d "
                    "steps): its last %d steps (%d%%) are not in them, so the test accuracy of a run this short can "
                    "lie far below its training accuracy; train more steps (more images or a smaller "
                    "data.batch_size)", updated, steps, self.every_n_steps, missed, round(100 * missed / steps))

    @torch.no_grad()
    def _copy_average_to_current(self, pl_module: L.LightningModule) -> None:
        super()._copy_average_to_current(pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Testing/validating/predicting from a checkpoint must use its state_dict (the average),
        # which Lightning has already loaded into the module. The base class would replace it with
        # the training weights (current_model_state) whenever an average model exists, e.g. when
        # trainer.test(ckpt_path=...) follows trainer.fit() with the same callback.
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "current_decay": self.current_decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.current_decay = state_dict.get("current_decay", 0.0)


class Lookahead(ScheduledAveraging):
    """:class:`ScheduledAveraging` with ``write_back=True``: the slow/fast weights of Lookahead."""

    def __init__(self, decay: float = 0.95, every_n_steps: int = 5, ramp_power: float = 3.0,
                 start_step: int = 0, use_buffers: bool = True, device: str | None = None) -> None:
        super().__init__(decay, every_n_steps, ramp_power, True, start_step, use_buffers, device)


class EMA(ScheduledAveraging):
    """:class:`ScheduledAveraging` with ``write_back=False``: an EMA used for validation, checkpoints and test."""

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, ramp_power: float = 0.0,
                 start_step: int = 0, use_buffers: bool = True, device: str | None = None) -> None:
        super().__init__(decay, every_n_steps, ramp_power, False, start_step, use_buffers, device)
