"""Heartbeats of running trials, so a trial whose worker died does not stay RUNNING forever.

While a worker runs a trial it stamps the trial (system attribute ``heartbeat``, seconds since the
epoch) every ``interval`` seconds. Any worker of the study marks a RUNNING trial that has not been
stamped for ``grace_period`` seconds as FAIL: its worker was killed (kill -9, pre-emption, a lost
machine). The same for every storage (SQLite, PostgreSQL, journal file), through Optuna's storage API.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["HEARTBEAT_ATTR", "Heartbeat", "fail_stale_trials"]

HEARTBEAT_ATTR = "heartbeat"


class Heartbeat:
    """Context manager: stamps ``trial_ids`` now and every ``interval`` seconds until it exits."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_ids: Iterable[int], interval: float) -> None:
        self.storage, self.trial_ids, self.interval = storage, list(trial_ids), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)

    def beat(self) -> None:
        now = time.time()
        for trial_id in self.trial_ids:
            try:
                self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, now)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # told already (or failed as stale by another worker)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale_trials(storage: optuna.storages.BaseStorage, study_id: int, grace_period: float,
                      on_failed: Callable[[FrozenTrial], None] | None = None) -> list[FrozenTrial]:
    """Mark RUNNING trials not stamped for ``grace_period`` seconds as FAIL; returns them."""
    now = time.time()
    failed = []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.system_attrs.get(HEARTBEAT_ATTR)
        if last is None and trial.datetime_start is not None:
            last = trial.datetime_start.timestamp()
        if last is None or now - float(last) <= grace_period:
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        failed.append(trial)
        if on_failed is not None:
            on_failed(trial)
    return failed
