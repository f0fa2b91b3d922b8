"""Workers of one study take each WAITING trial once, on every storage: taking a trial (WAITING -> RUNNING,
``cifar_lab.sweeps.trials.take_waiting``) is one atomic change across processes.

Several worker processes race for the same queue here, released at once; each takes trials until none is
left. A trial taken twice runs twice (two jobs in one run directory): the second to finish finds the
trial told already, and one of them fails.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import optuna
import pytest

from cifar_lab.sweeps.storage import open_storage
from cifar_lab.sweeps.trials import take_waiting, top_up
from postgres import postgres_bin, postgres_server

# every test here starts worker processes
pytestmark = pytest.mark.slow

TRIALS, WORKERS = 60, 4


def _study(url: str) -> tuple[optuna.Study, optuna.storages.BaseStorage, int]:
    study = optuna.create_study(storage=open_storage(url), study_name="claims", load_if_exists=True)
    return study, study._storage, study._storage.get_study_id_from_name("claims")


def _take_all(url: str, start, out) -> None:
    study, storage, study_id = _study(url)
    start.wait()
    taken = []
    while (trial := take_waiting(study, storage, study_id, TRIALS)) is not None:
        taken.append(trial.number)
    out.put(taken)


def _taken_by_racing_workers(url: str) -> list[int]:
    study, _, _ = _study(url)
    top_up(study, TRIALS)
    context = multiprocessing.get_context("fork")
    start, out = context.Event(), context.Queue()
    workers = [context.Process(target=_take_all, args=(url, start, out)) for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    start.set()
    taken = [number for _ in workers for number in out.get(timeout=240)]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return taken


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_racing_workers_take_each_trial_once_from_a_file_storage(tmp_path: Path, kind: str) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'optuna.log'}"
    assert sorted(_taken_by_racing_workers(url)) == list(range(TRIALS))


def test_racing_workers_take_each_trial_once_from_postgresql() -> None:
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; .ci/run installs them")
    with postgres_server(bin_dir) as url:
        assert sorted(_taken_by_racing_workers(url)) == list(range(TRIALS))
