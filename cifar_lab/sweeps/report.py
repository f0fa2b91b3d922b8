"""The end of every multirun: failed Optuna trials recorded as FAIL, a table of all jobs, the best one.

:class:`SweepReport` is a Hydra callback (``hydra.callbacks``; every multirun has it). For the
Optuna sweeper it turns a ``nan`` job into a failed job so the trial is recorded as ``FAIL``.
At the end of the sweep it prints a table of all jobs and the best job's value, overrides and
config path, saves ``sweep_summary.yaml`` and ``best_config.yaml`` in the sweep directory, and
adds the best job to the Optuna sweeper's ``optimization_results.yaml``.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cifar_lab.config.saved import load_yaml, plain_config
from cifar_lab.errors import EXIT_SWEEP_FAILED
from cifar_lab.sweeps.runner import ERROR_FILE, METRICS_FILE, TrialFailed, in_multirun, read_json

SUMMARY_FILE = "sweep_summary.yaml"
BEST_CONFIG_FILE = "best_config.yaml"
OPTUNA_RESULTS_FILE = "optimization_results.yaml"

__all__ = ["SweepReport", "collect_jobs", "best_job"]


def _load_yaml(path: Path) -> Any:
    try:
        return plain_config(load_yaml(path), str(path), strict=())  # saved data (cifar_lab.config.saved)
    except Exception:  # noqa: BLE001 - a half-written job folder must not break the report
        return None


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job under ``sweep_dir``, by job number: the folders holding ``.hydra/overrides.yaml``,
    and those holding a status record without it (a job killed before or while Hydra saved its
    config, which the sweeper marked failed).

    Each entry: ``num`` (the Optuna trial number in an Optuna sweep), ``dir``, ``overrides``,
    ``status`` (``ok``, ``failed``, ``pruned``, or ``unknown`` when the job left no status),
    ``value`` (objective or None), ``error`` (why it failed or was pruned).
    """
    jobs = []
    for job_dir in _job_dirs(Path(sweep_dir)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        hydra_cfg = (_load_yaml(job_dir / ".hydra" / "hydra.yaml") or {}).get("hydra", {})
        num = (hydra_cfg.get("sweeper") or {}).get("trial")
        if num is None:
            num = hydra_cfg.get("job", {}).get("num")
        if num is None and job_dir.name.isdigit():
            num = int(job_dir.name)
        record = read_json(job_dir / METRICS_FILE)
        objective = record.get("objective") or {}
        status = record.get("status") or ("failed" if (job_dir / ERROR_FILE).exists() else "unknown")
        error = record.get("error")
        if status == "failed" and not error and (job_dir / ERROR_FILE).exists():
            error = (job_dir / ERROR_FILE).read_text().strip().splitlines()[-1:]
            error = error[0] if error else None
        jobs.append({
            "num": num,
            "dir": str(job_dir),
            "overrides": list((_load_yaml(overrides_file) if overrides_file.is_file() else None) or []),
            "status": status,
            "value": objective.get("value"),
            "error": error,
        })
    jobs.sort(key=lambda j: (j["num"] is None, j["num"] if j["num"] is not None else 0, j["dir"]))
    return jobs


def _job_dirs(sweep_dir: Path) -> list[Path]:
    # a job killed while its .hydra/ was written (config.yaml, then overrides.yaml: save_hydra_files)
    # has no overrides file: its status record alone makes it a job
    saved = {f.parent.parent for f in sweep_dir.glob("**/.hydra/overrides.yaml")}
    marked = {f.parent for f in sweep_dir.glob("**/" + METRICS_FILE) if read_json(f).get("status")}
    return sorted(saved | marked)


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

    def __init__(self, fail_nan_jobs: bool | None = None, print_best_config: bool = False) -> None:
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
            reason = read_json(Path(str(job_dir)) / METRICS_FILE).get("error", "objective is nan")
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
