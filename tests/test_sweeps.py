"""Sweeps: failed jobs are recorded and the sweep goes on; the Optuna search runs and reports its best."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict, read_write

from cifar_lab.sweeps.report import SweepReport, best_job, collect_jobs
from cifar_lab.sweeps.runner import TrialFailed, mark_job, run_task
from conftest import SYNTH, compose_cfg, run_cli

# One batch per stage, no loggers or callbacks: each job costs about a second after startup.
# A negative learning rate fails either in config validation or in torch's optimizer.
LR_ERROR = re.compile(r"optimizer\.lr|learning rate")
FAST = [*(o for o in SYNTH if not o.startswith("callbacks.")), "callbacks=none", "debug=fast_dev_run", "logger=none"]


# ---------------------------------------------------------------------------- run_task
def _job_cfg(tmp_path: Path, multirun: bool = True):
    cfg = compose_cfg(["data=synthetic", "model=simple_cnn"], tmp_path / "job")
    hydra_cfg = HydraConfig.instance().cfg
    with read_write(hydra_cfg.hydra), open_dict(hydra_cfg.hydra):
        hydra_cfg.hydra.mode = "MULTIRUN" if multirun else "RUN"
    return cfg


def _record(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def test_failing_job_in_multirun_returns_nan_and_records_error(tmp_path: Path) -> None:
    cfg = _job_cfg(tmp_path)

    def task(_):
        raise ValueError("Invalid learning rate: -1")

    assert math.isnan(run_task(task, cfg))
    job_dir = tmp_path / "job"
    assert "ValueError: Invalid learning rate: -1" in (job_dir / "error.txt").read_text()
    assert "Traceback" in (job_dir / "error.txt").read_text()
    record = _record(job_dir)
    assert record["status"] == "failed" and record["error"] == "ValueError: Invalid learning rate: -1"
    assert record["objective"] == {"name": "val/acc_best", "value": None}


def test_failing_job_outside_multirun_raises(tmp_path: Path) -> None:
    cfg = _job_cfg(tmp_path, multirun=False)
    with pytest.raises(ValueError):
        run_task(lambda _: (_ for _ in ()).throw(ValueError("boom")), cfg)
    assert not (tmp_path / "job" / "error.txt").exists()


def test_nan_objective_or_loss_is_a_failure(tmp_path: Path) -> None:
    cfg = _job_cfg(tmp_path)
    job_dir = tmp_path / "job"
    assert math.isnan(run_task(lambda _: float("nan"), cfg))
    assert _record(job_dir)["status"] == "failed" and "val/acc_best=nan" in (job_dir / "error.txt").read_text()

    # a diverged run: accuracy finite, loss not
    (job_dir / "error.txt").unlink()
    (job_dir / "metrics.json").write_text(json.dumps({"metrics": {"train/loss": float("nan"), "val/acc_best": 0.1}}))
    assert math.isnan(run_task(lambda _: 0.1, cfg))
    assert "train/loss=nan" in _record(job_dir)["error"]


def test_successful_job_records_status_and_objective(tmp_path: Path) -> None:
    cfg = _job_cfg(tmp_path)
    job_dir = tmp_path / "job"
    job_dir.mkdir(parents=True)
    (job_dir / "metrics.json").write_text(json.dumps({"metrics": {"val/acc_best": 0.5, "val/loss": 1.2}}))
    assert run_task(lambda _: 0.5, cfg) == 0.5
    record = _record(job_dir)
    assert record["status"] == "ok" and record["objective"] == {"name": "val/acc_best", "value": 0.5}
    assert record["metrics"]["val/loss"] == 1.2  # training's own record is kept
    assert not (job_dir / "error.txt").exists()


# ---------------------------------------------------------------------------- SweepReport
def _job_return(value) -> JobReturn:
    ret = JobReturn()
    ret.status = JobStatus.COMPLETED
    ret.return_value = value
    return ret


@pytest.mark.parametrize("sweeper,fails", [
    ("hydra_plugins.cifar_lab_optuna.optuna_sweeper.OptunaSweeper", True),
    ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", False),
])
def test_nan_job_becomes_failed_for_optuna_only(sweeper: str, fails: bool, tmp_path: Path) -> None:
    _job_cfg(tmp_path)
    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": sweeper}, "runtime": {"output_dir": str(tmp_path)}}})
    ok, nan = _job_return(0.5), _job_return(float("nan"))
    report = SweepReport()
    report.on_job_end(config, ok)
    report.on_job_end(config, nan)
    assert ok.status == JobStatus.COMPLETED and ok.return_value == 0.5
    if fails:
        assert nan.status == JobStatus.FAILED
        with pytest.raises(TrialFailed):
            float(nan.return_value)  # what the Optuna sweeper does: the trial is told FAIL
    else:
        assert nan.status == JobStatus.COMPLETED and math.isnan(nan.return_value)


def _fake_job(sweep_dir: Path, num: int, overrides: list[str], status: str, value: float | None) -> Path:
    job = sweep_dir / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), job / ".hydra" / "hydra.yaml")
    (job / "config.yaml").write_text(f"job: {num}\n")
    record = {"status": status, "objective": {"name": "val/acc_best", "value": value}}
    if status == "failed":
        record["error"] = "ValueError: boom"
        (job / "error.txt").write_text("Traceback ...\nValueError: boom\n")
    (job / "metrics.json").write_text(json.dumps(record))
    return job


def test_sweep_summary_picks_best_and_lists_failures(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    _fake_job(sweep, 0, ["optimizer.lr=0.1", "model=a"], "ok", 0.4)
    _fake_job(sweep, 1, ["optimizer.lr=-1", "model=a"], "failed", None)
    _fake_job(sweep, 2, ["optimizer.lr=0.01", "model=a"], "ok", 0.7)
    _fake_job(sweep, 10, ["optimizer.lr=0.02", "model=a"], "ok", 0.7)  # tie: the first one wins
    jobs = collect_jobs(sweep)
    assert [j["num"] for j in jobs] == [0, 1, 2, 10]
    assert best_job(jobs)["num"] == 2 and best_job(jobs, "minimize")["num"] == 0
    assert best_job(jobs, params={"optimizer.lr": 0.02})["num"] == 10  # the sweeper's own pick

    OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": {"optimizer.lr": 0.01}, "best_value": 0.7}),
                   sweep / "optimization_results.yaml")
    config = OmegaConf.create({"optimized_metric": "val/acc_best",
                               "hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"direction": "maximize"}}})
    SweepReport().on_multirun_end(config)

    summary = OmegaConf.load(sweep / "sweep_summary.yaml")
    assert (summary.n_jobs, summary.n_ok, summary.n_failed) == (4, 3, 1)
    assert summary.best.num == 2 and summary.best.value == 0.7
    assert (sweep / "best_config.yaml").read_text() == "job: 2\n"
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == 0.7 and results.best_job.num == 2 and results.n_failed == 1
    assert results.failed_jobs[0].num == 1 and results.failed_jobs[0].error == "ValueError: boom"
    out = capsys.readouterr().out
    assert "Best job 2" in out and "failed: ValueError: boom" in out
    # the summary names the best config's file; it does not print the config (print_best_config=true does)
    assert f"config:    {sweep / 'best_config.yaml'}" in out and "job: 2" not in out
    SweepReport(print_best_config=True).on_multirun_end(config)
    assert "job: 2" in capsys.readouterr().out


# what a job killed while its config was saved left in .hydra/ (save_hydra_files writes config.yaml, then
# overrides.yaml, each file whole): nothing, the empty folder, config.yaml alone
SAVED_WHEN_KILLED = {"nothing": None, "empty .hydra": {}, "config.yaml": {"config.yaml": "job: 1\n"}}


@pytest.mark.parametrize("saved", SAVED_WHEN_KILLED.values(), ids=SAVED_WHEN_KILLED.keys())
def test_a_job_killed_before_hydra_saved_its_config_is_listed_as_failed(tmp_path: Path, capsys, saved) -> None:
    """The sweeper marks a dead worker's trial in its folder; Hydra may not have written ``.hydra`` yet,
    or only part of it."""
    sweep = tmp_path / "sweep"
    _fake_job(sweep, 0, ["optimizer.lr=0.1"], "ok", 0.4)
    (sweep / "1").mkdir()
    if saved is not None:
        (sweep / "1" / ".hydra").mkdir()
        for name, text in saved.items():
            (sweep / "1" / ".hydra" / name).write_text(text)
    mark_job(sweep / "1", "failed", "its worker stopped (no heartbeat for 2 s)")
    (sweep / "2").mkdir()  # an empty folder (killed before anything) and a stray record are not jobs
    (sweep / "notes").mkdir()
    (sweep / "notes" / "metrics.json").write_text("[1, 2]")
    jobs = collect_jobs(sweep)
    assert [(j["num"], j["status"], j["overrides"]) for j in jobs] == [(0, "ok", ["optimizer.lr=0.1"]),
                                                                       (1, "failed", [])]
    config = OmegaConf.create({"optimized_metric": "val/acc_best", "hydra": {"sweep": {"dir": str(sweep)}}})
    SweepReport().on_multirun_end(config)
    out = capsys.readouterr().out
    assert "Sweep finished: 2 jobs, 1 ok, 1 failed" in out and "worker stopped" in out


def test_a_stale_trial_is_marked_only_in_its_own_folder_of_this_sweep(tmp_path: Path) -> None:
    """A dead worker's trial is marked failed in this sweep's folder for it (made if the job never started):
    the folder a study's attribute names is data, and another sweep's folder or any other path is left as it was."""
    import time

    import optuna
    from optuna.trial import TrialState

    from cifar_lab.sweeps.heartbeat import HEARTBEAT_ATTR
    from cifar_lab.sweeps.optuna_sweeper import JOB_DIR_ATTR, OptunaSearch

    sweep, victim, other = tmp_path / "sweep", tmp_path / "victim", tmp_path / "other sweep"
    for folder in (sweep / "1", victim, other / "3"):
        folder.mkdir(parents=True)
    (victim / "metrics.json").write_text('{"status": "ok"}')
    (sweep / "1" / ".hydra").mkdir()  # killed while its config was being saved
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    named = {0: sweep / "0", 1: sweep / "1", 2: victim, 3: other / "3", 4: None}  # 0: killed before its job began
    for number, folder in named.items():
        trial = study.ask()
        assert trial.number == number
        if folder is not None:
            trial.set_user_attr(JOB_DIR_ATTR, str(folder))
        study._storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time() - 60)
    search = OptunaSearch(direction="maximize", study_name="s", storage=None, n_trials=5, n_jobs=1, n_workers=1,
                          sampler=None, pruner=None, params=None, heartbeat_interval=0.5, grace_period=2)
    search.sweep_dir = sweep
    search._fail_stale(study._storage, study._study_id)

    assert [t.state for t in study.trials] == [TrialState.FAIL] * 5
    assert (victim / "metrics.json").read_text() == '{"status": "ok"}' and sorted(p.name for p in victim.iterdir()) == [
        "metrics.json"]
    assert sorted(p.name for p in (other / "3").iterdir()) == [] and sorted(p.name for p in sweep.iterdir()) == ["0", "1"]
    jobs = collect_jobs(sweep)
    assert [(j["num"], j["status"]) for j in jobs] == [(0, "failed"), (1, "failed")]
    assert all("worker stopped" in j["error"] for j in jobs)


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_grid_sweep_goes_on_after_a_failing_job(tmp_path: Path) -> None:
    """``-m model=a,b optimizer.lr=0.01,-1``: 4 jobs, the two with a negative lr fail, the sweep completes."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *FAST, "model=simple_cnn,simple_cnn_bn", "optimizer=adam", "optimizer.lr=0.01,-1",
                    f"hydra.sweep.dir={sweep_dir}",
                    "hydra.callbacks.sweep_report.print_best_config=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {int(p.name): p for p in sweep_dir.iterdir() if p.is_dir()}
    assert sorted(jobs) == [0, 1, 2, 3]
    for num, job in jobs.items():
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        record = _record(job)
        if "optimizer.lr=-1" in overrides:
            assert record["status"] == "failed" and LR_ERROR.search(record["error"]), record
            assert LR_ERROR.search((job / "error.txt").read_text())
        else:
            assert record["status"] == "ok" and record["metrics"]["val/acc_best"] >= 0
    models = {_record(j)["choices"]["model"] for j in jobs.values() if _record(j)["status"] == "ok"}
    assert models == {"simple_cnn", "simple_cnn_bn"}
    summary = OmegaConf.load(sweep_dir / "sweep_summary.yaml")
    assert (summary.n_jobs, summary.n_ok, summary.n_failed) == (4, 2, 2)
    assert "Sweep finished: 4 jobs, 2 ok, 2 failed" in proc.stdout


@pytest.mark.slow
def test_optuna_sweep_records_failed_trial_and_best_result(tmp_path: Path) -> None:
    """hparams_search=optuna, 2 TPE trials over the real search space, the lr choice made so that
    one trial fails (with seed 42 the TPE sampler's first two draws are lr 0.01 then -1)."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", "hparams_search=optuna", *FAST, "seed=42", "hydra.sweeper.n_trials=2",
                    "optimizer.lr=choice(0.01,-1)", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr

    results = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    assert results["name"] == "optuna"
    assert set(results["best_params"]) == {"model.filters", "model.kernel_sizes", "model.fc_units", "model.dropout",
                                           "optimizer.lr", "data.batch_size"}
    jobs = {int(p.name): _record(p) for p in sweep_dir.iterdir() if p.is_dir()}
    assert sorted(jobs) == [0, 1]
    statuses = sorted(r["status"] for r in jobs.values())
    assert statuses == ["failed", "ok"], f"expected one failing trial, got {statuses}"
    ok = next(r for r in jobs.values() if r["status"] == "ok")
    failed_num = next(n for n, r in jobs.items() if r["status"] == "failed")
    # the failure went to Optuna as a FAIL trial, not a crash
    assert f"trial {failed_num} failed" in output and LR_ERROR.search(output)
    assert results["n_fail"] == 1 and results["n_complete"] == 1
    assert (sweep_dir / str(failed_num) / "error.txt").is_file()
    # best result: the completed trial, with its value, params, run dir and config
    assert results["best_value"] == pytest.approx(ok["metrics"]["val/acc_best"])
    assert results["best_params"]["optimizer.lr"] == 0.01 and results["n_failed"] == 1
    assert results["best_job"]["dir"] == ok["run_dir"]
    assert results["failed_jobs"][0]["num"] == failed_num
    best_config = OmegaConf.load(sweep_dir / "best_config.yaml")
    assert best_config.optimizer.lr == 0.01 and best_config.model._target_.endswith("SimpleCNN")
    assert list(best_config.model.filters) == json.loads(results["best_params"]["model.filters"])
    # the value and the best config's path printed at the end, not the config itself
    assert "Best job" in proc.stdout and f"config:    {sweep_dir / 'best_config.yaml'}" in proc.stdout
    assert "optimizer:" not in proc.stdout


@pytest.mark.slow
def test_optuna_two_trials_all_ok(tmp_path: Path) -> None:
    """The plain search: two TPE trials on synthetic data, both complete, best written and printed; the
    study in <sweep dir>/optuna.db."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["hparams_search=optuna", *FAST, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    values = [_record(sweep_dir / str(n))["objective"]["value"] for n in (0, 1)]
    assert results.best_value == pytest.approx(max(values)) and results.n_failed == 0
    assert 1e-4 <= results.best_params["optimizer.lr"] <= 1e-2
    assert results.best_params["data.batch_size"] in (32, 64, 128, 256)
    assert "best value" in proc.stdout and "Sweep finished: 2 jobs, 2 ok, 0 failed" in proc.stdout
    # the study is kept in the sweep directory (SQLite) and can be watched
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    assert f"storage: {storage}" in proc.stdout and f"optuna-dashboard {storage}" in proc.stdout
    assert results.n_complete == 2 and (sweep_dir / "optuna.db").is_file()
