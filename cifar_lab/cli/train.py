"""Training: validate, seed, build, fit, test the best checkpoint, write metrics.json.

``train(cfg)`` raises the errors a user can fix as one-message exceptions
(:mod:`cifar_lab.errors`): a bad config value, a checkpoint that does not fit the config or
holds an unsafe saved config, missing or broken data, a diverged loss, and Ctrl-C/SIGTERM
(after saving a resumable checkpoint). :func:`main_guarded` is the command line's job
function: it runs ``train`` through the sweep runner and prints just the message.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from cifar_lab import autotune, builders
from cifar_lab.callbacks.compute import TrainingCompute
from cifar_lab.callbacks.safety import GracefulStop, safety_callbacks, use_atomic_checkpoints
from cifar_lab.checkpoints import Resume, load_weights_from, prepare_resume
from cifar_lab.config.schema import validate_config
from cifar_lab.cli import console
from cifar_lab.cli.summary import scalars, write_summary
from cifar_lab.config.tree import print_and_save
from cifar_lab.errors import ConfigError, TrainingInterrupted, exit_on_config_error, exit_on_user_error
from cifar_lab.host import keep_freed_memory
from cifar_lab.run_dir import RunDirLock, disk_full_error, holds_run, relative_to_run, save_hydra_files

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (the run directory)."""
    return Path(cfg.paths.output_dir)


def checkpoint_dir_of(cfg: DictConfig) -> Path:
    """Where this run's checkpoints go: the model_checkpoint callback's dirpath, else <run>/checkpoints."""
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    return Path(dirpath) if dirpath else run_dir_of(cfg) / "checkpoints"


# ----------------------------------------------------------------------------- training
def _choices() -> dict[str, str]:
    try:
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    except ValueError:  # not inside a Hydra app (tests calling train() directly)
        return {}


def _quiet_other_ranks() -> None:
    """Info messages once per run: other DDP ranks log warnings and errors only."""
    if rank_zero_only.rank != 0:
        logging.getLogger("cifar_lab").setLevel(logging.WARNING)


def _last_good(cfg: DictConfig, resume: Resume | None) -> str | None:
    """This run's last.ckpt, else its newest checkpoint, else the checkpoint it resumed from."""
    folder = checkpoint_dir_of(cfg)
    last = folder / "last.ckpt"
    if last.is_file():
        return str(last)
    saved = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if saved:
        return str(saved[-1])
    return resume.path if resume else None


def train(cfg: DictConfig) -> float | None:
    """Run one training job as configured; return the metric named by ``optimized_metric``."""
    start = time.perf_counter()
    validate_config(cfg)
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError("ckpt_path and init_from exclude each other: ckpt_path resumes a run (optimizer and "
                          "schedule included), init_from starts a new run from a checkpoint's weights only")
    resume = prepare_resume(cfg, checkpoint_dir_of(cfg))
    run_dir = run_dir_of(cfg)
    # Nothing in the run directory changes before this point: a refused command leaves it as it was.
    lock = RunDirLock(run_dir).acquire() if rank_zero_only.rank == 0 else None
    try:
        return _train(cfg, run_dir, resume, start)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path, resume: Resume | None, start: float) -> float | None:
    _quiet_other_ranks()
    L.seed_everything(cfg.seed, workers=True, verbose=rank_zero_only.rank == 0)
    # Everything cheap first, so a value torch or Lightning refuses stops the run in seconds,
    # before any data is read (builders turn their errors into one ConfigError).
    module = builders.build_module(cfg)
    # trainer.precision / module.memory_format `auto`: measured (or cached) before the Trainer exists
    tuned = autotune.decide(cfg, run_dir, resume.config if resume else None, rank=rank_zero_only.rank)
    module.set_memory_format(tuned.memory_format)
    if isinstance(module.hparams.get("trainer"), dict):
        module.hparams["trainer"]["precision"] = tuned.precision  # the checkpoint records the choice
    if cfg.get("init_from"):
        load_weights_from(cfg.init_from, module.net, cfg)
    safety = safety_callbacks(checkpoint_dir_of(cfg))
    # every run counts its compute (metrics.json `compute`), whatever callbacks the config chose
    callbacks = builders.build_callbacks(cfg) + safety + [TrainingCompute()]
    loggers = builders.build_loggers(cfg)
    trainer = builders.build_trainer(cfg, callbacks, loggers)
    if rank_zero_only.rank == 0:
        save_hydra_files(run_dir, cfg)
        print_and_save(cfg, run_dir, print_tree=bool(cfg.get("print_config", False)))
        params = sum(p.numel() for p in module.net.parameters() if p.requires_grad)
        print(console.header(cfg, run_dir, params, _choices(), builders.task_overrides(), tuned), flush=True)
        if tuned.source == "measured":
            log.info("%s", autotune.format_table(tuned))
        autotune.log_to_tensorboard(loggers, tuned)
    for warning in resume.warnings if resume else []:
        log.warning("resuming from %s: %s", resume.path, warning)
    if cfg.get("reuse_host_memory", False):
        keep_freed_memory()

    datamodule = builders.build_datamodule(cfg)
    if rank_zero_only.rank == 0:
        # Fail on missing data before anything expensive runs (other DDP ranks wait in fit).
        datamodule.prepare_data()
    use_atomic_checkpoints(trainer)
    stopper = next(c for c in safety if isinstance(c, GracefulStop))

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None, weights_only=True)
    except (OSError, RuntimeError) as err:
        full = disk_full_error(err, run_dir, _last_good(cfg, resume))
        if full is None:
            raise
        raise full from None
    except SIGTERMException:
        raise stopper.interrupted(run_dir, fallback=_last_good(cfg, resume)) from None
    except SystemExit:  # Lightning exits after a KeyboardInterrupt: here, a second Ctrl-C
        if not stopper.aborted:
            raise
        raise stopper.interrupted(run_dir, fallback=_last_good(cfg, resume)) from None
    val_metrics = scalars(trainer.callback_metrics, ("val/",))
    train_metrics = scalars(trainer.callback_metrics, ("train/",))

    best_ckpt = ""
    if cfg.get("test", True):
        checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        best_ckpt = checkpoint.best_model_path if checkpoint else ""
        if not best_ckpt:
            # a warning only where a checkpoint was expected (not in recipes that test the last weights)
            (log.warning if checkpoint else log.info)("no best checkpoint was saved; testing the current weights")
        try:
            trainer.test(module, datamodule=datamodule, ckpt_path=best_ckpt or None, weights_only=True)
        except (OSError, RuntimeError) as err:  # the reports written while testing
            full = disk_full_error(err, run_dir, _last_good(cfg, resume))
            if full is None:
                raise
            raise full from None
        except SIGTERMException:
            raise TrainingInterrupted(f"stopped while testing; training had finished (checkpoints in "
                                      f"{checkpoint_dir_of(cfg)})", stopper.signum or signal.SIGTERM,
                                      best_ckpt or None) from None
    test_metrics = scalars(trainer.callback_metrics, ("test/",))

    metrics = {**train_metrics, **val_metrics, **test_metrics}
    wall_time = time.perf_counter() - start
    summary = {
        "run_dir": str(run_dir),  # where it ran (information only: paths below are relative to it)
        "model": _choices().get("model", str(cfg.model.get("_target_", ""))),
        "choices": _choices(),
        "params": sum(p.numel() for p in module.net.parameters() if p.requires_grad),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_ckpt": relative_to_run(best_ckpt, run_dir),
        "resumed_from": resume.path if resume else None,
        "seed": cfg.seed,
        "precision": tuned.precision,
        "memory_format": tuned.memory_format,
        "autotune": tuned.record(),
        "metrics": metrics,
        # training FLOPs (all segments of a resumed run) and test FLOPs (TTA views included)
        "compute": _compute_record(trainer),
        "wall_time_s": round(wall_time, 2),  # this process only
        # Across all segments of a resumed run: the training time stored in the checkpoint it
        # resumed from (0 for a new run) plus this process's time.
        "wall_time_total_s": round(getattr(module, "elapsed_s", 0.0) + wall_time, 2),
    }
    if trainer.is_global_zero:
        try:
            write_summary(run_dir, summary)
        except OSError as err:
            full = disk_full_error(err, run_dir / "metrics.json", _last_good(cfg, resume))
            if full is None:
                raise
            raise full from None
        from cifar_lab.model_card import card_for_run

        card_for_run(run_dir, cfg, module.net, datamodule, trainer, choices=_choices(),
                     overrides=builders.task_overrides(), wall_time_s=summary["wall_time_total_s"],
                     checkpoint=summary["best_ckpt"], tested=bool(cfg.get("test", True)), recorded=summary)
        print(f"Run directory: {run_dir}")

    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; available: {sorted(metrics)}")
    value = metrics[name]
    return value if math.isfinite(value) else float("nan")


def _compute_record(trainer: L.Trainer) -> dict | None:
    counter = next((c for c in trainer.callbacks if isinstance(c, TrainingCompute)), None)
    return counter.record() if counter else None


# ----------------------------------------------------------------------------- command line
def main_guarded(cfg: DictConfig, task: Callable[[DictConfig], float | None] = train) -> float | None:
    """The command line's job function: ``task(cfg)`` through the sweep runner, user errors as one message.

    In a multirun, :func:`cifar_lab.cli.sweep.run_task` records a failing job and the sweep goes
    on. Outside one, a user error prints its message alone (kept in a new run directory's
    error.txt too; an existing run is left untouched) and exits with its code (:mod:`cifar_lab.errors`). Other errors keep
    their traceback.
    """
    from cifar_lab.cli.sweep import run_task

    from cifar_lab.cli.sweep import in_multirun

    try:
        run_dir: Path | None = run_dir_of(cfg)
    except Exception:  # noqa: BLE001 - no Hydra runtime (direct calls)
        run_dir = None
    # A directory that already holds a run is not written to by a refused command (no error.txt).
    keep_in = run_dir if run_dir is not None and not holds_run(run_dir) else None
    console.quiet_third_party()
    if run_dir is not None and in_multirun() and rank_zero_only.rank == 0:
        save_hydra_files(run_dir, cfg)  # a sweep job's own new folder: recorded even if the job fails
    with exit_on_user_error(keep_in):
        return run_task(task, cfg)
    return None  # unreachable: exit_on_user_error exits on every error it catches


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def cli(cfg: DictConfig) -> float | None:
    """``python -m cifar_lab.cli.train [overrides]``: the same job as ``python train.py``."""
    return main_guarded(cfg)


if __name__ == "__main__":
    import os

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach exit_on_config_error
    with exit_on_config_error():
        cli()
