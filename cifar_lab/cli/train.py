"""Training entry logic: validate, seed, build, fit, test the best checkpoint, write metrics.json.

``train(cfg)`` raises the errors a user can fix as one-message exceptions:
:class:`~cifar_lab.schema.ConfigError` (bad values, a checkpoint that does not fit the
config, an unsafe saved config), :class:`~cifar_lab.data.splits.DataError` (missing or
broken data), :class:`~cifar_lab.callbacks.safety.NonFiniteLossError` (the loss diverged)
and :class:`~cifar_lab.callbacks.safety.TrainingInterrupted` (Ctrl-C/SIGTERM, after saving
a resumable checkpoint). :func:`main_guarded` is the command-line wrapper: it prints just
the message (no traceback) and exits with a distinct status.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
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

from cifar_lab import builders
from cifar_lab.callbacks.safety import (
    GracefulStop,
    NonFiniteLossError,
    TrainingInterrupted,
    safety_callbacks,
    use_atomic_checkpoints,
)
from cifar_lab.config_tree import print_and_save
from cifar_lab.data.splits import DataError
from cifar_lab.host_memory import keep_freed_memory
from cifar_lab.schema import ConfigError, validate_config
from cifar_lab.security import check_targets

log = logging.getLogger(__name__)

# Exit statuses of main_guarded (interruptions exit with 128 + the signal number).
EXIT_CONFIG = 2      # ConfigError, DataError: fix the config or the data
EXIT_DIVERGED = 3    # NonFiniteLossError

# Where a checkpoint's saved config must equal the current one for a resume to be allowed:
# the network (its state dict), the classes, the optimizer and scheduler types (their
# state dicts) and the parameter grouping.
RESUME_MUST_MATCH = ("model", "data.num_classes", "optimizer._target_", "scheduler.scheduler._target_",
                     "module.no_decay_norm_and_bias")
# Values a resume takes from the checkpoint, whatever the config now says.
RESUME_RESTORED = ("optimizer", "scheduler")
# Values that may change, but then the run no longer matches an uninterrupted one.
RESUME_CHANGES_RESULT = ("seed", "data.batch_size", "data.augment", "data.mixing", "data.val_size", "data.source",
                         "data.pipeline", "module.label_smoothing", "trainer.precision",
                         "trainer.accumulate_grad_batches", "trainer.gradient_clip_val")
# Keys of the model node that do not shape its weights.
MODEL_RUNTIME_KEYS = ("channels_last",)


def run_dir_of(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (the run directory)."""
    return Path(cfg.paths.output_dir)


def checkpoint_dir_of(cfg: DictConfig) -> Path:
    """Where this run's checkpoints go: the model_checkpoint callback's dirpath, else <run>/checkpoints."""
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    return Path(dirpath) if dirpath else run_dir_of(cfg) / "checkpoints"


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path | None = None) -> str | None:
    """The checkpoint file to resume from, or None.

    ``last``: the newest ``last*.ckpt`` in ``checkpoint_dir`` (this run directory's, so
    together with ``hydra.run.dir=<run dir>``); a directory: its ``checkpoints/last.ckpt``;
    else a file. Anything that does not exist is a :class:`ConfigError`, never a silent
    fresh start.
    """
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        folder = checkpoint_dir or Path("checkpoints")
        candidates = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        if not candidates:
            raise ConfigError(
                f"ckpt_path=last: no last.ckpt in {folder}. `last` resumes the run directory given with "
                "hydra.run.dir=<run directory>; without it every run gets a new directory. Pass "
                "hydra.run.dir=<the run to resume>, or ckpt_path=<run directory or .ckpt file>"
            )
        return str(candidates[-1])
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path}: no checkpoint at {path}. Pass a .ckpt file, a run directory holding "
            "checkpoints/last.ckpt, or ckpt_path=last together with hydra.run.dir=<that run directory>"
        )
    return str(path)


# ----------------------------------------------------------------------------- resuming
def load_checkpoint_config(path: str) -> dict[str, Any]:
    """The run config saved in a checkpoint (``hyper_parameters``), read with ``weights_only=True``.

    A checkpoint holding anything but tensors and plain values is refused (unpickling it
    could run code), as is one without a saved config or whose config names ``_target_``s
    outside the allow-list (:func:`cifar_lab.security.check_targets`).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, or objects weights_only refuses
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ConfigError(f"refusing to load {path}: it holds objects other than tensors and plain values "
                              f"({reason}); only checkpoints written by cifar-lab can be resumed") from None
        raise ConfigError(f"cannot read checkpoint {path} ({type(err).__name__}: {reason}); the file is truncated "
                          "or corrupted: resume from another one (checkpoints/epoch_*.ckpt)") from None
    config = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"{path} holds no cifar-lab run config (hyper_parameters), so it cannot be checked "
                          "against this run; resume only from checkpoints written by train.py")
    check_targets(config, origin=path)
    return config


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out or {prefix: {}}
    return {prefix: node}


def _select(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _differences(saved: dict, current: dict, keys: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    lines = []
    for key in keys:
        old, new = _flatten(_select(saved, key), key), _flatten(_select(current, key), key)
        for name in sorted(set(old) | set(new)):
            if name.rsplit(".", 1)[-1] in skip or old.get(name) == new.get(name):
                continue
            lines.append(f"{name}: {old.get(name)!r} in the checkpoint, {new.get(name)!r} now")
    return lines


def check_resume_compatible(saved: dict, cfg: DictConfig, path: str) -> list[str]:
    """Refuse a checkpoint trained with another network, classes, optimizer or scheduler type.

    Returns warnings for values the resume takes from the checkpoint (optimizer and
    scheduler settings) or that make the result differ from an uninterrupted run.
    """
    current = OmegaConf.to_container(cfg, resolve=True)
    mismatched = _differences(saved, current, RESUME_MUST_MATCH, skip=MODEL_RUNTIME_KEYS)
    if mismatched:
        shown = "\n".join(f"  - {line}" for line in mismatched[:8])
        more = f"\n  - ... and {len(mismatched) - 8} more" if len(mismatched) > 8 else ""
        raise ConfigError(
            f"cannot resume from {path}: it was trained with a different setup:\n{shown}{more}\n"
            "Resume with the overrides that run used (its config.yaml is next to checkpoints/), or start a "
            "new run without ckpt_path"
        )
    skip_restored = tuple(k.split(".")[-1] for k in RESUME_MUST_MATCH)
    warnings = [f"{line} (the checkpoint's value is restored)"
                for line in _differences(saved, current, RESUME_RESTORED, skip=skip_restored)]
    warnings += [f"{line} (the resumed run will differ from an uninterrupted one)"
                 for line in _differences(saved, current, RESUME_CHANGES_RESULT)]
    return warnings


@dataclass
class Resume:
    path: str
    warnings: list[str] = field(default_factory=list)


def prepare_resume(cfg: DictConfig) -> Resume | None:
    """Resolve ``ckpt_path`` and check the checkpoint before anything is built."""
    path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir_of(cfg))
    if path is None:
        return None
    saved = load_checkpoint_config(path)
    return Resume(path, check_resume_compatible(saved, cfg, path))


# ----------------------------------------------------------------------------- training
def _scalars(metrics: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for key, value in sorted(metrics.items()):
        if key.startswith(prefixes):
            out[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return out


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
    """This run's last.ckpt, else the checkpoint it resumed from."""
    last = checkpoint_dir_of(cfg) / "last.ckpt"
    if last.is_file():
        return str(last)
    return resume.path if resume else None


def train(cfg: DictConfig) -> float | None:
    """Run one training job as configured; return the metric named by ``optimized_metric``."""
    start = time.perf_counter()
    validate_config(cfg)
    resume = prepare_resume(cfg)
    run_dir = run_dir_of(cfg)
    _quiet_other_ranks()
    if rank_zero_only.rank == 0:
        print_and_save(cfg, run_dir)
    for warning in resume.warnings if resume else []:
        log.warning("resuming from %s: %s", resume.path, warning)
    L.seed_everything(cfg.seed, workers=True, verbose=rank_zero_only.rank == 0)
    if cfg.get("reuse_host_memory", False):
        keep_freed_memory()

    datamodule = builders.build_datamodule(cfg)
    if rank_zero_only.rank == 0:
        # Fail on missing data before anything expensive is built (other DDP ranks wait in fit).
        datamodule.prepare_data()
    module = builders.build_module(cfg)
    safety = safety_callbacks(checkpoint_dir_of(cfg))
    callbacks = builders.build_callbacks(cfg) + safety
    loggers = builders.build_loggers(cfg)
    trainer = builders.build_trainer(cfg, callbacks, loggers)
    use_atomic_checkpoints(trainer)
    stopper = next(c for c in safety if isinstance(c, GracefulStop))

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None, weights_only=True)
    except SIGTERMException:
        raise stopper.interrupted(run_dir, fallback=_last_good(cfg, resume)) from None
    except SystemExit:  # Lightning exits after a KeyboardInterrupt: here, a second Ctrl-C
        if not stopper.aborted:
            raise
        raise stopper.interrupted(run_dir, fallback=_last_good(cfg, resume)) from None
    val_metrics = _scalars(trainer.callback_metrics, ("val/",))
    train_metrics = _scalars(trainer.callback_metrics, ("train/",))

    best_ckpt = ""
    if cfg.get("test", True):
        checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        best_ckpt = checkpoint.best_model_path if checkpoint else ""
        if not best_ckpt:
            # a warning only where a checkpoint was expected (not in recipes that test the last weights)
            (log.warning if checkpoint else log.info)("no best checkpoint was saved; testing the current weights")
        try:
            trainer.test(module, datamodule=datamodule, ckpt_path=best_ckpt or None, weights_only=True)
        except SIGTERMException:
            raise TrainingInterrupted(f"stopped while testing; training had finished (checkpoints in "
                                      f"{checkpoint_dir_of(cfg)})", stopper.signum or signal.SIGTERM,
                                      best_ckpt or None) from None
    test_metrics = _scalars(trainer.callback_metrics, ("test/",))

    metrics = {**train_metrics, **val_metrics, **test_metrics}
    summary = {
        "run_dir": str(run_dir),
        "model": _choices().get("model", str(cfg.model.get("_target_", ""))),
        "choices": _choices(),
        "params": sum(p.numel() for p in module.net.parameters() if p.requires_grad),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_ckpt": best_ckpt,
        "resumed_from": resume.path if resume else None,
        "seed": cfg.seed,
        "metrics": metrics,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        print(f"Run directory: {run_dir}")

    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; available: {sorted(metrics)}")
    value = metrics[name]
    return value if math.isfinite(value) else float("nan")


# ----------------------------------------------------------------------------- command line
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, NonFiniteLossError)


def _report(run_dir: Path | None, message: str) -> None:
    """Print the message alone on stderr, and keep it in the run directory's error.txt."""
    print(f"Error: {message}", file=sys.stderr, flush=True)
    if run_dir is not None and rank_zero_only.rank == 0:
        try:
            if run_dir.is_dir():
                (run_dir / "error.txt").write_text(message + "\n")
        except OSError:
            pass


def main_guarded(cfg: DictConfig, task: Callable[[DictConfig], float | None] = train) -> float | None:
    """The command line's job function: ``task(cfg)`` through the sweep runner, user errors as one message.

    In a multirun, :func:`cifar_lab.sweep.run_task` records a failing job and the sweep goes
    on. Outside one, a :data:`USER_ERRORS` error prints its message alone and exits with
    status 2 (config, data) or 3 (diverged); an interruption exits with 128 + the signal
    number after saying where the resumable checkpoint is. Other errors keep their traceback.
    """
    from cifar_lab.sweep import run_task

    try:
        run_dir: Path | None = run_dir_of(cfg)
    except Exception:  # noqa: BLE001 - no Hydra runtime (direct calls)
        run_dir = None
    try:
        return run_task(task, cfg)
    except (ConfigError, DataError) as err:
        _report(run_dir, str(err))
        sys.exit(EXIT_CONFIG)
    except NonFiniteLossError as err:
        _report(run_dir, str(err))
        sys.exit(EXIT_DIVERGED)
    except TrainingInterrupted as err:
        print(str(err), file=sys.stderr, flush=True)
        sys.exit(err.exit_code)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def cli(cfg: DictConfig) -> float | None:
    """``python -m cifar_lab.train [overrides]``: the same job as ``python train.py``."""
    return main_guarded(cfg)


if __name__ == "__main__":
    cli()
