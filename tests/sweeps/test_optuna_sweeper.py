"""The Optuna sweeper end to end: storages, parallel workers, resume after kill -9, pruning, launchers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cifar_lab.sweeps.workers import cpu_count
from conftest import CONF, ROOT, SYNTH, run_cli
from postgres import postgres_bin, postgres_server

# Tiny jobs: synthetic data, one batch per stage, no loggers or callbacks but the pruning one.
FAST = [*(o for o in SYNTH if not o.startswith("callbacks.")), "callbacks=none", "debug=fast_dev_run",
        "logger=none"]
# The other searched parameters fixed small, so only the learning rate varies.
SMALL = ["model.filters=[16,32]", "model.kernel_sizes=[3,3]", "model.fc_units=128", "model.dropout=0.0",
         "data.batch_size=64"]


def _sweep_args(sweep_dir: Path, *extra: str) -> list[str]:
    return ["hparams_search=optuna", *FAST, *SMALL, f"hydra.sweep.dir={sweep_dir}",
            "hydra.callbacks.sweep_report.print_best_config=false", *extra]


def _study(storage: str, name: str = "simple_cnn") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def _record(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def _job_dirs(sweep_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


@pytest.mark.slow
def test_journal_storage(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(_sweep_args(sweep_dir, "hydra.sweeper.n_trials=2", "hydra.sweeper.storage=journal:"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    journal = sweep_dir / "optuna.log"
    assert f"optuna-dashboard {journal}" in proc.stdout and not (sweep_dir / "optuna.db").exists()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    assert [t.state for t in _study(storage).trials] == [TrialState.COMPLETE] * 2


@pytest.mark.slow
def test_two_workers_run_six_trials_once_each_in_parallel(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(_sweep_args(sweep_dir, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_workers=2"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study(f"sqlite:///{sweep_dir / 'optuna.db'}").trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials), [
        (t.number, t.state.name, _record(sweep_dir / str(t.number)).get("status")) for t in trials]
    assert _job_dirs(sweep_dir) == list(range(6))
    jobs = {n: _record(sweep_dir / str(n))["job"] for n in range(6)}
    assert sorted({t.user_attrs["job_dir"] for t in trials}) == sorted(str(sweep_dir / str(n)) for n in range(6))
    pids = {job["pid"] for job in jobs.values()}
    assert len(pids) == 2, jobs
    by_pid = {pid: [(j["started"], j["ended"]) for j in jobs.values() if j["pid"] == pid] for pid in pids}
    a, b = by_pid.values()
    assert any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b), f"the workers never overlapped: {by_pid}"
    # each of the 2 workers has half the cores' threads
    assert {job["threads"] for job in jobs.values()} == {max(1, cpu_count() // 2)}
    assert "Sweep finished: 6 jobs, 6 ok, 0 failed" in proc.stdout


@pytest.mark.slow
def test_killed_sweep_resumes_to_exactly_n_trials(tmp_path: Path) -> None:
    """kill -9 during trial 1: on the re-run trial 1 becomes FAIL (no heartbeat) and trial 2 runs; 3 in all."""
    sweep_dir = tmp_path / "sweep"
    args = _sweep_args(sweep_dir, "hydra.sweeper.n_trials=3", "hydra.sweeper.heartbeat_interval=0.5",
                       "hydra.sweeper.grace_period=2", "debug=limit", "trainer.max_epochs=3")
    env = {**os.environ, "CIFAR_LAB_LOGS": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (sweep_dir / "1").is_dir():  # trial 0 told, trial 1 started
            assert time.time() < deadline and first.poll() is None, "trial 1 did not start"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    study = _study(f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING]

    proc = run_cli(args, tmp_path)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [t.state for t in _study(f"sqlite:///{sweep_dir / 'optuna.db'}").trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert _job_dirs(sweep_dir) == [0, 1, 2]
    killed = _record(sweep_dir / "1")
    assert killed["status"] == "failed" and "worker stopped" in killed["error"]
    assert "Sweep finished: 3 jobs, 2 ok, 1 failed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_median_pruner_prunes_a_hopeless_trial(tmp_path: Path) -> None:
    """A learning rate so small that nothing is learnt: the median pruner stops it after its first epoch."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(_sweep_args(sweep_dir, "hydra.sweeper.n_trials=3", "debug=limit", "trainer.max_epochs=3",
                               "optimizer.lr=choice(0.003,1e-9)", "seed=11",
                               "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0"),
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study(f"sqlite:///{sweep_dir / 'optuna.db'}").trials
    assert trials[0].params["optimizer.lr"] == 0.003 and trials[0].state == TrialState.COMPLETE
    hopeless = [t for t in trials if t.params["optimizer.lr"] == 1e-9]
    assert hopeless and all(t.state == TrialState.PRUNED for t in hopeless)
    for t in hopeless:
        assert max(t.intermediate_values) < 2  # stopped before its last epoch (epoch index 2)
        record = _record(sweep_dir / str(t.number))
        assert record["status"] == "pruned" and "pruned after epoch" in record["error"]
        assert not (sweep_dir / str(t.number) / "error.txt").exists()
    assert "pruned" in proc.stdout


@pytest.mark.slow
def test_postgresql_storage(tmp_path: Path) -> None:
    """A real PostgreSQL server started here; two workers share the study through it."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; .ci/run installs them")
    sweep_dir = tmp_path / "sweep"
    with postgres_server(bin_dir) as url:
        proc = run_cli(_sweep_args(sweep_dir, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_workers=2",
                                   f"hydra.sweeper.storage='{url}'"), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"optuna-dashboard {url}" in proc.stdout
        assert [t.state for t in _study(url).trials] == [TrialState.COMPLETE] * 2
    assert not (sweep_dir / "optuna.db").exists() and _job_dirs(sweep_dir) == [0, 1]


def test_slurm_launcher_composes() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", ["hparams_search=optuna", "hydra/launcher=slurm", "hydra.sweeper.n_jobs=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.array_parallelism == 4 and launcher.gpus_per_node == 1
    assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.cifar_lab_optuna.optuna_sweeper.OptunaSweeper"
    assert cfg.callbacks.optuna_pruning.monitor == cfg.optimized_metric


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_batch_in_parallel(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # jobs of a few epochs, so their overlap does not hang on how fast each process starts
    proc = run_cli(_sweep_args(sweep_dir, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                               "hydra/launcher=submitit_local", "trainer.fast_dev_run=false",
                               "trainer.max_epochs=4"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [_record(sweep_dir / str(n))["job"] for n in (0, 1)]
    assert len({j["pid"] for j in jobs}) == 2
    assert jobs[0]["started"] < jobs[1]["ended"] and jobs[1]["started"] < jobs[0]["ended"], jobs
    assert [t.state for t in _study(f"sqlite:///{sweep_dir / 'optuna.db'}").trials] == [TrialState.COMPLETE] * 2


# ---------------------------------------------------------------------------- search space
def test_search_space_grammar() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from cifar_lab.sweeps.space import parse_space

    space = parse_space({"a": "choice([16,32], [32,64])", "b": "interval(0.0, 0.5)",
                         "c": "tag(log, interval(1e-4, 1e-2))", "d": "range(1, 9, 2)", "e": "choice(1, 2)"},
                        ["e=3", "f=x", "g=int(interval(1, 4))"])
    dist = space.distributions
    assert dist["a"] == CategoricalDistribution(["[16,32]", "[32,64]"])
    assert dist["b"] == FloatDistribution(0.0, 0.5) and dist["c"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert dist["d"] == IntDistribution(1, 7, step=2) and dist["g"] == IntDistribution(1, 4)
    assert "e" not in dist and space.fixed == ["e=3", "f=x"]  # the command line wins
    assert space.overrides({"a": "[16,32]", "b": 0.25}) == ["e=3", "f=x", "a=[16,32]", "b=0.25"]


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    from cifar_lab.errors import ConfigError
    from cifar_lab.sweeps.optuna_sweeper import OptunaSearch
    from cifar_lab.sweeps.storage import resolve_storage

    assert resolve_storage(None, tmp_path) == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert resolve_storage("journal:", tmp_path) == f"journal:{tmp_path / 'optuna.log'}"
    with pytest.raises(ConfigError, match="hydra.sweeper.storage='nowhere'"):
        resolve_storage("nowhere", tmp_path)
    settings = dict(direction="maximize", study_name="s", storage=None, n_trials=2, n_jobs=1, n_workers=1,
                    sampler={}, pruner={}, params={}, heartbeat_interval=30, grace_period=120)
    with pytest.raises(ConfigError, match="hydra.sweeper.direction='up'"):
        OptunaSearch(**{**settings, "direction": "up"})
    with pytest.raises(ConfigError, match="hydra.sweeper.n_workers=0"):
        OptunaSearch(**{**settings, "n_workers": 0})
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        OptunaSearch(**{**settings, "grace_period": 10})
