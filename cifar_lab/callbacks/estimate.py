"""How long the run will take, said early in the first epoch and corrected once if it was off.

:class:`RunEstimate` times the first training steps and splits each into the network's forward
and backward pass (from the step's start to ``on_before_optimizer_step``) and the rest
(optimizer step, loading and augmenting the next batch, logging). Only the first part scales
with the image: FLOPs of a convolutional network grow with the pixel count, so an epoch that a
progressive-resizing schedule (:class:`cifar_lab.data.augment.ProgressiveResize`, anything with
a ``size_at(epoch)``) runs at 32 px costs ``(32 / 24) ** 2`` times the forward and backward of
one at 24 px. Validation and the test pass are forward passes of the full-size network, times the
views of a test-time augmentation callback active at test; a forward pass (with the views' flips
and shifts) takes :data:`EVAL_FRACTION` of a training step's forward and backward per image: more
than the third FLOPs suggest (a CPU runs the backward pass's large products efficiently)::

    time: about 1m 32s per epoch at 32 px (52s at 24 px), 9m 38s for 7 epochs and a 10-view test
    (measured on the first 20 steps)

When the first epoch (with its validation) then takes more than 25% (and a second) longer or
shorter than estimated (a busy machine, a network whose cost is not in its convolutions), one line says so
and gives the corrected time left.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import lightning as L

from cifar_lab.callbacks.progress import format_duration

__all__ = ["RunEstimate", "Plan", "EVAL_FRACTION"]

# Time of an evaluation forward pass per image / time of a training step's forward and backward per
# image: 0.56 measured for a small speedrun network on a 2-core Intel Xeon VM, one thread, 10-view
# test; FLOPs alone would say 1/3.
EVAL_FRACTION = 0.5


def _images(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _scheduled_sizes(datamodule: Any) -> list[Any]:
    """Ops of the training augmentation that schedule the image size per epoch (``size_at``)."""
    augment = getattr(datamodule, "train_augment", None)
    modules = augment.modules() if hasattr(augment, "modules") else []
    return [m for m in modules if callable(getattr(m, "size_at", None))]


def _limited(images: int, limit: Any, batch_size: int) -> int:
    """Images a loop sees under Lightning's ``limit_*_batches`` (a fraction or a batch count)."""
    if isinstance(limit, float):
        return int(images * limit)
    return min(images, int(limit) * batch_size)


def _split_size(datamodule: Any, split: str) -> int:
    splits = getattr(datamodule, "splits", None) or {}
    if split in splits:
        return len(splits[split][1])
    return 0


@dataclass
class Plan:
    """What the rest of the run will do, and the measured cost of its parts."""

    step_compute_s: float  # forward + backward of one training step at the measured size
    step_rest_s: float  # the rest of a step (optimizer, loading the next batch, logging)
    measured_size: int  # image side of the measured steps
    batch_images: int  # images in a measured training step
    native_size: int  # image side of validation and test (the data's)
    batches: int  # training steps per epoch
    epoch_sizes: dict[int, int]  # epoch -> image side of its training steps
    val_images: dict[int, int]  # epoch -> images validated at its end
    test_images: int
    test_views: int

    def step_s(self, size: int) -> float:
        return self.step_rest_s + self.step_compute_s * (size / self.measured_size) ** 2

    def eval_image_s(self) -> float:
        """One full-size forward pass of one image."""
        per_image = self.step_compute_s / max(1, self.batch_images) * EVAL_FRACTION
        return per_image * (self.native_size / self.measured_size) ** 2

    def epoch_s(self, epoch: int, steps: int | None = None) -> float:
        """Training (``steps`` of the epoch, default all) and the validation at its end."""
        steps = self.batches if steps is None else steps
        return steps * self.step_s(self.epoch_sizes[epoch]) + self.val_images.get(epoch, 0) * self.eval_image_s()

    def test_s(self) -> float:
        return self.test_images * self.test_views * self.eval_image_s()

    def remaining_s(self, epoch: int, steps_left: int) -> float:
        """From now (``steps_left`` steps into ``epoch``) to the end of the test."""
        later = sum(self.epoch_s(e) for e in self.epoch_sizes if e > epoch)
        return self.epoch_s(epoch, steps_left) + later + self.test_s()


class RunEstimate(L.Callback):
    """Early in the first epoch, say how long an epoch and the whole run will take (module docstring).

    Measured on the first ``min_steps`` training steps (at least ``fraction`` of the epoch; the
    first step, which pays for warm-up, is left out when the epoch has more). ``test``: whether
    the run tests after fitting. ``tolerance``: the relative error of the first epoch's estimate
    beyond which a corrected time is printed. After the test, :attr:`predicted_s` and
    :attr:`measured_s` hold the time from the estimate to the end of the test, as estimated
    and as it was. ``clock``: the clock it measures with (wall time; ``time.process_time`` leaves
    out what other processes on the machine take).
    """

    def __init__(self, min_steps: int = 10, fraction: float = 0.02, test: bool = True, tolerance: float = 0.25,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.min_steps, self.fraction, self.test, self.tolerance = min_steps, fraction, test, tolerance
        self.clock = clock
        self.stream = stream
        self.plan: Plan | None = None
        self.predicted_s: float | None = None
        self.measured_s: float | None = None
        self.corrected = False
        self.corrected_line: str | None = None
        self._epoch: int | None = None  # the epoch the estimate was made in
        self._partial_epoch: int | None = None  # an epoch this process joined partway (a resume)
        self._printed_at = 0.0
        self._epoch_start = self._step_start = 0.0
        self._closure_end: float | None = None
        self._loading = 0.0
        self._last_end: float | None = None
        self._compute: list[float] = []
        self._rest: list[float] = []

    # ------------------------------------------------------------------ timing the first steps
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resume in the middle of an epoch starts no epoch (no on_train_epoch_start): this process's time
        # starts here, and that epoch's time is no whole epoch to correct the estimate with
        self._epoch_start = self.clock()
        self._last_end = None
        self._partial_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self.clock()
        self._last_end = None
        self._partial_epoch = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_start = self.clock()
        # since the last step ended: loading and augmenting this batch, which the image size does not change
        self._loading = self._step_start - self._last_end if self._last_end is not None else 0.0
        self._closure_end = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._closure_end is None:
            self._closure_end = self.clock()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = self.clock()
        self._last_end = now
        if self.plan is not None or not trainer.is_global_zero:
            return
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:
            return
        closure_end = self._closure_end or now
        if batch_idx > 0 or batches <= 2:  # the first step pays for warm-up
            self._compute.append(closure_end - self._step_start)
            self._rest.append(now - closure_end + self._loading)
        steps = batch_idx + 1
        if not self._compute or (steps < max(self.min_steps, int(self.fraction * batches)) and steps < batches):
            return
        x = _images(batch)
        self.plan = self._plan(trainer, batches, int(x.shape[-1]), int(x.shape[0]))
        self._epoch = trainer.current_epoch
        self.predicted_s = self.plan.remaining_s(self._epoch, batches - steps)
        self._printed_at = now
        self._print(self._first_line(steps))

    def _plan(self, trainer: L.Trainer, batches: int, size: int, batch_images: int) -> Plan:
        datamodule = trainer.datamodule
        native = size
        if _split_size(datamodule, "train"):
            native = int(datamodule.splits["train"][0].shape[-1])
        schedules = _scheduled_sizes(datamodule)
        last = int(trainer.max_epochs or trainer.current_epoch + 1)
        epochs = range(trainer.current_epoch, max(last, trainer.current_epoch + 1))

        def size_at(epoch: int) -> int:
            for op in schedules:
                scheduled = op.size_at(epoch)
                if scheduled is not None:
                    return int(scheduled)
            return native

        eval_batch = int(getattr(datamodule, "eval_batch_size", None) or batch_images)
        val = _limited(_split_size(datamodule, "val"), trainer.limit_val_batches, eval_batch)
        every = int(getattr(trainer, "check_val_every_n_epoch", 1) or 1)
        test = _limited(_split_size(datamodule, "test"), trainer.limit_test_batches, eval_batch) if self.test else 0
        views = max([len(getattr(c, "views", ())) for c in trainer.callbacks
                     if callable(getattr(c, "applies_to", None)) and c.applies_to("test")] or [1])
        return Plan(step_compute_s=statistics.median(self._compute), step_rest_s=statistics.median(self._rest),
                    measured_size=size, batch_images=batch_images, native_size=native, batches=batches,
                    epoch_sizes={e: size_at(e) for e in epochs},
                    val_images={e: val for e in epochs if (e + 1) % every == 0},
                    test_images=test, test_views=views)

    # ------------------------------------------------------------------ what it says
    def _what(self, epochs: int) -> str:
        plan = self.plan
        assert plan is not None
        parts = [f"{epochs} epoch{'s' if epochs != 1 else ''}"] if epochs else []
        if epochs and any(plan.val_images.values()):
            parts[0] += " with validation"
        if plan.test_images:
            parts.append(f"a {plan.test_views}-view test" if plan.test_views > 1 else "the test")
        return " and ".join(parts) or "the end of training"

    def _first_line(self, steps: int) -> str:
        plan = self.plan
        assert plan is not None
        full = plan.epoch_s(max(plan.epoch_sizes, key=lambda e: (plan.epoch_sizes[e], e)))
        sizes = sorted(set(plan.epoch_sizes.values()))
        per_epoch = f"about {format_duration(full)} per epoch"
        if len(sizes) > 1:
            small = {s: plan.epoch_s(min(e for e in plan.epoch_sizes if plan.epoch_sizes[e] == s)) for s in sizes[:-1]}
            per_epoch += f" at {sizes[-1]} px (" + ", ".join(f"{format_duration(t)} at {s} px"
                                                               for s, t in small.items()) + ")"
        return (f"time: {per_epoch}, {format_duration(self.predicted_s or 0)} for "
                f"{self._what(len(plan.epoch_sizes))} (measured on the first {steps} steps)")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning calls this after the epoch's validation: the epoch the estimate was made in is complete
        if self.plan is None or self.corrected or trainer.current_epoch != self._epoch or not trainer.is_global_zero:
            return
        if self._partial_epoch == trainer.current_epoch:
            return  # resumed partway: this process trained only part of it
        self.corrected = True  # once
        took, estimated = self.clock() - self._epoch_start, self.plan.epoch_s(trainer.current_epoch)
        if estimated <= 0 or abs(took / estimated - 1) <= self.tolerance or abs(took - estimated) < 1.0:
            return
        later = [e for e in self.plan.epoch_sizes if e > trainer.current_epoch]
        left = (sum(self.plan.epoch_s(e) for e in later) + self.plan.test_s()) * took / estimated
        self.corrected_line = (f"time: the first epoch took {format_duration(took)}, not {format_duration(estimated)} "
                               f"as estimated; corrected: {format_duration(left)} left for {self._what(len(later))}")
        self._print(self.corrected_line)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.plan is not None and self.measured_s is None:
            self.measured_s = self.clock() - self._printed_at

    def eta_after(self, epoch: int, took: float) -> float | None:
        """Training time left after ``epoch``, which took ``took`` seconds: the plan's later epochs (at
        their scheduled sizes), scaled by how the finished epoch compared with its plan."""
        plan = self.plan
        if plan is None or epoch not in plan.epoch_sizes or plan.epoch_s(epoch) <= 0:
            return None
        return sum(plan.epoch_s(e) for e in plan.epoch_sizes if e > epoch) * took / plan.epoch_s(epoch)

    def record(self) -> dict[str, Any] | None:
        """From the estimate to the end of the test: estimated and measured seconds (metrics.json)."""
        if self.predicted_s is None:
            return None
        return {"predicted_s": round(self.predicted_s, 2),
                "measured_s": None if self.measured_s is None else round(self.measured_s, 2),
                "corrected_after_first_epoch": self.corrected_line is not None}

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)
