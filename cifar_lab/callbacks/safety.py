"""Run safety: stop on a non-finite loss, stop on Ctrl-C or SIGTERM with a resumable
checkpoint, resume with the same random state, and write checkpoints atomically.

``train()`` adds :func:`safety_callbacks` to every run and :func:`use_atomic_checkpoints`
to every trainer; nothing here needs configuring.

- :class:`NonFiniteLossGuard` keeps every training step's loss on its device and reads them at
  the steps the loggers write, at each epoch's end and before any checkpoint is written; a nan/inf
  loss raises :class:`NonFiniteLossError` naming its step, and no checkpoint is written after it.
  Checkpoints whose weights are not finite are refused too, so ``last.ckpt`` always holds the
  last good state.
- :class:`GracefulStop` turns the first Ctrl-C or SIGTERM into a stop after the current
  training batch (after the epoch's validation on its last batch) and saves
  ``checkpoints/last.ckpt`` from which ``ckpt_path=last`` continues exactly; a second
  Ctrl-C stops at once without saving. SIGUSR1 (SLURM's warning before a job's time limit)
  does the same and then requeues the job. Under DDP Lightning's own SIGTERM handling
  applies (every process stops after the same batch and the checkpoint is saved), SIGUSR1
  included.
- :class:`LatestCheckpoint` keeps ``last.ckpt`` at the latest completed epoch (Lightning
  refreshes it only when the monitored metric improves).
- :class:`ResumeRNG` saves the global torch/numpy/python RNG states with every checkpoint
  and restores them when training resumes (dropout masks continue as if never stopped).
- :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file next to its
  target, fsyncs it and renames it into place: a crash while saving leaves the previous
  file intact. (Lightning's own writer goes through the system temp directory and falls
  back to copying over the target when that is another filesystem.)
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_lab.callbacks.dispatch import SkipIdleHooks
from cifar_lab.errors import NonFiniteLossError, TrainingInterrupted
from cifar_lab.fileio import atomic_torch_save
from cifar_lab.module import logs_this_step
from cifar_lab.runs import identity

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "FitMetrics",
    "GracefulStop",
    "LatestCheckpoint",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ResumeRNG",
    "TrainingInterrupted",
    "last_checkpoint_path",
    "safety_callbacks",
    "use_atomic_checkpoints",
]

LAST_NAME = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION  # last.ckpt
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}
# SIGUSR1 is SLURM's warning before a job's time limit (#SBATCH --signal=USR1@90): save, then requeue the job
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def last_checkpoint_path(trainer: L.Trainer, default_dir: Path) -> Path:
    """``<ModelCheckpoint dirpath>/last.ckpt``, or ``default_dir/last.ckpt`` without one."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / LAST_NAME
    return Path(default_dir) / LAST_NAME


def _existing_checkpoint(trainer: L.Trainer, default_dir: Path) -> str | None:
    path = last_checkpoint_path(trainer, default_dir)
    return str(path) if path.is_file() else None


# ----------------------------------------------------------------------------- non-finite loss
class NonFiniteLossGuard(L.Callback):
    """Stop at the first nan/inf training loss, naming its step, without reading the device every step.

    Each step's loss is copied, on its device, into a buffer (one small copy: no synchronisation); the
    buffer is read at the steps the loggers write (:func:`~cifar_lab.module.logs_this_step`), at each
    epoch's last training batch (before validation, epoch metrics and checkpoints), before any
    checkpoint is written and when training ends. A non-finite loss there stops the run naming the
    first step whose loss was not finite; the steps after it (at most ``log_every_n_steps``) are
    trained, and thrown away: no checkpoint is written after that step. Under DDP the ranks agree on
    the first bad step at each read. Checkpoints whose weights are not finite (a finite loss with an
    inf gradient) are refused as well.
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self._losses: torch.Tensor | None = None       # the unread steps' losses, on the loss's device
        self._steps: list[tuple[int, int, int, Any]] = []  # epoch, batch, global step, lr of each unread loss

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        slot = len(self._steps)
        if self._losses is None or self._losses.device != loss.device:
            self._losses = torch.empty(64, device=loss.device)
        elif slot == len(self._losses):
            self._losses = torch.cat((self._losses, torch.empty_like(self._losses)))
        value = loss.detach()
        self._losses[slot].copy_(value.reshape(()) if value.numel() == 1 else value.sum())
        self._steps.append((trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx, trainer.global_step,
                            _learning_rate(trainer)))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if logs_this_step(trainer) or batch_idx + 1 >= trainer.num_training_batches:
            self.check(trainer, "training stopped at global step {now}; no checkpoint was written after it")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, "training stopped at global step {now}; no checkpoint was written after it")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, "training stopped at global step {now}; no checkpoint was written after it")

    def check(self, trainer: L.Trainer, consequence: str) -> None:
        """Read the losses since the last check (one read); raise NonFiniteLossError at the first non-finite one."""
        count, records = len(self._steps), self._steps
        if not count or self._losses is None:
            return
        self._steps = []
        values = self._losses[:count].tolist()
        first = next((i for i, v in enumerate(values) if not math.isfinite(v)), count)
        if trainer.world_size > 1:  # the first bad step of any rank (every rank checks at the same steps)
            agreed = trainer.strategy.reduce(torch.tensor(first, device=trainer.strategy.root_device), reduce_op="min")
            first = int(agreed)
        if first == count:
            return
        value = values[first]
        shown = "nan" if math.isnan(value) else ("inf" if math.isinf(value) else "not finite on another process")
        epoch, batch, step, lr = records[first]
        where = f"at epoch {epoch}, batch {batch} (global step {step})"
        raise NonFiniteLossError(self._message(trainer, f"training loss is {shown} {where}",
                                               consequence.format(now=trainer.global_step), lr))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.check(trainer, "the checkpoint of global step {now} was not written, so the last good one is kept")
        # Parameters and buffers (BatchNorm statistics) only: metric states such as a running
        # maximum legitimately start at -inf.
        weights = {name for name, _ in pl_module.named_parameters()} | {name for name, _ in pl_module.named_buffers()}
        for key, tensor in checkpoint.get("state_dict", {}).items():
            if key not in weights:
                continue
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                epoch_loop = trainer.fit_loop.epoch_loop
                where = (f"at epoch {trainer.current_epoch}, batch {max(epoch_loop.batch_idx, 0)} "
                         f"(global step {trainer.global_step})")
                raise NonFiniteLossError(self._message(
                    trainer, f"the weights are not finite ({key}) {where}",
                    "the checkpoint was not written, so the last good one is kept", _learning_rate(trainer)))

    def _message(self, trainer: L.Trainer, what: str, consequence: str, lr: Any) -> str:
        causes = []
        if lr is not None:
            causes.append(f"a learning rate too high for this model (now {lr:.3g}: lower optimizer.lr, "
                          "or warm up with scheduler=cosine_warmup)")
        precision = str(trainer.precision)
        if precision.startswith("16"):
            causes.append(f"float16 overflow (trainer.precision={precision}: try bf16-mixed or 32)")
        if not trainer.gradient_clip_val:
            causes.append("exploding gradients (set trainer.gradient_clip_val, e.g. 1.0)")
        causes.append("bad input values (check data.mean/data.std and the data)")
        last = _existing_checkpoint(trainer, self.checkpoint_dir)
        resume = (f"Last good checkpoint: {last} (resume with ckpt_path={last} once the cause is fixed)."
                  if last else "No checkpoint was written before this step.")
        return (f"{what}; {consequence}.\nLikely causes: " + "; ".join(causes) + f".\n{resume}")


def _learning_rate(trainer: L.Trainer) -> Any:
    """The first optimizer's learning rate now (None without an optimizer)."""
    return trainer.optimizers[0].param_groups[0].get("lr") if trainer.optimizers else None


# ----------------------------------------------------------------------------- Ctrl-C / SIGTERM
class GracefulStop(L.Callback):
    """First Ctrl-C or SIGTERM: finish the current batch, save ``last.ckpt``, stop.

    The stop goes through Lightning's SIGTERM path, which ends the loop right after a
    batch has fully completed (optimizer and scheduler steps, counters): the state a
    resumed run continues from exactly. On an epoch's last batch the stop waits until
    the epoch's validation has run. A second signal stops at once, without saving.
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signum: int | None = None       # the signal that asked to stop
        self.saved: str | None = None        # checkpoint written on the way out
        self.aborted = False                 # a second signal: stopped at once, nothing saved
        self.requeue: str | None = None      # what the requeue after SIGUSR1 did, in words
        self._requested = False
        self._forwarded = False
        self._lightning_sigterm: Any = None
        self._previous: dict[int, Any] = {}
        self._ours: Any = None               # the handler this callback installed
        self._agreeing = False               # DDP: processes agree on a SIGUSR1 after each batch

    # -------------------------------------------------------------- handlers
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its SIGTERM handler (and after the sanity check).
        self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
        if trainer.world_size > 1:
            self._usr1_as_sigterm()
            return
        try:
            self._ours = self._on_signal
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._ours)
        except ValueError:  # not the main thread: leave signals alone
            self._restore()

    def _usr1_as_sigterm(self) -> None:
        """DDP in a SLURM job: SIGUSR1 (the warning before the time limit, sent to every process) is noted here and
        agreed on by all processes after a batch (:meth:`_agree`), so they stop after the same batch through
        Lightning's SIGTERM path; on_exception saves, then rank 0 requeues. (Lightning's own SIGTERM handler
        broadcasts from inside the handler, which can meet another collective and hang.)"""
        if not os.environ.get("SLURM_JOB_ID"):
            return

        def on_usr1(signum: int, frame: Any) -> None:
            self._requested = True

        try:
            self._previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, on_usr1)
            self._ours = on_usr1
            self._agreeing = True
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def _agree(self, trainer: L.Trainer) -> None:
        """DDP: stop when any process got SIGUSR1 (one all-reduce of a flag per batch, in SLURM jobs only)."""
        if self._agreeing and trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            self._agreeing = False
            self.signum = signal.SIGUSR1
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException on every rank

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._requested:
            self.aborted = True
            self._restore()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._requested = True
        self.signum = signum
        print(f"\n{SIGNAL_NAMES.get(signum, signum)}: stopping after the current batch and saving a resumable "
              f"checkpoint ({SIGNAL_NAMES.get(signum, 'the signal')} again stops at once, without saving).",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        """The handlers found at the start, where ours is still installed. Lightning restores the handlers it
        found before its own at its teardown, which comes before the callbacks' teardown hook: putting
        back what this callback found (Lightning's SIGTERM handler) would leave that handler behind
        after the run, and a Python session that trained in-process would ignore SIGTERM from then on."""
        for signum, handler in self._previous.items():
            if handler is not None and signal.getsignal(signum) == self._ours:
                signal.signal(signum, handler)
        self._previous = {}

    def _forward(self, trainer: L.Trainer) -> None:
        """Hand the stop to Lightning, which raises SIGTERMException when the batch is done."""
        if not self._requested or self._forwarded:
            return
        self._forwarded = True
        handler = self._lightning_sigterm
        if callable(handler):
            handler(signal.SIGTERM, None)
        else:  # no Lightning handler (Windows): stop at the end of this epoch instead
            trainer.should_stop = True

    # ----------------------------------------------------------------- hooks
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # The last batch of an epoch is followed by validation: wait for on_train_epoch_end.
        if batch_idx + 1 < trainer.num_training_batches:
            self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_asked(trainer)

    def _stop_if_asked(self, trainer: L.Trainer) -> None:
        """One process: hand a signal to Lightning. Several: only the agreement, which every process joins at
        the same batch; Lightning's handler broadcasts, and a process that got SIGUSR1 before the others would
        start that broadcast alone, against their agreement (both hung until the process-group timeout)."""
        if trainer.world_size > 1:
            self._agree(trainer)
        else:
            self._forward(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return  # an error or a hard interrupt: the state may be half-updated; keep the last good file
        self.signum = self.signum or signal.SIGTERM
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        path = last_checkpoint_path(trainer, self.checkpoint_dir)
        # safe: this writes (never reads) our own full, resumable checkpoint; every load is weights_only=True
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = str(path)
        if self.signum == signal.SIGUSR1:
            # the requeue ends this job with SIGTERM: every process has saved, so each ignores it and exits
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            trainer.strategy.barrier("cifar_lab_requeue")
        if trainer.is_global_zero:
            log.info("saved a resumable checkpoint at epoch %d, global step %d: %s",
                     trainer.current_epoch, trainer.global_step, path)
            if self.signum == signal.SIGUSR1:
                self.requeue = identity.requeue_job()
                # said now: SLURM's SIGTERM for the requeued job may end this process before its last message
                print(self.requeue, file=sys.stderr, flush=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def interrupted(self, run_dir: Path, fallback: str | None = None) -> TrainingInterrupted:
        """The exception ``train()`` raises after an interrupted fit, with the resume command."""
        name = SIGNAL_NAMES.get(self.signum or signal.SIGTERM, "a signal")
        checkpoint = self.saved or fallback
        if self.aborted:
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
            message = f"training aborted by a second {name}, without saving; {kept}"
        elif checkpoint:
            how = (f"resume with: python train.py <same overrides> ckpt_path=last hydra.run.dir={run_dir} "
                   f"(or ckpt_path={checkpoint})")
            message = f"training stopped by {name}; resumable checkpoint: {checkpoint}\n{how}"
            if self.requeue:
                # SLURM ends the requeued job next (SIGTERM): everything is saved; let this process say so and exit
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            message = f"training stopped by {name} before any checkpoint was written"
        return TrainingInterrupted(message, self.signum or signal.SIGTERM, checkpoint)


# ----------------------------------------------------------------------------- latest state
class LatestCheckpoint(L.Callback):
    """Keep ``last.ckpt`` at the latest completed epoch.

    Lightning's ``save_last`` copies a checkpoint only when one is saved, and with a
    monitored ``save_top_k`` that is only when the metric improves: after a plateau,
    ``last.ckpt`` could be many epochs old and a crash would cost all of them. This writes
    it when an epoch is fully done (at the next epoch's start, so epoch-end scheduler
    steps are in it) and at the end of training, unless the ModelCheckpoint saved at that
    step already. Active when the run's ModelCheckpoint has ``save_last``.
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self._saved_step: int | None = None
        self._at_epoch_start = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._at_epoch_start:
            _as_new_epoch(checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # before Lightning restores its loops: a checkpoint written at an epoch's start by an earlier
        # version (the finished epoch's counters in it) resumes as the new epoch's start as well
        if _saved_at_epoch_start(checkpoint):
            _as_new_epoch(checkpoint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step  # the state a resumed run starts from is on disk already

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._at_epoch_start = True
        try:
            self._save(trainer)
        finally:
            self._at_epoch_start = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        callback = trainer.checkpoint_callback
        if not (isinstance(callback, ModelCheckpoint) and callback.save_last) or trainer.fast_dev_run:
            return
        if trainer.global_step == self._saved_step:
            return
        if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
            return  # the ModelCheckpoint saved at this very step, last.ckpt included
        # safe: a write of our own checkpoint (optimizer state included); loads use weights_only=True
        trainer.save_checkpoint(last_checkpoint_path(trainer, self.checkpoint_dir), weights_only=False)
        self._saved_step = trainer.global_step


def _saved_at_epoch_start(checkpoint: dict) -> bool:
    """Whether a checkpoint was saved in ``on_train_epoch_start`` (the epoch counted ready, not started)."""
    loop = checkpoint.get("loops", {}).get("fit_loop") if isinstance(checkpoint.get("loops"), dict) else None
    total = loop.get("epoch_progress", {}).get("total") if isinstance(loop, dict) else None
    if not isinstance(total, dict):
        return False
    try:
        ready, started, processed, completed = (int(total[k]) for k in ("ready", "started", "processed", "completed"))
    except (KeyError, TypeError, ValueError):
        return False
    return started == ready - 1 and processed == started and completed == processed


def _as_new_epoch(checkpoint: dict) -> None:
    """Record a checkpoint saved in ``on_train_epoch_start`` as the new epoch's start.

    Lightning resets the training epoch loop's per-epoch counters (batches, scheduler and optimizer
    steps of the epoch) only after that hook, so at that point they still describe the finished
    epoch: all of its batches done, ``is_last_batch``. Restored as they are, the resumed run takes
    the new epoch for finished too, trains nothing in it and skips its validation (and a later
    resume ends without ``val/*`` metrics). Here they are reset as Lightning resets them a moment
    later in the uninterrupted run, so the resume trains the epoch from its first batch.
    """
    from lightning.pytorch.loops.progress import _BatchProgress, _OptimizationProgress, _SchedulerProgress

    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(loop, dict):
        return
    for key, progress in (("epoch_loop.batch_progress", _BatchProgress()),
                          ("epoch_loop.scheduler_progress", _SchedulerProgress()),
                          ("epoch_loop.automatic_optimization.optim_progress", _OptimizationProgress())):
        if isinstance(loop.get(key), dict):
            progress.load_state_dict(loop[key])
            progress.reset_on_run()
            loop[key] = progress.state_dict()
    val_key = "epoch_loop.val_loop.batch_progress"
    if isinstance(loop.get(val_key), dict):
        val = _BatchProgress()
        val.load_state_dict(loop[val_key])
        val.total.reset()
        loop[val_key] = val.state_dict()


# ----------------------------------------------------------------------------- RNG state
def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _train_iterator_draws(trainer: L.Trainer) -> bool:
    """Whether each new training-loader iterator draws a seed from the global torch RNG.

    A DataLoader without its own generator does; with persistent workers the iterator is
    reused across epochs and draws only once.
    """
    loader = trainer.train_dataloader
    loaders = loader if isinstance(loader, (list, tuple)) else [loader]
    return any(isinstance(dl, torch.utils.data.DataLoader) and dl.generator is None
               and not dl.persistent_workers for dl in loaders)


class ResumeRNG(L.Callback):
    """Save the global RNG states with every checkpoint; restore them when training resumes.

    Lightning checkpoints weights, optimizer, schedulers and loop counters, not the global
    random state, which dropout, stochastic depth and per-image transforms draw from.
    Restored in ``on_train_start``, after the sanity check and the loader setup that a
    resumed run does and an uninterrupted one does not. A checkpoint saved after the last
    batch of an epoch also records that the uninterrupted run would create the next
    epoch's loader iterator (one draw) before training on: the resumed run replays it.
    """

    KEY = "cifar_lab_rng"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        checkpoint[self.KEY] = {
            "state": _rng_state(),
            "epoch_done": bool(batches >= trainer.num_training_batches),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(self.KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pending, self._pending = self._pending, None
        if not pending:
            return
        _set_rng_state(pending["state"])
        if pending.get("epoch_done") and _train_iterator_draws(trainer):
            torch.empty((), dtype=torch.int64).random_()  # the draw of the next epoch's iterator


# ----------------------------------------------------------------------------- metrics of the fit
class FitMetrics(L.Callback):
    """Save the training and validation metrics logged so far with every checkpoint.

    A run killed after its training (while testing or writing its results) resumes to a fit with
    nothing left to train, which logs no ``train/*`` or ``val/*`` metric: :attr:`restored` holds the
    ones its checkpoint recorded, for metrics.json and ``optimized_metric``.
    """

    KEY = "cifar_lab_fit_metrics"

    def __init__(self) -> None:
        self.restored: dict[str, float] = {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.KEY] = {
            name: float(value) for name, value in trainer.callback_metrics.items()
            if name.startswith(("train/", "val/")) and torch.is_tensor(value) and value.numel() == 1
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(self.KEY)
        self.restored = {str(k): float(v) for k, v in saved.items() if isinstance(v, (int, float))} \
            if isinstance(saved, dict) else {}


# ----------------------------------------------------------------------------- atomic writes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with temp-file-and-rename writes for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        protocol = get_filesystem(path).protocol
        local = "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))
        if storage_options is not None or not local:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def use_atomic_checkpoints(trainer: L.Trainer) -> bool:
    """Swap the trainer's default checkpoint writer for :class:`AtomicCheckpointIO`.

    Strategies with their own writer (sharded, asynchronous) are left alone; returns
    whether the writer was swapped.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


def safety_callbacks(checkpoint_dir: str | Path) -> list[L.Callback]:
    """The callbacks every training run gets (and per-batch dispatch only where a callback acts)."""
    return [SkipIdleHooks(), NonFiniteLossGuard(checkpoint_dir), GracefulStop(checkpoint_dir), LatestCheckpoint(checkpoint_dir),
            ResumeRNG(), FitMetrics()]
