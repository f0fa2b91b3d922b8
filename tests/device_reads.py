"""Count the reads of tensor values back to the host (device synchronisations on a GPU) per training step.

On a GPU each such read makes the CPU wait for the GPU to finish all queued work, and then the GPU
wait for the CPU to queue the next step. On the CPU nothing waits, but the same calls happen, so
counting them here proves the GPU path free of them. :class:`DeviceReads` is a ``TorchFunctionMode``
that records every call in :data:`READS` (and boolean-mask indexing, whose result size the host
must read) with its call site; :class:`StepWindows`, a callback, cuts the record into training
steps (from one ``on_train_batch_start`` to the next) and test batches, so a test can ask which
steady-state steps read anything.

torch.optim's step counters (``state["step"]``, CPU tensors also on a GPU run, read by the
optimizer's own Python) are not device reads and are left out by identity.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.overrides import TorchFunctionMode

# Calls whose result the host must have: a value, a Python number or list, a host copy, a size that
# depends on the data (nonzero and friends), or text printed from the values.
_READ_NAMES = ("item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "tolist", "cpu", "numpy",
               "__format__", "__repr__", "__str__", "nonzero", "argwhere", "masked_select", "unique")
READS = {getattr(torch.Tensor, name) for name in _READ_NAMES} | {torch.nonzero, torch.argwhere,
                                                                 torch.masked_select, torch.unique}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_TORCH = str(Path(torch.__file__).parent) + os.sep  # torch/, not torchmetrics/
_HERE = str(Path(__file__).resolve())


def _bool_mask(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool and p.ndim > 0 for p in parts)


def call_site() -> str:
    """``file:line in function`` of the innermost frame outside torch and this file, then the innermost
    frame of cifar_lab or the tests when that is another (the code to change)."""
    frames = [f for f in traceback.extract_stack()[:-1]
              if not f.filename.startswith(_TORCH) and str(Path(f.filename).resolve()) != _HERE]
    if not frames:
        return "<unknown>"
    inner = frames[-1]
    ours = next((f for f in reversed(frames) if "cifar_lab" in f.filename or "/tests/" in f.filename), None)
    site = f"{inner.filename}:{inner.lineno} in {inner.name}"
    if ours is not None and ours is not inner:
        site += f" (from {ours.filename}:{ours.lineno} in {ours.name})"
    return site


class DeviceReads(TorchFunctionMode):
    """Records ``(function name, call site)`` of every read while :attr:`recording`; the tensors in
    :attr:`excluded` (ids of optimizer step counters) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.excluded: set[int] = set()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.recording and args and torch.is_tensor(args[0]) and id(args[0]) not in self.excluded:
            if func in READS or (func in _INDEXING and len(args) > 1 and _bool_mask(args[1])):
                self.reads.append((getattr(func, "__name__", str(func)), call_site()))
        return func(*args, **(kwargs or {}))


@dataclass
class Window:
    """The reads of one training step (or test batch) and whether its step logs (reads allowed there)."""

    stage: str
    epoch: int
    batch_idx: int
    step: int                      # training steps taken in this process before this one
    logs: bool = False
    reads: list[tuple[str, str]] = field(default_factory=list)


class StepWindows(L.Callback):
    """Cuts :class:`DeviceReads`' record into one :class:`Window` per training step and test batch.

    A training step's window runs from its ``on_train_batch_start`` to the next one's, so it holds the
    fetch and augmentation of the next batch too; a step whose epoch ends after it (validation, epoch
    metrics, checkpoints) or that the logger writes at is marked, and so is any step of the first
    ``warmup``. Test windows run from one ``on_test_batch_start`` to the next (the last: to the epoch's end).
    """

    def __init__(self, reads: DeviceReads, warmup: int = 5) -> None:
        self.mode, self.warmup = reads, warmup
        self.windows: list[Window] = []
        self._open: Window | None = None
        self._steps = 0

    def _close(self) -> None:
        if self._open is not None:
            self._open.reads = list(self.mode.reads)
            self.windows.append(self._open)
        self._open = None
        self.mode.recording = False
        self.mode.reads = []

    def _start(self, window: Window) -> None:
        self._close()
        self._open = window
        self.mode.recording = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # ids of the optimizers' CPU step counters, taken while nothing records (their tensors are replaced
        # only when a state is created)
        self.mode.recording = False
        self.mode.excluded = {id(s["step"]) for opt in trainer.optimizers for s in opt.state.values()
                              if torch.is_tensor(s.get("step")) and s["step"].device.type == "cpu"}
        self._start(Window("train", trainer.current_epoch, batch_idx, self._steps))
        self._steps += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._open is not None:
            # Lightning's rule for a step the logger writes (the loop counts the step after this hook)
            self._open.logs = trainer._logger_connector.should_update_logs
            if batch_idx + 1 >= trainer.num_training_batches:
                self._open.logs = True  # the epoch ends: its metrics, validation and checkpoints follow

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()  # a validation in the middle of an epoch (val_check_interval) is no training step's

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start(Window("val", trainer.current_epoch, batch_idx, batch_idx))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last()

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._start(Window("test", trainer.current_epoch, batch_idx, batch_idx))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last()

    def _last(self) -> None:
        if self._open is not None:
            self._open.logs = True  # the last batch: the epoch's results are read after it
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()

    def steady(self, stage: str = "train") -> list[Window]:
        """The windows of ``stage`` after the warm-up that do not log (where no read is allowed)."""
        return [w for w in self.windows if w.stage == stage and w.step >= self.warmup and not w.logs]

    def offending(self, stage: str = "train") -> list[str]:
        """One line per read in a steady window: where it is and which step."""
        return [f"{stage} epoch {w.epoch} batch {w.batch_idx}: {name} at {site}"
                for w in self.steady(stage) for name, site in w.reads]
