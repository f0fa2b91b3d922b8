"""Fault-tolerant sweep jobs: a failed job is recorded and the sweep goes on.

- :func:`run_task` wraps the training function in ``train.py``. In a multirun, a job that
  raises, or whose objective or losses are not finite, is recorded as failed
  (``<job dir>/error.txt`` and ``metrics.json`` with ``"status": "failed"``) and returns
  ``nan`` instead of stopping the sweep. A job stopped by the Optuna pruner
  (:class:`TrialPruned`) is recorded as ``"status": "pruned"`` and re-raised, so the sweeper
  tells Optuna PRUNED. Outside a multirun, errors propagate as usual.

The end-of-sweep report (:class:`cifar_lab.sweeps.report.SweepReport`) reads what this writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from cifar_lab.fileio import atomic_write_text

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"
METRICS_FILE = "metrics.json"

__all__ = ["TrialFailed", "TrialPruned", "in_multirun", "run_task", "mark_job", "read_json"]


class TrialFailed(RuntimeError):
    """A sweep job that did not produce a usable objective."""


class TrialPruned(Exception):
    """A sweep job stopped early by the Optuna pruner; ``value`` is the last value it reported."""

    def __init__(self, message: str, value: float | None = None) -> None:
        super().__init__(message)
        self.value = value


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m`` or ``hydra.mode=MULTIRUN``)."""
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra app around (direct calls, tests)
        return False


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_status(job_dir: Path, status: str, objective: str | None, value: float | None,
                  error: str | None = None, started: float | None = None) -> None:
    """Merge the job's status and objective into ``metrics.json`` (written by training if it got that far).

    ``error`` says why a job failed or was pruned; with ``started`` (the job's start, seconds since the
    epoch) the record also says where, when and with how many torch threads the job ran: ``host``,
    ``pid``, ``threads``, ``started``, ``ended``.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / METRICS_FILE
    record = read_json(path)
    record["status"] = status
    record["objective"] = {"name": objective, "value": value}
    if error is not None:
        record["error"] = error
    if started is not None:
        import torch

        record["job"] = {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads(),
                         "started": started, "ended": time.time()}
    atomic_write_text(path, json.dumps(record, indent=2, default=str))


def mark_job(job_dir: Path, status: str, reason: str) -> None:
    """Record in a job's directory how it ended when the job itself could not (its worker died)."""
    if status == "failed":
        (job_dir / ERROR_FILE).write_text(reason + "\n")
    objective = read_json(job_dir / METRICS_FILE).get("objective") or {}
    _write_status(job_dir, status, objective.get("name"), objective.get("value"), reason)


def _non_finite_losses(job_dir: Path) -> dict[str, float]:
    metrics = read_json(job_dir / METRICS_FILE).get("metrics", {})
    return {k: v for k, v in metrics.items()
            if k.endswith("/loss") and isinstance(v, (int, float)) and not math.isfinite(v)}


def run_task(task: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """Run ``task(cfg)``; inside a multirun, record a failure and return ``nan`` instead of raising.

    A job counts as failed when it raises, returns a non-finite objective, or logged a
    non-finite loss (a diverged run whose accuracy metric alone may look finite).
    """
    if not in_multirun():
        return task(cfg)
    job_dir = Path(cfg.paths.output_dir)
    objective = cfg.get("optimized_metric")
    started = time.time()
    try:
        value = task(cfg)
    except TrialPruned as err:
        log.info("job pruned (%s)", err)
        if _is_rank_zero():
            _write_status(job_dir, "pruned", objective, err.value, str(err), started)
        raise
    except Exception as err:  # noqa: BLE001 - any failure of one job must not end the sweep
        message = f"{type(err).__name__}: {err}"
        log.error("job failed (%s); the sweep goes on. Traceback in %s", message, job_dir / ERROR_FILE)
        if _is_rank_zero():
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / ERROR_FILE).write_text(traceback.format_exc())
            _write_status(job_dir, "failed", objective, None, message, started)
        return float("nan")

    problems = []
    if value is not None and not math.isfinite(float(value)):
        problems.append(f"{objective}={value}")
    problems += [f"{k}={v}" for k, v in _non_finite_losses(job_dir).items()]
    if problems:
        message = "non-finite result: " + ", ".join(problems)
        log.error("job failed (%s); the sweep goes on", message)
        if _is_rank_zero():
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / ERROR_FILE).write_text(message + "\n")
            _write_status(job_dir, "failed", objective, None, message, started)
        return float("nan")
    if _is_rank_zero():
        _write_status(job_dir, "ok", objective, None if value is None else float(value), started=started)
    return value
