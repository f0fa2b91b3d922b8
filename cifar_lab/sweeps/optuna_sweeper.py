"""The sweep loop behind ``hydra/sweeper=optuna``: ask Optuna for a trial, launch it, tell the result.

One sweep command (or several, on any machines reaching the same storage) works on one study:

1. open the study (``load_if_exists``: the same command again resumes it), fail the trials of dead
   workers (:mod:`.heartbeat`) and fill its queue up to ``n_trials`` trials (:mod:`.trials`);
2. fork ``n_workers - 1`` extra workers (:mod:`.workers`); every worker takes up to ``n_jobs``
   waiting trials, samples their parameters, and launches them through Hydra's launcher
   (``hydra/launcher``: in-process by default, submitit for SLURM) as jobs ``<sweep dir>/<trial
   number>``, stamping their heartbeat meanwhile, then tells each trial COMPLETE, PRUNED or FAIL;
3. the command itself then waits for trials still running elsewhere (or failed as stale) and
   writes ``optimization_results.yaml`` (best value and parameters) in the sweep directory.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from cifar_lab.sweeps.report import OPTUNA_RESULTS_FILE
from cifar_lab.sweeps.runner import mark_job
from cifar_lab.errors import ConfigError
from cifar_lab.sweeps import heartbeat, trials, workers
from cifar_lab.sweeps.space import SearchSpace, parse_space
from cifar_lab.sweeps.storage import dashboard_command, open_storage, resolve_storage

log = logging.getLogger(__name__)

__all__ = ["OptunaSearch", "JOB_DIR_ATTR"]

JOB_DIR_ATTR = "job_dir"


def _build(kind: str, node: Any, seed_offset: int = 0) -> Any:
    """Instantiate ``hydra.sweeper.<kind>`` (a ``_target_`` config); seeded samplers get ``seed + offset``."""
    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    if seed_offset and node.get("seed") is not None:
        node["seed"] = int(node["seed"]) + seed_offset  # each worker its own random stream
    try:
        return instantiate(node)
    except Exception as err:  # noqa: BLE001 - Hydra wraps the constructor's error
        raise ConfigError(f"hydra.sweeper.{kind}: cannot build {node.get('_target_')!r}: "
                          f"{str(err).splitlines()[0]}") from None


def _display(url: str) -> str:
    """The storage URL with any password hidden."""
    if "://" not in url or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


class OptunaSearch:
    """An Optuna study searched by Hydra jobs; the settings are ``hydra.sweeper.*``."""

    def __init__(self, *, direction: str, study_name: str, storage: str | None, n_trials: int, n_jobs: int,
                 n_workers: int, sampler: Any, pruner: Any, params: Any, heartbeat_interval: float,
                 grace_period: float, trial: int | None = None) -> None:
        # ``trial`` is set in each job's config (the trial it runs), not in the sweep command's
        if str(direction) not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={direction!r}: use maximize or minimize")
        for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs), ("n_workers", n_workers)):
            if int(value) < 1:
                raise ConfigError(f"hydra.sweeper.{key}={value}: must be 1 or more")
        if not 0 < heartbeat_interval < grace_period:
            raise ConfigError(f"hydra.sweeper.heartbeat_interval={heartbeat_interval} must be above 0 and below "
                              f"grace_period={grace_period}")
        self.direction, self.study_name, self.storage_setting = str(direction), str(study_name), storage
        self.n_trials, self.n_jobs, self.n_workers = int(n_trials), int(n_jobs), int(n_workers)
        self.sampler, self.pruner, self.params = sampler, pruner, params
        self.heartbeat_interval, self.grace_period = float(heartbeat_interval), float(grace_period)

    # ------------------------------------------------------------------ setup
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.url = resolve_storage(self.storage_setting, self.sweep_dir)

    def _open(self, worker: int = 0) -> tuple[optuna.Study, optuna.storages.BaseStorage, int]:
        study = optuna.create_study(storage=open_storage(self.url), study_name=self.study_name,
                                    direction=self.direction, load_if_exists=True,
                                    sampler=_build("sampler", self.sampler, worker), pruner=_build("pruner", self.pruner))
        if study.direction.name.lower() != self.direction:
            raise ConfigError(f"hydra.sweeper.direction={self.direction} but study {self.study_name!r} in "
                              f"{_display(self.url)} is {study.direction.name.lower()}; keep its direction or "
                              "choose another study_name")
        storage = study._storage  # the study's own storage object (Optuna caches trials in it)
        return study, storage, storage.get_study_id_from_name(self.study_name)

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: list[str]) -> None:
        space = parse_space(self.params, arguments)
        if not space.distributions:
            raise ConfigError("hydra.sweeper.params: nothing to search; give at least one choice(...), "
                              "range(...) or interval(...)")
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        study, storage, study_id = self._open()
        space.check_study(study, self.study_name)
        finished = trials.count(study, *trials.FINISHED)
        print(f"Optuna study {self.study_name!r} ({self.direction}): {finished} of {self.n_trials} trials "
              f"finished so far\n  storage: {_display(self.url)}\n  watch it: {dashboard_command(_display(self.url))}",
              flush=True)
        self._fail_stale(storage, study_id)
        trials.top_up(study, self.n_trials)
        workers.limit_threads(self.n_workers * self.n_jobs)
        with workers.forked_workers(self.n_workers - 1, lambda index: self._work(space, index)):
            self._run(study, storage, study_id, space, wait_for_others=True)
        self._write_results(study)

    def _work(self, space: SearchSpace, index: int) -> None:
        """An extra worker (a forked process): its own connection to the study, its own sampler seed."""
        study, storage, study_id = self._open(worker=index)
        self._run(study, storage, study_id, space, wait_for_others=False)

    def _run(self, study: optuna.Study, storage: optuna.storages.BaseStorage, study_id: int, space: SearchSpace,
             wait_for_others: bool) -> None:
        while True:
            self._fail_stale(storage, study_id)
            batch = []
            while len(batch) < self.n_jobs:
                trial = trials.take_waiting(study, storage, study_id, self.n_trials)
                if trial is None:
                    break
                batch.append(trial)
            if batch:
                self._launch(study, storage, space, batch)
            elif wait_for_others and trials.pending(study, self.n_trials):
                time.sleep(min(self.heartbeat_interval, 5.0))  # trials running in other workers
            else:
                return

    def _launch(self, study: optuna.Study, storage: optuna.storages.BaseStorage, space: SearchSpace,
                batch: list[optuna.Trial]) -> None:
        overrides = []
        for trial in batch:
            params = space.sample(trial)
            trial.set_user_attr(JOB_DIR_ATTR, str(self.sweep_dir / str(trial.number)))
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            overrides.append([*space.overrides(params), f"hydra.sweeper.trial={trial.number}",
                              f"hydra.sweep.subdir={trial.number}"])
        with heartbeat.Heartbeat(storage, [t._trial_id for t in batch], self.heartbeat_interval):
            returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
        for trial, job in zip(batch, returns):
            trials.tell(study, trial, job)

    def _fail_stale(self, storage: optuna.storages.BaseStorage, study_id: int) -> None:
        def record(trial: FrozenTrial) -> None:
            message = f"its worker stopped (no heartbeat for {self.grace_period:g} s)"
            log.warning("trial %d failed: %s", trial.number, message)
            # the trial's folder in this sweep, as _launch named it, made if the worker died before its job
            # did; a study's attributes are data (another sweep's folder, or any path, is left alone)
            job_dir = self.sweep_dir / str(trial.number)
            if trial.user_attrs.get(JOB_DIR_ATTR) == str(job_dir):
                job_dir.mkdir(exist_ok=True)
                mark_job(job_dir, "failed", message)

        heartbeat.fail_stale_trials(storage, study_id, self.grace_period, record)

    def _write_results(self, study: optuna.Study) -> None:
        states = [t.state for t in study.get_trials(deepcopy=False)]
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": self.study_name,
            "storage": _display(self.url),
            "direction": self.direction,
            "n_complete": states.count(TrialState.COMPLETE),
            "n_pruned": states.count(TrialState.PRUNED),
            "n_fail": states.count(TrialState.FAIL),
        }
        if results["n_complete"]:
            results["best_trial"] = study.best_trial.number
            results["best_params"] = study.best_trial.params
            results["best_value"] = study.best_value
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / OPTUNA_RESULTS_FILE)
        print(f"Optuna study {self.study_name!r}: {results['n_complete']} complete, {results['n_pruned']} pruned, "
              f"{results['n_fail']} failed; best value {results.get('best_value', '-')}", flush=True)
