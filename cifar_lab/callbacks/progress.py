"""What a run shows on the console while it trains.

* :class:`CompactRichProgressBar`: Lightning's rich bar, fitted to 80 columns.
* :class:`EpochLines`: a log file, CI or a cluster job captures a rich bar only as its final
  state (or as control characters), so when stdout is not a terminal the builders replace the
  bar with one plain line per epoch::

      epoch 3/30  12.4 s  train loss 1.234 acc 0.562  val loss 1.101 acc 0.611  ETA 5m 34s

* :class:`cifar_lab.callbacks.estimate.RunEstimate` (its own module): early in the first epoch, how
  long an epoch and the run will take.
* :class:`CompactModelSummary`: the network's layers and size, without the metric objects
  and without a FLOPs column that would read 0 (Lightning counts FLOPs only from an
  ``example_input_array``, which would go through the datamodule's uint8 batch path).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import (
    BatchesProcessedColumn,
    CustomBarColumn,
    CustomTimeColumn,
)
from rich.progress import TextColumn

from cifar_lab.console import PassProgress, format_duration

__all__ = ["CompactModelSummary", "CompactRichProgressBar", "EpochLines", "TestLines", "format_duration",
           "interactive"]


def interactive(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stdout) is a terminal."""
    stream = stream or sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _pair(metrics: dict[str, Any], stage: str) -> str:
    """``train loss 1.234 acc 0.562``, only the values the stage logged ("" when none)."""
    values = [f"{name} {float(metrics[f'{stage}/{name}']):.3f}" for name in ("loss", "acc")
              if metrics.get(f"{stage}/{name}") is not None]
    return f"{stage} {' '.join(values)}" if values else ""


class EpochLines(L.Callback):
    """One line per finished epoch: time, train and val loss/accuracy, and the ETA of the run.

    Only values the epoch logged are shown; a run without validation says ``no validation``. The
    ETA follows :class:`~cifar_lab.callbacks.estimate.RunEstimate`'s plan when the run has one (so
    epochs a schedule trains at a larger image size count as such).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._epoch_start = 0.0
        self._durations: list[float] = []
        self._first_batch: int | None = 0  # the epoch's first batch this process trained (None: none yet)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume in the middle of an epoch (or after its batches) starts no epoch: Lightning calls no
        # on_train_epoch_start, and this process's time starts here.
        self._epoch_start = time.perf_counter()
        self._first_batch = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._first_batch = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._first_batch is None:
            self._first_batch = batch_idx

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning calls this after the epoch's validation, so val/* are this epoch's values
        self._print_epoch(trainer)

    def _print_epoch(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        # this process's time only: a resumed epoch counts the batches trained here, scaled to a whole epoch
        elapsed = time.perf_counter() - self._epoch_start
        batches = trainer.num_training_batches
        first = self._first_batch
        took = f"{elapsed:.1f} s"
        full = elapsed
        if first is None:  # its batches were trained before the resume
            took, full = "trained before the resume", None
        elif first > 0 and isinstance(batches, int) and batches > first:
            took = f"{elapsed:.1f} s for {batches - first}/{batches} batches (resumed)"
            full = elapsed * batches / (batches - first)
        if full is not None:
            self._durations.append(full)
        metrics = {k: v for k, v in trainer.callback_metrics.items()}
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        left = max(0, (total or epoch) - epoch)
        # the run-time estimate knows the epochs' scheduled image sizes; else the mean of the last epochs
        planned = [c.eta_after(trainer.current_epoch, full) for c in trainer.callbacks
                   if hasattr(c, "eta_after") and full is not None]
        eta: float | None = next((t for t in planned if t is not None), None)
        if eta is None and self._durations:
            eta = left * sum(self._durations[-3:]) / len(self._durations[-3:])
        validated = _pair(metrics, "val") or ("no validation" if trainer.limit_val_batches == 0 else "")
        parts = [f"epoch {epoch}/{total}", took, _pair(metrics, "train"), validated,
                 f"ETA {format_duration(eta)}" if eta is not None else ""]
        line = "  ".join(part for part in parts if part)
        print(line, file=self.stream or sys.stdout, flush=True)


class TestLines(L.Callback):
    """Without a progress bar, the test pass (``N`` views per image with TTA) says how far it is
    (:class:`cifar_lab.console.PassProgress`), so a long evaluation is never silent."""

    def __init__(self, every_s: float | None = None, stream: TextIO | None = None) -> None:
        self.every_s, self.stream = every_s, stream
        self._progress: PassProgress | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = sum(int(n) for n in trainer.num_test_batches if n != float("inf")) or 1
        views = max([len(getattr(c, "views", ())) for c in trainer.callbacks
                     if callable(getattr(c, "applies_to", None)) and c.applies_to("test")] or [1])
        label = f"test ({views} views per image)" if views > 1 else "test"
        self._progress = PassProgress(label, total, "batches", self.every_s, self.stream) \
            if trainer.is_global_zero else None

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._progress is not None:
            self._progress.advance()


class CompactRichProgressBar(RichProgressBar):
    """Lightning's rich bar, fitted to an 80-column terminal.

    A shorter bar, no items/s column (the time column says as much), and short metric names
    (``loss`` for the step's training loss, ``val_acc``): Lightning's own layout wraps at 80
    columns, putting each value next to the following metric's name.
    """

    SHORT_NAMES = {"train/loss_step": "loss", "val/acc": "val_acc"}
    # logged values the bar shows besides Lightning's prog_bar ones, read only when a new one is logged
    SHOWN = ("train/loss_step",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read: dict[str, tuple[Any, float]] = {}  # name -> (the logged tensor, its value)

    def configure_columns(self, trainer: L.Trainer) -> list:
        return [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(bar_width=12, complete_style=self.theme.progress_bar,
                            finished_style=self.theme.progress_bar_finished, pulse_style=self.theme.progress_bar_pulse),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            CustomTimeColumn(style=self.theme.time),
        ]

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = {**super().get_metrics(trainer, pl_module), **self._logged(trainer)}
        return {self.SHORT_NAMES.get(k, k): v for k, v in metrics.items() if k != "v_num"}

    def _logged(self, trainer: L.Trainer) -> dict[str, float]:
        """The :attr:`SHOWN` values the module logged, each read from the device once: the module logs
        a new tensor only at the steps the loggers write, so the bar refreshed after every batch costs
        no read in between."""
        for name in self.SHOWN:
            value = trainer.logged_metrics.get(name)
            if value is not None and (name not in self._read or self._read[name][0] is not value):
                self._read[name] = (value, float(value))
        return {name: number for name, (_, number) in self._read.items()}


class CompactModelSummary(RichModelSummary):
    """The network's layers and parameter counts; metric objects and an all-zero FLOPs count left out."""

    @staticmethod
    def summarize(summary_data: list, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = dict(summary_data)
        shown = [name for name in columns if name not in ("Mode",) and (name != "FLOPs" or total_flops)]
        rows = [row for row in zip(*(columns[name] for name in shown))
                if not str(dict(zip(shown, row)).get("Type", "")).endswith(("Metric", "Accuracy"))]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name in shown:
            table.add_column(" " if name == " " else name, justify="right" if name in ("Params", "FLOPs") else "left")
        for row in rows:
            table.add_row(*row)
        console = get_console()
        console.print(table)
        size = get_formatted_model_size(model_size)
        def count(n: float) -> str:
            return get_human_readable_count(int(n)).strip()

        line = (f"Params: {count(trainable_parameters)} trainable, "
                f"{count(total_parameters - trainable_parameters)} frozen; {size} MB")
        if total_flops:
            line += f"; {count(total_flops)} FLOPs"
        console.print(line)
