"""Several processes as on several machines: torchrun with 2 nodes on this host trains into one run directory
to exactly what ``trainer=ddp_cpu`` gives; a process killed with SIGKILL ends the run at once with one message
naming its rank and the resume command, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SYNTH, run_command, start_command

pytestmark = pytest.mark.slow

DDP = [a for a in SYNTH if a != "trainer=cpu"] + [
    "data.source.train_size=400", "data.source.test_size=101", "data.val_size=100", "trainer=ddp_cpu",
    "logger=none", "callbacks.report=null", "trainer.max_epochs=1"]


def _env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**clean, "CIFAR_LAB_LOGS": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_torchrun_on_two_nodes_writes_one_run_directory_with_the_ddp_cpu_result(tmp_path: Path) -> None:
    port = _free_port()
    # two commands, as on two machines (static rendezvous at node 0's address, no run id): the directory
    # name is the one rank 0 chose, shared through torchrun's store
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--master-addr=127.0.0.1", f"--master-port={port}", "train.py", *DDP, "trainer.devices=1",
         "trainer.num_nodes=2"], cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    runs = list((tmp_path / "logs" / "train" / "runs").glob("*"))
    assert len(runs) == 1, runs
    assert sum(output.count("Run directory:") for output in outputs) == 1

    single_node = tmp_path / "ddp_cpu"
    proc = run_command([sys.executable, "train.py", *DDP, f"hydra.run.dir={single_node}"], cwd=ROOT,
                          env=_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_nodes, one_node = _metrics(runs[0]), _metrics(single_node)
    assert two_nodes["metrics"]["test/acc"] == one_node["metrics"]["test/acc"]
    assert two_nodes["metrics"] == one_node["metrics"]  # every metric, exactly: same ranks, same data, same seed


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_killed_rank_ends_the_run_with_one_message_and_the_run_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*DDP, "data.source.train_size=1200", "trainer.max_epochs=4", f"hydra.run.dir={run_dir}"]
    proc = start_command([sys.executable, "train.py", *args], ROOT, _env(tmp_path), stdout=subprocess.PIPE,
                         stderr=tmp_path / "stderr.txt")
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 2/"):  # epoch 1's checkpoint is on disk by now
            break
    rank1 = _children(proc.pid)  # Lightning's launcher started rank 1 as a child of rank 0
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGKILL)
    proc.stdout.read()
    proc.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 5, stderr[-3000:]
    # exit code 5 and one message: the main thread reported, not Lightning's watcher killing it (which
    # raced it under load: tests/callbacks/test_peers.py)
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"Error: rank 1 (pid {rank1[0]}, killed by signal 9) of the 2 processes of this run "
                                "stopped"), errors[0]
    assert f"ckpt_path=last hydra.run.dir={run_dir}" in errors[0] and "Traceback" not in stderr
    assert f"the last checkpoint is {run_dir / 'checkpoints' / 'last.ckpt'}" in errors[0]

    resumed = run_command([sys.executable, "train.py", *args, "ckpt_path=last"], cwd=ROOT, env=_env(tmp_path),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _metrics(run_dir)
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt") and summary["epochs"] == 4


@pytest.mark.parametrize("rank", [0, 1])
def test_sigusr1_reaching_one_process_stops_both_after_the_same_batch(tmp_path: Path, rank: int) -> None:
    """SLURM's warning before the time limit (SIGUSR1) reaches the processes of a job one by one: here only one of
    them gets it. The processes agree on it after a batch and both stop there and save; the one that got it must
    not start a collective of its own, which the other never joins (both hung until the process-group timeout)."""
    run_dir = tmp_path / "run"
    # a SLURM job's id (the signal is SLURM's), no SLURM to requeue it in: the requeue is only reported
    (tmp_path / "slurm.conf").write_text("# no cluster: `scontrol requeue` fails at once\n")
    env = {**_env(tmp_path), "SLURM_JOB_ID": "424242", "SLURM_CONF": str(tmp_path / "slurm.conf")}
    args = [*DDP, "trainer.max_epochs=30", "trainer.process_group_timeout_s=60", f"hydra.run.dir={run_dir}"]
    proc = start_command([sys.executable, "train.py", *args], ROOT, env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 1/"):  # both processes are training, their handlers in place
            break
    processes = [proc.pid, *_children(proc.pid)]  # Lightning's launcher started rank 1 as a child of rank 0
    assert len(processes) == 2, processes
    os.kill(processes[rank], signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "training stopped by SIGUSR1; resumable checkpoint" in err and "Traceback" not in err, err[-3000:]
    assert "requeue 424242" in err or "SLURM job 424242" in err, err[-3000:]  # rank 0 tried the requeue
    assert err.count("training stopped by SIGUSR1; resumable checkpoint") == 2, err[-3000:]  # each process
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "Error:" not in err, err[-3000:]
