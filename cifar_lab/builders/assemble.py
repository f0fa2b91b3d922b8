"""Assemble: every object of a command, built once from a settled config and the command's role.

:func:`assemble` is the one place a module, datamodule, Trainer, callbacks and loggers are built
(:mod:`cifar_lab.builders.settle` has made every value final before). What differs by role are
steps of this function, taken or refused by name: the starting weights (``init_from``, or the
checkpoint evaluate tests), the distillation teacher, a resume's callbacks (safety, compute,
restored-state guard) and atomic checkpoints, the callbacks kept, the loggers, and the finders'
own Trainer arguments. Nothing is changed on a built object afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cifar_lab import builders, checkpoints
from cifar_lab.builders.settle import EVALUATE, RESUME, SWEEP_TRIAL, TRAIN, Settled
from cifar_lab.callbacks.checkpoint_state import CheckpointStateGuard
from cifar_lab.callbacks.compute import TrainingCompute
from cifar_lab.callbacks.reports import ClassificationReport
from cifar_lab.callbacks.safety import safety_callbacks, use_atomic_checkpoints
from cifar_lab.callbacks.tta import TTACallback, replace_run_tta
from cifar_lab.module import ClassifierModule

TRAINING = (TRAIN, RESUME, SWEEP_TRIAL)
# Callbacks that only report or save: the roles without reporting (the finders, the bench) leave them out
REPORTING = (ModelCheckpoint, LearningRateMonitor, ProgressBar, ModelSummary, EarlyStopping, ClassificationReport,
             TTACallback)


@dataclass
class Assembly:
    """A command's objects, built from ``settled`` (``trainer`` None for a role without one: the bench)."""

    settled: Settled
    module: ClassifierModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer | None
    callbacks: list
    loggers: list


def assemble(settled: Settled, run_dir: Path | None = None, checkpoint_dir: Path | None = None,
             extra_callbacks: tuple[L.Callback, ...] = (), **trainer_settings: Any) -> Assembly:
    """Build ``settled``'s objects for its role. ``checkpoint_dir``: a training run's checkpoints (its safety
    callbacks save there); ``extra_callbacks``: a command's own (the batch-size finder's memory budget);
    ``trainer_settings``: a finder's own Trainer arguments (its step limits) over the config's."""
    cfg, role = settled.cfg, settled.role
    module = builders.build_module(cfg, teacher=builders.build_teacher(cfg) if role.teacher else None,
                                   load_weights=_starting_weights(settled))
    datamodule = builders.build_datamodule(cfg, read=settled.data)  # the data settle read, not read again
    if not role.trainer:
        return Assembly(settled, module, datamodule, None, [], [])
    callbacks = [*_callbacks(settled, checkpoint_dir), *extra_callbacks]
    loggers = builders.build_loggers(cfg) if role.loggers else []
    if not role.reporting:  # the finders train a few steps in a directory of their own
        trainer_settings = {"enable_checkpointing": False, "enable_model_summary": False,
                            "default_root_dir": str(run_dir), **trainer_settings}
    trainer = builders.build_trainer(cfg, callbacks, loggers, **trainer_settings)
    if role in TRAINING:
        use_atomic_checkpoints(trainer)
    return Assembly(settled, module, datamodule, trainer, callbacks, loggers)


def _starting_weights(settled: Settled) -> Any:
    """The network's first weights: evaluate's checkpoint, else init_from where the role uses it, else none."""
    cfg = settled.cfg
    if settled.trained is not None:
        path, checkpoint = settled.trained
        return lambda net: checkpoints.load_network_weights(net, checkpoint, path)
    if cfg.get("init_from") and settled.role.init_from == "used":
        return lambda net: checkpoints.load_weights_from(cfg.init_from, net, cfg)
    return None


def _callbacks(settled: Settled, checkpoint_dir: Path | None) -> list[L.Callback]:
    """The config's callbacks as the role keeps them; a training run's safety, compute and restored-state guard;
    evaluate's test-time augmentation (``tta.*``)."""
    cfg, role = settled.cfg, settled.role
    callbacks = builders.build_callbacks(cfg)
    if not role.reporting:
        callbacks = [c for c in callbacks if not isinstance(c, REPORTING)]
    if role in TRAINING:
        assert checkpoint_dir is not None, "a training run's checkpoint folder"
        # every run counts its compute (metrics.json `compute`), whatever callbacks the config chose, and a
        # resume restores no callback state that names a path outside the run's checkpoint folder
        resumed = settled.resume.path if settled.resume else None
        callbacks += [*safety_callbacks(checkpoint_dir), TrainingCompute(),
                      CheckpointStateGuard(checkpoint_dir, resumed)]
    if role == EVALUATE:
        callbacks = _with_requested_tta(cfg, callbacks)
    return callbacks


def _with_requested_tta(cfg: DictConfig, callbacks: list) -> list:
    """``tta.enabled=true`` adds evaluate's TTA; it replaces the run's own TTA layer (one layer, never stacked)."""
    tta = cfg.get("tta") or {}
    if not tta.get("enabled", False):
        return callbacks
    shifts = tta.get("shifts")
    requested = TTACallback(flip=bool(tta.get("flip", True)), translate=int(tta.get("translate", 0)),
                            shifts=OmegaConf.to_container(shifts) if shifts is not None else None,
                            padding_mode=str(tta.get("padding_mode", "reflect")), stages=("test",))
    callbacks, replaced = replace_run_tta(callbacks, requested)
    if replaced and rank_zero_only.rank == 0:
        print(f"tta: evaluate's {len(requested.views)} views (tta.*) replace the run's own test-time augmentation "
              f"({'; '.join(c.describe() for c in replaced)}): one layer, never stacked", flush=True)
    return callbacks
