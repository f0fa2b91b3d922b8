"""Fault-tolerant sweeps: failed jobs are recorded and the sweep goes on; a summary at the end.

Two pieces:

- :func:`run_task` wraps the training function in ``train.py``. In a multirun, a job that
  raises, or whose objective or losses are not finite, is recorded as failed
  (``<job dir>/error.txt`` and ``metrics.json`` with ``"status": "failed"``) and returns
  ``nan`` instead of stopping the sweep. A job stopped by the Optuna pruner
  (:class:`TrialPruned`) is recorded as ``"status": "pruned"`` and re-raised, so the sweeper
  tells Optuna PRUNED. Outside a multirun, errors propagate as usual.
- :class:`SweepReport` is a Hydra callback (``hydra.callbacks``; every multirun has it). For
  the Optuna sweeper it turns a ``nan`` job into a failed job so the trial is recorded as
  ``FAIL``. At the end of the sweep it prints a table of all jobs and the best job's value,
  overrides and config, saves ``sweep_summary.yaml`` and ``best_config.yaml`` in the sweep
  directory, and adds the best job to the Optuna sweeper's ``optimization_results.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cifar_lab.errors import EXIT_SWEEP_FAILED

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "sweep_summary.yaml"
BEST_CONFIG_FILE = "best_config.yaml"
OPTUNA_RESULTS_FILE = "optimization_results.yaml"

__all__ = ["TrialFailed", "TrialPruned", "SweepReport", "in_multirun", "run_task", "mark_job", "collect_jobs"]


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_status(job_dir: Path, status: str, objective: str | None, value: float | None,
                  error: str | None = None, started: float | None = None) -> None:
    """Merge the job's status and objective into ``metrics.json`` (written by training if it got that far).

    ``error`` says why a job failed or was pruned; with ``started`` (the job's start, seconds since the
    epoch) the record also says where, when and with how many torch threads the job ran: ``host``,
    ``pid``, ``threads``, ``started``, ``ended``.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / METRICS_FILE
    record = _read_json(path)
    record["status"] = status
    record["objective"] = {"name": objective, "value": value}
    if error is not None:
        record["error"] = error
    if started is not None:
        import torch

        record["job"] = {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads(),
                         "started": started, "ended": time.time()}
    path.write_text(json.dumps(record, indent=2, default=str))


def mark_job(job_dir: Path, status: str, reason: str) -> None:
    """Record in a job's directory how it ended when the job itself could not (its worker died)."""
    if status == "failed":
        (job_dir / ERROR_FILE).write_text(reason + "\n")
    objective = _read_json(job_dir / METRICS_FILE).get("objective") or {}
    _write_status(job_dir, status, objective.get("name"), objective.get("value"), reason)


def _non_finite_losses(job_dir: Path) -> dict[str, float]:
    metrics = _read_json(job_dir / METRICS_FILE).get("metrics", {})
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


# ---------------------------------------------------------------------------- reporting
def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a half-written job folder must not break the report
        return None


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job under ``sweep_dir`` (folders holding ``.hydra/overrides.yaml``), by job number.

    Each entry: ``num`` (the Optuna trial number in an Optuna sweep), ``dir``, ``overrides``,
    ``status`` (``ok``, ``failed``, ``pruned``, or ``unknown`` when the job left no status),
    ``value`` (objective or None), ``error`` (why it failed or was pruned).
    """
    jobs = []
    for overrides_file in sorted(Path(sweep_dir).glob("**/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        hydra_cfg = (_load_yaml(job_dir / ".hydra" / "hydra.yaml") or {}).get("hydra", {})
        num = (hydra_cfg.get("sweeper") or {}).get("trial")
        if num is None:
            num = hydra_cfg.get("job", {}).get("num")
        record = _read_json(job_dir / METRICS_FILE)
        objective = record.get("objective") or {}
        status = record.get("status") or ("failed" if (job_dir / ERROR_FILE).exists() else "unknown")
        error = record.get("error")
        if status == "failed" and not error and (job_dir / ERROR_FILE).exists():
            error = (job_dir / ERROR_FILE).read_text().strip().splitlines()[-1:]
            error = error[0] if error else None
        jobs.append({
            "num": num,
            "dir": str(job_dir),
            "overrides": list(_load_yaml(overrides_file) or []),
            "status": status,
            "value": objective.get("value"),
            "error": error,
        })
    jobs.sort(key=lambda j: (j["num"] is None, j["num"] if j["num"] is not None else 0, j["dir"]))
    return jobs


def _direction(config: DictConfig) -> str:
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction):
        direction = direction[0] if len(direction) else None
    name = getattr(direction, "name", direction)
    return "minimize" if str(name).lower() == "minimize" else "maximize"


def _is_optuna(config: DictConfig) -> bool:
    return "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).lower()


def _matches(params: dict[str, Any], overrides: list[str]) -> bool:
    return all(f"{name}={value}" in overrides for name, value in params.items())


def best_job(jobs: list[dict[str, Any]], direction: str = "maximize",
             params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The job whose overrides carry ``params`` (the sweeper's own pick), else the best
    finite value (first one on ties, as Optuna picks)."""
    done = [j for j in jobs if j["status"] == "ok" and isinstance(j["value"], (int, float))
            and math.isfinite(j["value"])]
    if params:
        matching = [j for j in done if _matches(params, j["overrides"])]
        if matching:
            return matching[0]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda j: j["value"])


class SweepReport(Callback):
    """Hydra callback: failed-trial handling for Optuna and a summary of every multirun.

    Args:
        fail_nan_jobs: mark a job returning ``nan`` as FAILED (so Optuna records the trial
            as failed instead of crashing on the ``nan``). ``None``: only when the sweeper
            is Optuna's; the basic sweeper would stop with an error on a FAILED job.
        print_best_config: print the best job's whole config at the end.
    """

    def __init__(self, fail_nan_jobs: bool | None = None, print_best_config: bool = True) -> None:
        self.fail_nan_jobs = fail_nan_jobs
        self.print_best_config = print_best_config

    # ------------------------------------------------------------------ per job
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not in_multirun() or job_return.status != JobStatus.COMPLETED:
            return
        fail = self.fail_nan_jobs if self.fail_nan_jobs is not None else _is_optuna(config)
        value = job_return._return_value
        if fail and isinstance(value, float) and math.isnan(value):
            job_dir = OmegaConf.select(config, "hydra.runtime.output_dir", default="?")
            reason = _read_json(Path(str(job_dir)) / METRICS_FILE).get("error", "objective is nan")
            job_return.status = JobStatus.FAILED
            job_return.return_value = TrialFailed(f"job {job_dir} failed: {reason}")

    # ------------------------------------------------------------------ sweep end
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        jobs = collect_jobs(sweep_dir)
        if not jobs:
            return
        direction = _direction(config)
        objective = OmegaConf.select(config, "optimized_metric", default=None)
        results_path = sweep_dir / OPTUNA_RESULTS_FILE
        results = _load_yaml(results_path) if results_path.is_file() else None
        best = best_job(jobs, direction, (results or {}).get("best_params"))

        failed = [j for j in jobs if j["status"] == "failed"]
        summary: dict[str, Any] = {
            "sweep_dir": str(sweep_dir),
            "objective": objective,
            "direction": direction,
            "n_jobs": len(jobs),
            "n_ok": sum(j["status"] == "ok" for j in jobs),
            "n_failed": len(failed),
            "n_pruned": sum(j["status"] == "pruned" for j in jobs),
            "best": None,
            "jobs": jobs,
        }
        if best is not None:
            summary["best"] = {k: best[k] for k in ("num", "dir", "value", "overrides")}
            config_file = Path(best["dir"]) / "config.yaml"
            if not config_file.is_file():
                config_file = Path(best["dir"]) / ".hydra" / "config.yaml"
            if config_file.is_file():
                shutil.copyfile(config_file, sweep_dir / BEST_CONFIG_FILE)
                summary["best"]["config"] = str(sweep_dir / BEST_CONFIG_FILE)
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / SUMMARY_FILE)

        if results is not None:
            results["n_trials"] = len(jobs)
            results["n_failed"] = len(failed)
            results["n_pruned"] = summary["n_pruned"]
            results["failed_jobs"] = [{"num": j["num"], "error": j["error"]} for j in failed]
            if summary["best"] is not None:
                results["best_job"] = summary["best"]
            OmegaConf.save(OmegaConf.create(results), results_path)

        self._print(summary, objective, sweep_dir)
        if summary["n_ok"] == 0:
            print(f"Error: all {summary['n_jobs']} jobs of the sweep failed; each job's error.txt says why "
                  f"(summary: {sweep_dir / SUMMARY_FILE})", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_SWEEP_FAILED)

    def _print(self, summary: dict[str, Any], objective: str | None, sweep_dir: Path) -> None:
        pruned = f", {summary['n_pruned']} pruned" if summary["n_pruned"] else ""
        lines = [f"Sweep finished: {summary['n_jobs']} jobs, {summary['n_ok']} ok, "
                 f"{summary['n_failed']} failed{pruned} ({sweep_dir})"]
        for j in summary["jobs"]:
            value = "-" if j["value"] is None else f"{j['value']:.6g}"
            note = f"  [{j['status']}: {j['error']}]" if j["status"] != "ok" else ""
            lines.append(f"  job {j['num']}: {objective}={value}  {' '.join(j['overrides'])}{note}")
        best = summary["best"]
        if best is None:
            lines.append("No job finished with a finite objective.")
        else:
            lines.append(f"Best job {best['num']} ({summary['direction']} {objective}): {best['value']:.6g}")
            lines.append(f"  overrides: {' '.join(best['overrides'])}")
            lines.append(f"  run dir:   {best['dir']}")
            if best.get("config"):
                lines.append(f"  config:    {best['config']}")
                if self.print_best_config:
                    lines.append(Path(best["config"]).read_text().rstrip())
        print("\n".join(lines), flush=True)
