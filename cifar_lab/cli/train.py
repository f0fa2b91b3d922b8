"""Training: settle the config, assemble the run, fit, test the best checkpoint, report (metrics.json).

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
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from cifar_lab import autotune, builders
from cifar_lab.builders.assemble import Assembly, assemble
from cifar_lab.builders.settle import RESUME, SWEEP_TRIAL, TRAIN, Role, runtime_record, settle
from cifar_lab.callbacks import wandb_run
from cifar_lab.callbacks.compute import TrainingCompute
from cifar_lab.callbacks.estimate import RunEstimate
from cifar_lab.callbacks.peers import peer_lost_error
from cifar_lab.callbacks.safety import FitMetrics, GracefulStop
from cifar_lab.checkpoints import Resume, prepare_resume
from cifar_lab import console
from cifar_lab.runs.summary import data_record, scalars, write_summary
from cifar_lab.runs.tags import notes_of, tags_of
from cifar_lab.sweeps.runner import in_multirun, run_task
from cifar_lab.config.tree import print_and_save
from cifar_lab.fileio import remove_stale_temp_files
from cifar_lab.errors import ConfigError, TrainingInterrupted
from cifar_lab.cli.exits import exit_on_config_error, exit_on_user_error
from cifar_lab.deploy.model_card import card_for_run
from cifar_lab.host import keep_freed_memory
from cifar_lab.models import trainable_params
from cifar_lab.runs import identity
from cifar_lab.runs.directory import (RunDirLock, disk_full_error, holds_run, refuse_symlinks, relative_to_run,
                                     save_hydra_files)

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


def train(cfg: DictConfig) -> float | None:
    """Run one training job as configured; return the metric named by ``optimized_metric``."""
    start = time.perf_counter()
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError("ckpt_path and init_from exclude each other: ckpt_path resumes a run (optimizer and "
                          "schedule included), init_from starts a new run from a checkpoint's weights only")
    _continue_restarted_job(cfg)
    run_dir = run_dir_of(cfg)
    continued = cfg.get("ckpt_path") == "last"
    _start_unbegun_run(cfg, run_dir)
    refuse_symlinks(run_dir)
    resume = prepare_resume(cfg, checkpoint_dir_of(cfg))
    if resume is None and holds_run(run_dir, results_only=True):
        raise ConfigError(
            f"{run_dir} already holds a run; a new training command would replace its results. Give the new run "
            f"its own directory (leave hydra.run.dir out), continue this one with ckpt_path=last "
            f"hydra.run.dir={run_dir}, or start from its weights in a new directory with init_from={run_dir}")
    # Nothing in the run directory changes before this point: a refused command leaves it as it was.
    lock = RunDirLock(run_dir).acquire() if rank_zero_only.rank == 0 else None
    if lock is not None and (resume is not None or continued):
        remove_stale_temp_files(run_dir)  # half-written files of a killed process (its writes were atomic)
    try:
        return _train(_Job(cfg, run_dir, resume, start, _role(resume)))
    finally:
        wandb_run.finish()  # logger=wandb: the next job of a sweep gets a run of its own
        if lock is not None:
            lock.release()


def _role(resume: Resume | None) -> Role:
    return RESUME if resume is not None else SWEEP_TRIAL if in_multirun() else TRAIN


def _continue_restarted_job(cfg: DictConfig) -> None:
    """A requeued SLURM job (or a torchrun restart) resumes its run directory's last.ckpt; a new job whose
    launcher-named directory already holds a run is refused (it would overwrite it)."""
    run_dir, last = run_dir_of(cfg), checkpoint_dir_of(cfg) / "last.ckpt"
    if cfg.get("ckpt_path") or cfg.get("init_from") or run_dir.name != identity.launcher_run_name():
        return
    if identity.restart_count() > 0:
        if last.is_file():
            log.warning("%s (restart %d): resuming from %s", identity.launcher_run_name(), identity.restart_count(),
                        last)
            cfg.ckpt_path = "last"
        return
    if rank_zero_only.rank == 0 and holds_run(run_dir):
        raise ConfigError(f"run directory {run_dir} (named after this job) already holds a run, and this job "
                          "was not restarted: continue it with ckpt_path=last, or give this run its own "
                          "directory with hydra.run.dir=<new directory>")


def _named_run_dir() -> bool:
    """Whether the command named its run directory (hydra.run.dir=...) rather than getting a new one."""
    try:
        return any(str(o).lstrip("+").startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)
    except ValueError:  # not inside a Hydra app
        return False


def _start_unbegun_run(cfg: DictConfig, run_dir: Path) -> None:
    """``ckpt_path=last hydra.run.dir=R`` where R's run was stopped before it wrote any checkpoint (killed
    while starting): nothing can be resumed and nothing would be lost, so the run starts from the beginning
    (the same seed gives the run it would have been). Without hydra.run.dir, `last` keeps its error."""
    if cfg.get("ckpt_path") != "last" or not _named_run_dir() or holds_run(run_dir, results_only=True):
        return
    if any(checkpoint_dir_of(cfg).glob("last*.ckpt")):
        return
    log.warning("ckpt_path=last: %s holds no checkpoint yet (its run stopped before writing one); training "
                "starts from the beginning", run_dir)
    cfg.ckpt_path = None


@dataclass
class _Job:
    """What every step of one training job needs: its config, run directory and resume point."""

    cfg: DictConfig
    run_dir: Path
    resume: Resume | None
    start: float
    role: Role

    def last_good(self) -> str | None:
        """This run's last.ckpt, else its newest checkpoint, else the checkpoint it resumed from."""
        folder = checkpoint_dir_of(self.cfg)
        last = folder / "last.ckpt"
        if last.is_file():
            return str(last)
        saved = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        if saved:
            return str(saved[-1])
        return self.resume.path if self.resume else None

    @contextmanager
    def disk_full_as_error(self, path: Path | None = None) -> Iterator[None]:
        """A full disk while writing ``path`` (default: the run directory) becomes one message naming the
        last good checkpoint; every other error passes through."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            full = disk_full_error(err, path or self.run_dir, self.last_good())
            if full is None:
                raise
            raise full from None

    @contextmanager
    def peer_lost_as_error(self, trainer: L.Trainer) -> Iterator[None]:
        """A DDP collective that failed because another process died becomes one message naming its rank and
        the resume command (cifar_lab/callbacks/peers.py); every other error passes through."""
        try:
            yield
        except RuntimeError as err:
            lost = peer_lost_error(err, trainer, self.run_dir, self.last_good())
            if lost is None:
                raise
            raise lost from None


def _train(job: _Job) -> float | None:
    """Settle, assemble, fit, test, report."""
    _quiet_other_ranks()
    settled = settle(job.cfg, job.role, job.run_dir, resume=job.resume)
    job = replace(job, cfg=settled.cfg)  # the run's config from here on: final, read-only
    L.seed_everything(job.cfg.seed, workers=True, verbose=rank_zero_only.rank == 0)
    run = assemble(settled, job.run_dir, checkpoint_dir_of(job.cfg))
    if rank_zero_only.rank == 0:
        _record_start(job, run)
    for warning in job.resume.warnings if job.resume else []:
        log.warning("resuming from %s: %s", job.resume.path, warning)
    if job.cfg.get("reuse_host_memory", False):
        keep_freed_memory()
    _fit(job, run)
    autotune.check_run(run.settled.decision, run.trainer)  # steps far slower than the cached promise: measured again next run
    fitted = {**scalars(run.trainer.callback_metrics, ("train/",)), **scalars(run.trainer.callback_metrics, ("val/",))}
    if not fitted:  # a resume with nothing left to train (killed while testing): the checkpoint's figures
        fitted = next(c for c in run.callbacks if isinstance(c, FitMetrics)).restored
    best_ckpt = _test(job, run) if job.cfg.get("test", True) else ""
    metrics = {**fitted, **scalars(run.trainer.callback_metrics, ("test/",))}
    summary = _summary(job, run, metrics, best_ckpt)
    if run.trainer.is_global_zero:
        _write_results(job, summary, run)
    return _objective(job.cfg, metrics)


def _record_start(job: _Job, run: Assembly) -> None:
    """The run directory's .hydra files and config.yaml (the settled config), the console header, the autotune
    table."""
    cfg, run_dir, tuned = job.cfg, job.run_dir, run.settled.decision
    save_hydra_files(run_dir, cfg)
    print_and_save(cfg, run_dir, print_tree=bool(cfg.get("print_config", False)))
    print(console.header(cfg, run_dir, trainable_params(run.module.net), _choices(), builders.task_overrides(),
                         tuned), flush=True)
    if tuned.source == "measured":
        log.info("%s", autotune.format_table(tuned))
    autotune.log_to_tensorboard(run.loggers, tuned)


def _fit(job: _Job, run: Assembly) -> None:
    """``trainer.fit``; a full disk, SIGTERM or a second Ctrl-C become one message naming the last checkpoint."""
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    stopper = next(c for c in run.callbacks if isinstance(c, GracefulStop))
    try:
        with job.disk_full_as_error(), job.peer_lost_as_error(trainer):
            trainer.fit(module, datamodule=datamodule, ckpt_path=job.resume.path if job.resume else None,
                        weights_only=True)
    except SIGTERMException:
        raise stopper.interrupted(job.run_dir, fallback=job.last_good()) from None
    except SystemExit:  # Lightning exits after a KeyboardInterrupt: here, a second Ctrl-C
        if not stopper.aborted:
            raise
        raise stopper.interrupted(job.run_dir, fallback=job.last_good()) from None


def _test(job: _Job, run: Assembly) -> str:
    """Test the best checkpoint (else the current weights); return its path ("" for the current weights)."""
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    stopper = next(c for c in run.callbacks if isinstance(c, GracefulStop))
    checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
    best_ckpt = checkpoint.best_model_path if checkpoint else ""
    if not best_ckpt:
        # a warning only where a checkpoint was expected (not in recipes that test the last weights)
        (log.warning if checkpoint else log.info)("no best checkpoint was saved; testing the current weights")
    try:
        with job.disk_full_as_error(), job.peer_lost_as_error(trainer):  # the reports written while testing
            trainer.test(module, datamodule=datamodule, ckpt_path=best_ckpt or None, weights_only=True)
    except SIGTERMException:
        raise TrainingInterrupted(f"stopped while testing; training had finished (checkpoints in "
                                  f"{checkpoint_dir_of(job.cfg)})", stopper.signum or signal.SIGTERM,
                                  best_ckpt or None) from None
    return best_ckpt


def _summary(job: _Job, run: Assembly, metrics: dict[str, float], best_ckpt: str) -> dict[str, Any]:
    """metrics.json's content."""
    trainer, module = run.trainer, run.module
    wall_time = time.perf_counter() - job.start
    return {
        "run_dir": str(job.run_dir),  # where it ran (information only: paths below are relative to it)
        "model": _choices().get("model", str(job.cfg.model.get("_target_", ""))),
        "choices": _choices(),
        "params": trainable_params(module.net),
        "data": _data(job.cfg, trainer),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_ckpt": relative_to_run(best_ckpt, job.run_dir),
        "resumed_from": job.resume.path if job.resume else None,
        "seed": job.cfg.seed,
        "tags": tags_of(job.cfg),
        "notes": notes_of(job.cfg),
        "role": job.role.name,
        **runtime_record(run.settled),
        "metrics": metrics,
        # training FLOPs (all segments of a resumed run) and test FLOPs (TTA views included)
        "compute": _compute_record(trainer),
        # the early time estimate (to the end of the test) against the time it took
        "time_estimate": next((c.record() for c in trainer.callbacks if isinstance(c, RunEstimate)), None),
        "wall_time_s": round(wall_time, 2),  # this process only
        # Across all segments of a resumed run: the training time stored in the checkpoint it
        # resumed from (0 for a new run) plus this process's time.
        "wall_time_total_s": round(getattr(module, "elapsed_s", 0.0) + wall_time, 2),
    }


def _write_results(job: _Job, summary: dict[str, Any], run: Assembly) -> None:
    """metrics.json and MODEL_CARD.md in the run directory (rank 0)."""
    trainer = run.trainer
    card_for_run(job.run_dir, job.cfg, run.module.net, run.datamodule, trainer, choices=_choices(),
                 overrides=builders.task_overrides(), wall_time_s=summary["wall_time_total_s"],
                 checkpoint=summary["best_ckpt"], tested=bool(job.cfg.get("test", True)), recorded=summary)
    # metrics.json last: a run directory holding it is complete, and a run killed before it resumes
    with job.disk_full_as_error(job.run_dir / "metrics.json"):
        write_summary(job.run_dir, summary)
    wandb_run.save_files(trainer.loggers, [job.run_dir / "metrics.json", job.run_dir / "MODEL_CARD.md"])
    print(f"Run directory: {job.run_dir}")


def _objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of ``optimized_metric`` for a sweep (nan when not finite), None when none is named."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        logged = ", ".join(sorted(metrics)) or "nothing"
        raise ConfigError(f"optimized_metric={name} was not logged by this run (it logged {logged}); name one of "
                          "those, or optimized_metric=null")
    value = metrics[name]
    return value if math.isfinite(value) else float("nan")


def _data(cfg: DictConfig, trainer: L.Trainer) -> dict[str, Any] | None:
    """The data choice and split sizes (metrics.json ``data``; compare's data column)."""
    splits = getattr(trainer.datamodule, "splits", None)
    if not splits:
        return None
    source = _choices().get("data") or str(OmegaConf.select(cfg, "data.source._target_", default="")).rsplit(".", 1)[-1]
    return data_record(source, splits, validated=trainer.limit_val_batches != 0)


def _compute_record(trainer: L.Trainer) -> dict | None:
    counter = next((c for c in trainer.callbacks if isinstance(c, TrainingCompute)), None)
    return counter.record() if counter else None


# ----------------------------------------------------------------------------- command line
def main_guarded(cfg: DictConfig, task: Callable[[DictConfig], float | None] = train) -> float | None:
    """The command line's job function: ``task(cfg)`` through the sweep runner, user errors as one message.

    In a multirun, :func:`cifar_lab.sweeps.runner.run_task` records a failing job and the sweep goes
    on. Outside one, a user error prints its message alone (kept in a new run directory's
    error.txt too; an existing run is left untouched) and exits with its code (:mod:`cifar_lab.errors`). Other errors keep
    their traceback.
    """
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
