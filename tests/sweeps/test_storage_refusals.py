"""A sweep's storage and search space are checked before any trial runs: refusals are one line, touch
no file, and leave no trial RUNNING."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from cifar_lab.errors import ConfigError
from cifar_lab.sweeps.space import SearchSpace
from cifar_lab.sweeps.storage import open_storage, resolve_storage
from conftest import run_cli
from test_optuna_sweeper import FAST, SMALL


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("content", [b"important notes\n", b'{"not": "a journal"}\n', b"\x00\x01binary",
                                     b"[1, 2, 3]\n"])
def test_journal_storage_refuses_a_file_that_is_not_a_journal(tmp_path: Path, content: bytes) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_bytes(content)
    before = _digest(victim)
    with pytest.raises(ConfigError, match="is not an Optuna journal; nothing was written to it"):
        open_storage(resolve_storage(f"journal:{victim}", tmp_path))
    assert _digest(victim) == before


def test_a_real_journal_is_reopened(tmp_path: Path) -> None:
    url = resolve_storage(f"journal:{tmp_path / 'study.log'}", tmp_path)
    optuna.create_study(storage=open_storage(url), study_name="s").optimize(lambda t: t.suggest_float("x", 0, 1), 1)
    assert len(optuna.load_study(study_name="s", storage=open_storage(url)).trials) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_storage_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    db.chmod(0o444)
    with pytest.raises(ConfigError, match="is not a readable and writable file"):
        open_storage(resolve_storage(f"sqlite:///{db}", tmp_path))


def test_read_only_folder_for_a_new_storage_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a regular file where the storage's folder would be
    for setting in (f"journal:{blocker / 'study.log'}", f"sqlite:///{blocker / 'optuna.db'}"):
        with pytest.raises(ConfigError, match="cannot be created"):
            open_storage(resolve_storage(setting, tmp_path))
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("recorded, now", [
    (CategoricalDistribution([16, 32]), IntDistribution(16, 64)),
    (FloatDistribution(1e-4, 1e-1, log=True), CategoricalDistribution([0.1, 0.01])),
    (CategoricalDistribution(["adam", "sgd"]), CategoricalDistribution(["adam", "sgd", "rmsprop"])),
])
def test_a_changed_search_space_names_the_parameter(tmp_path: Path, recorded, now) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    value = recorded.choices[0] if isinstance(recorded, CategoricalDistribution) else recorded.low
    study.add_trial(optuna.trial.create_trial(params={"p": value},
                                              distributions={"p": recorded}, value=0.5))
    with pytest.raises(ConfigError, match=r"hydra.sweeper.params.p: the study 's' already searched it .*"
                                          r"hydra.sweeper.study_name=<new name>"):
        SearchSpace({"p": now}, []).check_study(study, "s")
    SearchSpace({"p": recorded, "q": now}, []).check_study(study, "s")  # the same space (plus a new key) goes on


def _args(sweep_dir: Path, *extra: str) -> list[str]:
    return ["hparams_search=optuna", *FAST, *(o for o in SMALL if not o.startswith("data.batch_size")),
            f"hydra.sweep.dir={sweep_dir}", *extra]


@pytest.mark.slow
def test_resuming_with_a_changed_space_is_refused_before_any_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    first = run_cli(_args(sweep_dir, "hydra.sweeper.n_trials=1", "data.batch_size=choice(32,64)"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(_args(sweep_dir, "hydra.sweeper.n_trials=2", "data.batch_size=range(16,64)"), tmp_path)
    assert again.returncode == 2, again.stderr[-3000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "hydra.sweeper.params.data.batch_size" in errors[0], again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    study = optuna.load_study(study_name="simple_cnn", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
