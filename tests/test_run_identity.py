"""Run identity: every process of a job, and a restarted job, find one run directory.

The names come from the launcher's environment (SLURM, torchrun); the end-to-end tests run
``train.py`` in real subprocesses with that environment set, as SLURM would, including a
requeue: the first start is stopped by SIGTERM or SIGUSR1 mid-training and the restart
(``SLURM_RESTART_COUNT=1``) continues in the same directory to exactly the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_lab.runs import identity
from conftest import ROOT, SYNTH, run_cli, run_command, start_command


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("env,name", [
    ({"SLURM_JOB_ID": "4242"}, "slurm-4242"),
    ({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "3"}, "slurm-4200_3"),
    ({"TORCHELASTIC_RUN_ID": "exp/1 a"}, "torchrun-exp-1-a"),  # one safe path component
    ({"TORCHELASTIC_RUN_ID": "none"}, None),                   # torchrun without --rdzv-id
    ({}, None),
])
def test_launcher_names(env: dict, name: str | None) -> None:
    assert identity.launcher_run_name(env) == name
    if name is not None:
        assert identity.run_name(env) == name


def test_without_a_launcher_the_name_is_time_and_pid() -> None:
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{{6}}-{os.getpid()}", identity.run_name({}))


@pytest.mark.parametrize("env,count", [
    ({"SLURM_JOB_ID": "1", "SLURM_RESTART_COUNT": "2"}, 2),
    ({"SLURM_JOB_ID": "1"}, 0),
    ({"SLURM_RESTART_COUNT": "2"}, 0),  # no job: a stale variable counts for nothing
    ({"TORCHELASTIC_RUN_ID": "x", "TORCHELASTIC_RESTART_COUNT": "1"}, 1),
    ({"SLURM_JOB_ID": "1", "SLURM_RESTART_COUNT": "junk"}, 0),
])
def test_restart_count(env: dict, count: int) -> None:
    assert identity.restart_count(env) == count


def test_requeue_without_slurm_says_so() -> None:
    assert identity.requeue_job({}) == "not a SLURM job: nothing requeued"


# ----------------------------------------------------------------------------- end to end
QUICK = [*SYNTH, "data.source.train_size=400", "data.source.test_size=100", "data.val_size=100",
         "logger=none", "callbacks.report=null", "trainer.deterministic=true"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**clean, "CIFAR_LAB_LOGS": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1", **extra}


def _runs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "logs" / "train" / "runs").glob("*"))


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_a_slurm_job_writes_its_named_directory_and_a_second_fresh_run_is_refused(tmp_path: Path) -> None:
    args = [*QUICK, "trainer.max_epochs=1"]
    proc = run_command([sys.executable, "train.py", *args], cwd=ROOT, env=_env(tmp_path, SLURM_JOB_ID="4242"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "logs" / "train" / "runs" / "slurm-4242"
    assert _runs(tmp_path) == ["slurm-4242"] and (run_dir / "metrics.json").is_file()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    # the same job id again without a restart (a second run in one job): refused, nothing rewritten
    again = run_command([sys.executable, "train.py", *args], cwd=ROOT, env=_env(tmp_path, SLURM_JOB_ID="4242"),
                           timeout=300)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "already holds a run, and this job was not restarted" in again.stderr
    assert "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before
    # an ordinary run (no launcher) still gets its own timestamped directory
    plain = run_cli(args, tmp_path, env={"SLURM_JOB_ID": "", "TORCHELASTIC_RUN_ID": ""})
    assert plain.returncode == 0, plain.stderr[-3000:]
    others = [name for name in _runs(tmp_path) if name != "slurm-4242"]
    assert len(others) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d_[\d_-]+-\d+", others[0]), others


def _stop_mid_training(tmp_path: Path, args: list[str], env: dict[str, str], signum: int):
    """Start train.py; once its first epoch ends, send ``signum``; return the finished process."""
    errors = tmp_path / f"stderr-{signum}.txt"
    proc = start_command([sys.executable, "train.py", *args], ROOT, env, stdout=subprocess.PIPE, stderr=errors)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.lstrip().startswith("epoch 1/"):
            proc.send_signal(signum)
            break
    proc.stdout.read()
    proc.wait(timeout=300)
    proc.stderr_text = errors.read_text()  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = run_command([sys.executable, "train.py", *QUICK, "trainer.max_epochs=4"], cwd=ROOT,
                          env=_env(tmp, SLURM_JOB_ID="1000"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(tmp / "logs" / "train" / "runs" / "slurm-1000")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_requeued_job_continues_in_its_directory_to_the_uninterrupted_result(
        tmp_path: Path, uninterrupted: dict, signum: int) -> None:
    args = [*QUICK, "trainer.max_epochs=4"]
    first = _stop_mid_training(tmp_path, args, _env(tmp_path, SLURM_JOB_ID="2000"), signum)
    assert first.returncode == 128 + signum, first.stderr_text[-3000:]
    run_dir = tmp_path / "logs" / "train" / "runs" / "slurm-2000"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "metrics.json").exists()
    assert "resumable checkpoint" in first.stderr_text
    if signum == signal.SIGUSR1:  # no SLURM here: the message says the job was not requeued, in one line
        assert re.search(r"(SLURM job 2000 was not requeued|`scontrol requeue 2000` failed: .+)\n", first.stderr_text)

    restarted = run_command([sys.executable, "train.py", *args], cwd=ROOT,
                               env=_env(tmp_path, SLURM_JOB_ID="2000", SLURM_RESTART_COUNT="1"),
                               timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "slurm-2000 (restart 1): resuming from" in restarted.stderr + restarted.stdout
    assert _runs(tmp_path) == ["slurm-2000"]  # one directory for the whole job
    resumed = _metrics(run_dir)
    assert resumed["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["metrics"] == uninterrupted["metrics"]  # test/acc, test/loss, every val metric: exactly


# ----------------------------------------------------------------------------- quiet on a login node
@pytest.mark.slow
def test_the_srun_hint_appears_only_inside_an_allocation(tmp_path: Path) -> None:
    """A machine with srun on PATH (a cluster's login node): Lightning's hint to use srun only in a job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # only looked up on PATH, never run
    (bin_dir / "srun").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    hint = "The `srun` command is available on your system but is not used"
    args = [*QUICK, "debug=fast_dev_run"]
    login = run_command([sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'login'}"], cwd=ROOT,
                           env=_env(tmp_path, PATH=path), timeout=300)
    assert login.returncode == 0, login.stderr[-3000:]
    assert hint not in login.stderr + login.stdout
    # inside a job (an allocation) without srun: the hint applies
    job = run_command([sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'job'}"], cwd=ROOT,
                         env=_env(tmp_path, PATH=path, SLURM_JOB_ID="31"), timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert (job.stderr + job.stdout).count(hint) == 1
