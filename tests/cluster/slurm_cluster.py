"""A throw-away one-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in a temporary folder (its own munge key and socket, slurm.conf, state, spool, logs
and free ports), so the machine's own SLURM or munge setup is neither used nor touched. The daemons
run in the foreground as children of the test process and are stopped by their process ids, and
only those. Client commands (``sbatch``, ``srun``, ``sinfo``, ``scontrol``) reach the cluster
through ``SLURM_CONF``, which :attr:`Cluster.env` sets.

The node is this machine with the CPUs and memory ``slurmd -C`` reports; no accounting
(``sacct`` has nothing to read), ``proctrack/linuxproc`` and ``task/none`` (no cgroups needed),
``select/cons_tres`` with CPUs as the consumable resource.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["Cluster", "missing_binaries", "slurm_cluster"]

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "squeue")
START_TIMEOUT_S = 120


def missing_binaries() -> list[str]:
    """The SLURM and munge programs this machine lacks (apt-get install slurmctld slurmd slurm-client munge)."""
    return [name for name in BINARIES if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A running cluster: its folder, environment for client commands, node name and start time."""

    root: Path
    env: dict[str, str]
    node: str
    cpus: int
    started_in_s: float
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """A client command (sinfo, sbatch, scontrol, ...) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def job_state(self, job_id: str) -> str:
        """``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``, ... (from slurmctld's memory: no accounting)."""
        out = self.run("scontrol", "show", "job", job_id, "-o", check=False).stdout
        fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
        return fields.get("JobState", "UNKNOWN")

    def wait_for(self, job_id: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                               "NODE_FAIL", "OUT_OF_MEMORY"),
                 timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout:.0f} s\n{self.logs()}")

    def start_requeued_now(self, job_id: str, timeout: float = 120) -> None:
        """SLURM holds a requeued job for 120 s (its BeginTime); once it is pending again, let it start now."""
        deadline = time.monotonic() + timeout
        while self.job_state(job_id) != "PENDING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} was not requeued: {self.job_state(job_id)}\n{self.logs()}")
            time.sleep(0.2)
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").glob("*")))


def _config(root: Path, node_line: str, node: str, ports: tuple[int, int]) -> str:
    return f"""\
ClusterName=cifarlab
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root / 'munge' / 'munge.sock'}
CredType=cred/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MessageTimeout=30
KillWait=30
InactiveLimit=0
MinJobAge=600
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def slurm_cluster() -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd; yield once ``sinfo`` shows the node idle; stop them."""
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="cifar_lab_slurm_"))
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60, check=True).stdout
    node_line = next(line for line in probe.splitlines() if line.startswith("NodeName="))
    node = node_line.split()[0].split("=", 1)[1]
    cpus = int(next(part for part in node_line.split() if part.startswith("CPUs=")).split("=")[1])
    conf = root / "slurm.conf"
    conf.write_text(_config(root, node_line, node, (_free_port(), _free_port())))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(name)  # never inherit another job's identity
    cluster = Cluster(root, env, node, cpus, 0.0)
    log = (root / "log" / "daemons.out").open("w")
    try:
        munge = root / "munge"
        cluster.daemons.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge / 'munge.sock'}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"], stdout=log, stderr=subprocess.STDOUT))
        _wait(lambda: (munge / "munge.sock").exists(), "munged to open its socket", cluster)
        cluster.daemons.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=log,
                                                stderr=subprocess.STDOUT))
        _wait(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
              "slurmctld to answer", cluster)
        cluster.daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf), "-N", node], env=env, stdout=log,
                                                stderr=subprocess.STDOUT))
        _wait(lambda: cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle",
              "the node to be idle in sinfo", cluster)
        cluster.started_in_s = time.monotonic() - start
        yield cluster
    finally:
        _cancel_jobs(cluster)
        for daemon in reversed(cluster.daemons):  # slurmd, slurmctld, munged: ours only, by process id
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(timeout=30)
        log.close()
        _kill_leftovers(conf)
        shutil.rmtree(root, ignore_errors=True)


def _cancel_jobs(cluster: Cluster, timeout: float = 60) -> None:
    """Cancel every job of this cluster (all are the tests') and wait until slurmctld lists none running."""
    if not cluster.daemons or cluster.daemons[-1].poll() is not None:
        return
    jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
    if jobs:
        cluster.run("scancel", "--full", *jobs, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
        time.sleep(0.5)


def _kill_leftovers(conf: Path) -> None:
    """Job processes of this cluster still alive after its daemons stopped (slurmstepd and the job steps it
    started inherit ``SLURM_CONF=<this cluster's slurm.conf>``): killed by process id."""
    marker = f"SLURM_CONF={conf}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and int(environ.parent.name) != os.getpid():
                os.kill(int(environ.parent.name), 9)
        except (OSError, ValueError):
            continue


def _wait(ready, what: str, cluster: Cluster, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [d.args[0] for d in cluster.daemons if d.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0]} exited while waiting for {what}\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.25)
    raise TimeoutError(f"waited {timeout} s for {what}\n{cluster.logs()}")
