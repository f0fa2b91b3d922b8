"""The LightningModule that trains any classification network."""

from __future__ import annotations

import inspect
import time
from functools import partial
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lab.checkpoints import OVERRIDES_KEY
from cifar_lab.optim.schedules import INTERVALS as SCHEDULER_INTERVALS

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def split_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups with no weight decay on normalisation weights and biases.

    Decaying BatchNorm scales and biases only shrinks them toward zero, which hurts more
    than it regularises; many recipes exempt them.
    """
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Renormalize(nn.Module):
    """Batches normalised with one mean/std, renormalised to another: ``(x * std + mean - mean') / std'``."""

    def __init__(self, stats: Sequence[Sequence[float]], target: Sequence[Sequence[float]]) -> None:
        super().__init__()
        (mean, std), (to_mean, to_std) = (torch.tensor(s).view(2, 1, -1, 1, 1) for s in (stats, target))
        self.register_buffer("scale", std / to_std, persistent=False)
        self.register_buffer("shift", (mean - to_mean) / to_std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def distillation_loss(student: Tensor, teacher: Tensor, hard_loss: Tensor, temperature: float,
                      weight: float) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``(1 - weight) * hard_loss + weight * T^2 * KL``.

    ``KL`` is the batch mean of ``KL(softmax(teacher / T) || softmax(student / T))``; the ``T^2``
    keeps its gradients on the scale of the hard loss's as ``T`` changes.
    """
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - weight) * hard_loss + weight * t * t * soft


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers write the current training step's metrics: Lightning's own rule (every
    ``trainer.log_every_n_steps`` steps, and when the run stops), the same answer from ``training_step``
    to ``on_train_batch_end``. A training step reads values back from the device only then."""
    return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


class WeightedMean(MeanMetric):
    """torchmetrics' MeanMetric without its per-batch nan check, which reads a flag back from the device
    at every batch (a nan loss shows as nan). Its own ``nan_strategy="disable"`` drops the weights too,
    which made the test loss a mean of batch means."""

    def _cast_and_nan_check_input(self, x: Any, weight: Any = None) -> tuple[Tensor, Tensor]:
        x = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        weight = torch.ones_like(x) if weight is None else torch.as_tensor(weight, dtype=self.dtype, device=self.device)
        return x, weight


class EpochTotals:
    """Loss and top-1/top-k hits of the training batches of one epoch, summed in place on the device.

    The training step's replacement for three torchmetrics updates (``MeanMetric`` and two
    ``MulticlassAccuracy``): each update is Python work (state ``__setattr__`` on an
    ``nn.Module``, update counters, wrappers) that cost about 0.3 ms of a step, the largest
    part of Lightning's per-step overhead on a small network (docs/benchmarks.md). These are
    four additions into one tensor, with the same numbers: the loss is weighted by the batch
    size, top-1 is ``argmax`` as ``MulticlassAccuracy`` takes it, top-k counts a label among
    the k largest logits. Under DDP the sums are reduced over the ranks when read.
    """

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.sums: Tensor | None = None  # loss x images, top-1 hits, top-k hits
        self.images = 0

    def reset(self) -> None:
        self.sums, self.images = None, 0

    @torch.no_grad()
    def update(self, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        top1 = (logits.argmax(dim=1) == labels).sum()
        topk = (logits.topk(self.top_k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        step = torch.stack((loss.detach().float() * len(labels), top1.float(), topk.float()))
        self.sums = step if self.sums is None else self.sums.add_(step)
        self.images += len(labels)

    def values(self, reduce: Any = None) -> dict[str, Tensor]:
        """``loss``, ``acc`` and ``acc_top5`` of the epoch so far (``reduce``: a sum over the ranks)."""
        sums = self.sums if self.sums is not None else torch.zeros(3)
        totals = torch.cat((sums, sums.new_tensor([float(self.images)])))
        if reduce is not None:
            totals = reduce(totals)
        count = totals[3].clamp(min=1.0)
        return {"loss": totals[0] / count, "acc": totals[1] / count, "acc_top5": totals[2] / count}


class ClassifierModule(L.LightningModule):
    """Cross-entropy classification; loss and accuracy under ``train/`` (:class:`EpochTotals`' sums),
    ``val/`` and ``test/`` (torchmetrics).

    Targets may be class indices or soft label distributions (mixup/CutMix); accuracy under
    mixing is measured against each sample's dominant label.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        scheduler_interval: str = "epoch",
        scheduler_frequency: int = 1,
        scheduler_monitor: str = "val/loss",
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        no_decay_norm_and_bias: bool = False,
        memory_format: str = "channels_last",
        compile: bool = False,
        compile_mode: str | None = None,
        hparams: dict[str, Any] | None = None,
        run_overrides: list[str] | None = None,
        distill: dict[str, Any] | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"scheduler.interval must be one of {SCHEDULER_INTERVALS}, got {scheduler_interval!r}")
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"module.memory_format must be one of {tuple(MEMORY_FORMATS)} (auto is decided before "
                             f"the module is built), got {memory_format!r}")
        if not isinstance(compile, bool):
            raise ValueError(f"module.compile must be true or false (auto is decided before the module is built), "
                             f"got {compile!r}")
        # The composed run config goes into the checkpoint and TensorBoard's HPARAMS tab.
        self.save_hyperparameters(hparams or {}, logger=False)
        self.run_overrides = list(run_overrides or [])
        self.net = net.to(memory_format=MEMORY_FORMATS[memory_format])
        self.memory_format = memory_format
        self.channels_last = memory_format == "channels_last"
        if compile:
            # in place (nn.Module.compile): the state_dict keeps one copy of each parameter under net.*
            self.net.compile(mode=compile_mode)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_frequency = scheduler_frequency
        self.scheduler_monitor = scheduler_monitor
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.no_decay_norm_and_bias = no_decay_norm_and_bias
        # knowledge distillation: {teacher, temperature, weight}; the teacher network
        # (cifar_lab.builders.build_teacher) is frozen and not part of this module's state
        self.distill = dict(distill or {})
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self._teacher: tuple[nn.Module, ...] = (teacher,) if teacher is not None else ()

        top5 = min(5, num_classes)
        self.train_totals = EpochTotals(top5)  # training: sums in place (EpochTotals says why)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
            setattr(self, f"{stage}_acc_top5", MulticlassAccuracy(num_classes, top_k=top5, average="micro"))
            setattr(self, f"{stage}_loss", WeightedMean())
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives resume, so val/acc_best stays right
        # Training time spent before this fit: 0 for a new run, the checkpoint's elapsed_s when
        # resuming. Checkpoints store it plus the time since this fit started, so a run resumed
        # any number of times (even after being killed) knows its total training time.
        self.elapsed_s = 0.0
        self._fit_started: float | None = None

    # Lightning calls these six module hooks at every training step whether a module defines them or
    # not, each inside a profiler context with two __setattr__ of _current_fx_name (about 7 us a call);
    # a non-callable one it skips (lightning.pytorch.trainer.call: `if not callable(fn): return None`).
    # This module acts in none of them; a subclass may define any. (The evaluation loops' batch hooks
    # stay: Lightning inspects their signatures.)
    on_train_batch_start = on_train_batch_end = on_before_backward = on_after_backward = None
    on_before_optimizer_step = on_before_zero_grad = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name (a string) before and after every hook, callback and
        # strategy call: about 40 times a training step. nn.Module.__setattr__ checks each value
        # against parameters, modules and buffers (2.5 us here, 0.4 us for a plain attribute).
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen network this module distils from (None: no distillation)."""
        return self._teacher[0] if self._teacher else None

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        if self.distill.get("teacher") and self.teacher is None:
            raise RuntimeError("module.distill.teacher is set but no teacher network was built (builders.build_teacher)")
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def training_elapsed_s(self) -> float:
        """Training time so far: earlier segments (restored on resume) plus this fit's."""
        running = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        return self.elapsed_s + running

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The training command's overrides: evaluate and predict replay them to rebuild the config.
        checkpoint[OVERRIDES_KEY] = list(self.run_overrides)
        checkpoint["elapsed_s"] = round(self.training_elapsed_s(), 3)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Restored when resuming (or loading outside a Trainer); loading the best checkpoint
        # for testing must not replace the time of the run's earlier segments.
        if self._trainer is not None and self.trainer.state.fn != "fit":
            return
        elapsed = checkpoint.get("elapsed_s")
        self.elapsed_s = float(elapsed) if isinstance(elapsed, (int, float)) else 0.0

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        x, target = batch
        logits = self(x)
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
        if stage == "train" and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            loss = distillation_loss(logits, teacher_logits, loss, self.distill.get("temperature", 4.0),
                                     self.distill.get("weight", 0.9))
        labels = target.argmax(dim=1) if target.ndim == 2 else target
        if stage == "train":
            self.train_totals.update(loss, logits.detach(), labels)
            return loss, logits, labels
        preds = logits.detach().float()
        loss_mean, acc, acc_top5 = (getattr(self, f"{stage}_{name}") for name in ("loss", "acc", "acc_top5"))
        loss_mean.update(loss.detach(), len(x))
        acc.update(preds, labels)
        acc_top5.update(preds, labels)
        return loss, logits, labels

    def on_train_epoch_start(self) -> None:
        self.train_totals.reset()

    def _log_stage(self, stage: str) -> None:
        if stage == "train":  # summed over the ranks here, so every rank logs the whole epoch's figures
            ranks = self.trainer.world_size > 1
            reduce = partial(self.trainer.strategy.reduce, reduce_op="sum") if ranks else None
            for name, value in self.train_totals.values(reduce).items():  # (the mean of equal values: the same)
                self.log(f"train/{name}", value, on_step=False, on_epoch=True, sync_dist=ranks)
            return
        for name in ("loss", "acc", "acc_top5"):
            metric = getattr(self, f"{stage}_{name}")
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True,
                     prog_bar=stage == "val" and name == "acc", sync_dist=False)  # the bar fits 80 columns

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits, labels = self._shared_step(batch, "train")
        # Each self.log call costs about a millisecond of Python, as much as a small model's
        # whole step on a CPU. So the epoch metrics (accumulated by update() every step) are
        # logged on the epoch's last batch only, where callbacks' on_train_epoch_end sees them,
        # and the per-step loss and batch accuracy only on the steps the logger writes. Not as
        # prog_bar values: Lightning converts those to numbers (a read from the device) after every
        # batch; the bar reads train/loss_step itself when it changes (CompactRichProgressBar).
        trainer = self.trainer
        if batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= self.global_step + 1:
            self._log_stage("train")
        if logs_this_step(trainer):
            correct = (logits.detach().argmax(dim=1) == labels).float().mean()
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
            self.log("train/acc_step", correct, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        loss, logits, labels = self._shared_step(batch, "val")
        self._log_stage("val")
        return {"loss": loss, "logits": logits, "labels": labels}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # sanity batches must not count towards the best
            return
        self.val_acc_best.update(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        loss, logits, labels = self._shared_step(batch, "test")
        self._log_stage("test")
        return {"loss": loss, "logits": logits, "labels": labels}

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).float().softmax(dim=1)

    # ------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        params: Any = self.net.parameters()
        if self.no_decay_norm_and_bias:
            params = split_weight_decay(self.net, self.optimizer_factory.keywords.get("weight_decay", 0.0))
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, **self._scheduler_length_kwargs())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.scheduler_interval,
                "frequency": self.scheduler_frequency,
                "monitor": self.scheduler_monitor,
            },
        }

    def _scheduler_length_kwargs(self) -> dict[str, int]:
        """Fill in ``total_steps`` / ``steps_per_epoch`` when the scheduler asks and the config left them out."""
        accepted = inspect.signature(self.scheduler_factory.func).parameters
        given = self.scheduler_factory.keywords
        kwargs: dict[str, int] = {}
        if "total_steps" in accepted and given.get("total_steps") is None:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        if "steps_per_epoch" in accepted and given.get("steps_per_epoch") is None:
            kwargs["steps_per_epoch"] = max(1, int(self.trainer.estimated_stepping_batches) // max(1, self.trainer.max_epochs or 1))
        return kwargs
