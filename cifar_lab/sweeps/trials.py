"""The study's trials: a queue of exactly ``n_trials``, taken one at a time, told from Hydra's job result.

The sweep command enqueues WAITING trials until the study holds ``n_trials`` in all, so every
trial number exists once and a resumed sweep runs only what is left. A worker moves one WAITING
trial numbered below ``n_trials`` to RUNNING through the storage (an atomic change of state: two
workers never take the same trial), runs it, and tells Optuna how it ended. Trials numbered
``n_trials`` or more (left by an earlier, larger ``n_trials``, or enqueued by two commands starting
at once) stay WAITING.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from cifar_lab.sweeps.runner import TrialPruned

log = logging.getLogger(__name__)

__all__ = ["FINISHED", "count", "pending", "top_up", "take_waiting", "tell"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def count(study: optuna.Study, *states: TrialState) -> int:
    """How many trials of the study are in ``states`` (all trials without states)."""
    return len(study.get_trials(deepcopy=False, states=states or None))


def pending(study: optuna.Study, n_trials: int) -> int:
    """Trials not finished yet: RUNNING ones, and WAITING ones numbered below ``n_trials``."""
    return sum(t.state == TrialState.RUNNING or (t.state == TrialState.WAITING and t.number < n_trials)
               for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


def top_up(study: optuna.Study, n_trials: int) -> int:
    """Enqueue WAITING trials until the study holds ``n_trials`` trials in all; returns how many were added."""
    missing = max(0, n_trials - count(study))
    for _ in range(missing):
        study.enqueue_trial({})
    return missing


def take_waiting(study: optuna.Study, storage: optuna.storages.BaseStorage, study_id: int,
                 n_trials: int) -> optuna.Trial | None:
    """Move one WAITING trial numbered below ``n_trials`` to RUNNING and return it; None when there is none.

    ``storage`` is the study's own storage object.
    """
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        if frozen.number >= n_trials:
            continue
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker took it and finished it meanwhile
    return None


def _value(job: JobReturn) -> Any:
    return job._return_value  # JobReturn.return_value re-raises a failed job's exception


def tell(study: optuna.Study, trial: optuna.Trial, job: JobReturn) -> TrialState:
    """Tell Optuna how the trial's job ended: COMPLETE with its value, PRUNED, or FAIL."""
    value = _value(job)
    if job.status == JobStatus.COMPLETED and isinstance(value, (int, float)) and math.isfinite(value):
        state, values = TrialState.COMPLETE, float(value)
    elif job.status == JobStatus.FAILED and isinstance(value, TrialPruned):
        state, values = TrialState.PRUNED, None
    else:
        state, values = TrialState.FAIL, None
        log.warning("trial %d failed: %s", trial.number, value if value is not None else "no objective returned")
    try:
        study.tell(trial, values, state=state)
    except (ValueError, RuntimeError) as err:  # finished meanwhile (failed as stale by another worker)
        log.warning("trial %d: cannot record its result: %s", trial.number, err)
        return state
    log.info("trial %d %s%s", trial.number, state.name, "" if values is None else f": {values:.6g}")
    return state
