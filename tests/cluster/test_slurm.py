"""train.py on a real one-node SLURM cluster (tests/cluster/slurm_cluster.py): a grid and an Optuna sweep
through hydra/launcher=slurm, the sbatch templates of docs/slurm/ (single job, 2-task DDP), and requeued jobs
(`scontrol requeue`, SIGUSR1 before the time limit) continuing in their one run directory to exactly the
uninterrupted result.

Every job is tiny (synthetic data, a few hundred images, 1-4 epochs, CPU only, one thread).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, SYNTH  # tests/conftest.py
from slurm_cluster import Cluster, missing_binaries, slurm_cluster

pytestmark = pytest.mark.slow

QUICK = [*SYNTH, "data.source.train_size=400", "data.source.test_size=100", "data.val_size=100",
         "logger=none", "callbacks.report=null", "trainer.deterministic=true"]
# the templates ask for a GPU node; the test cluster is one CPU node
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The one-node cluster, started once for this module; skipped where SLURM is not installed."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM on this machine (missing {', '.join(missing)}); install it with "
                    "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's slurmd runs jobs as root: run the cluster tests as root (CI does)")
    with slurm_cluster() as running:
        print(f"\nSLURM test cluster: node {running.node} ({running.cpus} CPUs) idle {running.started_in_s:.1f} s "
              "after start", file=sys.stderr)
        yield running


def _env(cluster: Cluster, tmp_path: Path, **extra: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # the templates call `python`
    return {**cluster.env, "CIFAR_LAB_LOGS": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1",
            "PATH": f"{venv_bin}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **extra}


def _sbatch(cluster: Cluster, tmp_path: Path, template: str, args: list[str], options: tuple[str, ...] = (),
            **env: str) -> tuple[str, Path]:
    """Submit a docs/slurm template with train.py overrides; returns the job id and its output file."""
    out = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", f"--chdir={ROOT}", *CPU_JOB, *options,
                           str(ROOT / "docs" / "slurm" / template), *args],
                          env=_env(cluster, tmp_path, **env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], out


def _finished(cluster: Cluster, job: str, out: Path) -> None:
    state = cluster.wait_for(job)
    text = out.read_text(errors="replace") if out.exists() else "(no output)"
    assert state == "COMPLETED", f"job {job}: {state}\n{text[-4000:]}"


def _signal_after_first_epoch(cluster: Cluster, job: str, out: Path, command: list[str]) -> None:
    deadline = time.monotonic() + 300
    while "epoch 1/4" not in (out.read_text(errors="replace") if out.exists() else ""):
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), \
            out.read_text(errors="replace")[-3000:] if out.exists() else cluster.job_state(job)
        time.sleep(0.2)
    cluster.run(*command)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _runs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "logs" / "train" / "runs").glob("*"))


def test_grid_sweep_through_the_slurm_launcher(cluster: Cluster, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=20",
         *QUICK, "trainer.max_epochs=1", "optimizer.lr=0.01,0.001", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=_env(cluster, tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job, lr in (("0", 0.01), ("1", 0.001)):
        summary = _metrics(sweep / job)
        assert summary["metrics"]["test/acc"] >= 0
        assert json.loads(json.dumps(summary))["run_dir"] == str(sweep / job)
    assert (sweep / "sweep_summary.yaml").is_file()
    # each job ran as a SLURM job (its submitit log), both at once (a grid sweep has no n_jobs)
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2
    # no accounting on this cluster: at most one line about sacct, not one per poll
    assert (proc.stdout + proc.stderr).count("sacct") <= 1, proc.stderr[-3000:]


def test_optuna_sweep_through_the_slurm_launcher(cluster: Cluster, tmp_path: Path) -> None:
    sweep = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, "train.py", "hparams_search=optuna", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=20",
         "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *QUICK, "trainer.max_epochs=1",
         f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=_env(cluster, tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert trials == ["0", "1"]
    assert all(_metrics(sweep / t)["status"] == "ok" for t in trials)
    assert (sweep / "optimization_results.yaml").is_file() and (sweep / "optuna.db").is_file()
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2  # both trials ran as SLURM jobs
    assert (proc.stdout + proc.stderr).count("sacct") <= 1


def test_ddp_template_two_tasks_write_one_run_directory(cluster: Cluster, tmp_path: Path) -> None:
    args = [a for a in QUICK if a != "trainer=cpu"] + ["trainer.max_epochs=1"]
    job, out = _sbatch(cluster, tmp_path, "ddp.sbatch", args,
                       ("--nodes=1", "--ntasks-per-node=2"), TRAINER="ddp_cpu")
    _finished(cluster, job, out)
    assert _runs(tmp_path) == [f"slurm-{job}"]
    summary = _metrics(tmp_path / "logs" / "train" / "runs" / f"slurm-{job}")
    assert summary["metrics"]["test/acc"] >= 0
    assert out.read_text().count("Run directory:") == 1  # rank 0 wrote it, once


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same run on this machine, one thread, never stopped."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "train.py", *QUICK, "trainer.max_epochs=4",
                           f"hydra.run.dir={tmp / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "1", "CIFAR_LAB_LOGS": str(tmp / "logs")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(tmp / "run")


@pytest.mark.parametrize("how", ["scontrol requeue", "SIGUSR1"])
def test_a_requeued_job_continues_in_its_run_directory(cluster: Cluster, tmp_path: Path, uninterrupted: dict,
                                                        how: str) -> None:
    job, out = _sbatch(cluster, tmp_path, "train.sbatch", [*QUICK, "trainer.max_epochs=4"])
    # SIGUSR1 is what --signal=USR1@90 sends before the time limit (train.py requeues the job itself);
    # `scontrol requeue` is a pre-emption's or an administrator's (SIGTERM to the job)
    command = ["scancel", "--signal=USR1", job] if how == "SIGUSR1" else ["scontrol", "requeue", job]
    _signal_after_first_epoch(cluster, job, out, command)
    cluster.start_requeued_now(job)
    _finished(cluster, job, out)
    text = out.read_text()
    assert "resumable checkpoint" in text and f"slurm-{job} (restart 1): resuming from" in text, text[-4000:]
    if how == "SIGUSR1":
        assert f"requeued SLURM job {job}" in text
    shown = cluster.run("scontrol", "show", "job", job, "-o").stdout
    assert "Restarts=1" in shown, shown
    assert _runs(tmp_path) == [f"slurm-{job}"]  # one directory for both starts
    resumed = _metrics(tmp_path / "logs" / "train" / "runs" / f"slurm-{job}")
    assert resumed["resumed_from"].endswith(f"slurm-{job}/checkpoints/last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["metrics"] == uninterrupted["metrics"]  # test accuracy and every other metric, exactly


def test_a_ddp_job_warned_by_sigusr1_saves_requeues_and_continues(cluster: Cluster, tmp_path: Path) -> None:
    """Both processes stop after the same batch, save, and the requeued job finishes the run in its directory.
    (Not bit-exact like a single process: the checkpoint holds rank 0's random state only.)"""
    args = [a for a in QUICK if a != "trainer=cpu"] + ["trainer.max_epochs=4"]
    job, out = _sbatch(cluster, tmp_path, "ddp.sbatch", args, ("--nodes=1", "--ntasks-per-node=2"),
                       TRAINER="ddp_cpu")
    _signal_after_first_epoch(cluster, job, out, ["scancel", "--signal=USR1", job])
    cluster.start_requeued_now(job)
    _finished(cluster, job, out)
    text = out.read_text()
    assert "training stopped by SIGUSR1; resumable checkpoint" in text, text[-4000:]
    assert f"requeued SLURM job {job}" in text and f"slurm-{job} (restart 1): resuming from" in text, text[-4000:]
    assert _runs(tmp_path) == [f"slurm-{job}"]
    resumed = _metrics(tmp_path / "logs" / "train" / "runs" / f"slurm-{job}")
    assert resumed["resumed_from"].endswith(f"slurm-{job}/checkpoints/last.ckpt") and resumed["epochs"] == 4
    assert resumed["global_step"] == 4 * 3  # 300 training images, 2 x 64 per step: 3 steps an epoch, none lost
