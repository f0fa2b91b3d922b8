"""Which run this process belongs to: one run directory for every process of a job, found again on restart.

A run directory's name (``hydra.run.dir``, ``conf/hydra/default.yaml``) comes from the launcher's
identity when there is one, so every process of one job computes the same name on its own and a
restarted job finds its directory again:

* under SLURM: ``slurm-<job id>`` (``slurm-<array job id>_<array task id>`` for an array task); a
  requeued job keeps its id, and SLURM counts its restarts in ``SLURM_RESTART_COUNT``;
* under torchrun with a rendezvous id (``--rdzv-id``): ``torchrun-<id>``;
* otherwise the time of the start and the process id (``<date>_<time>_<usec>-<pid>``). Processes
  of one torchrun job without an id (``--rdzv-backend=static``, the default for a fixed
  ``--master-addr``) take the name global rank 0 chose, through torchrun's own store.

Lightning's DDP launcher passes rank 0's directory to the processes it starts, so ``trainer=ddp_cpu``
needs nothing here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta
from typing import Mapping

log = logging.getLogger(__name__)

__all__ = ["launcher_run_name", "run_name", "restart_count", "slurm_job_id", "requeue_job"]

# torchrun's run id when none was given (static rendezvous)
_NO_RUN_ID = ("", "none")
# how long ranks other than 0 wait for rank 0's name in torchrun's store
STORE_WAIT = timedelta(seconds=300)


def _safe(text: str) -> str:
    """A launcher's id as one path component (letters, digits, ``._-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job this process runs in (``<array job>_<task>`` for an array task), else None."""
    env = os.environ if env is None else env
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def launcher_run_name(env: Mapping[str, str] | None = None) -> str | None:
    """``slurm-<job>`` or ``torchrun-<run id>`` from the launcher's environment, else None."""
    env = os.environ if env is None else env
    job = slurm_job_id(env)
    if job:
        return f"slurm-{_safe(job)}"
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id.lower() not in _NO_RUN_ID:
        return f"torchrun-{_safe(run_id)}"
    return None


def _timestamped() -> str:
    return f"{datetime.now().strftime('%Y-%m-%d_%H-%M-%S_%f')}-{os.getpid()}"


def _shared_by_rank_zero(name: str, env: Mapping[str, str]) -> str:
    """Under torchrun without a run id: rank 0's ``name``, through the store torchrun's agent runs."""
    if int(env.get("WORLD_SIZE", "1")) <= 1 or "TORCHELASTIC_RUN_ID" not in env:
        return name
    from torch.distributed import TCPStore  # torch is there whenever torchrun is

    rank = int(env.get("RANK", "0"))
    key = f"cifar_lab/run_name/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=STORE_WAIT)
    if rank == 0:
        store.set(key, name)
        return name
    return store.get(key).decode()


def run_name(env: Mapping[str, str] | None = None) -> str:
    """The run directory's name for this process (see the module docstring)."""
    env = os.environ if env is None else env
    return launcher_run_name(env) or _shared_by_rank_zero(_timestamped(), env)


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often the launcher restarted this job: SLURM's requeues and pre-emptions, torchrun's restarts."""
    env = os.environ if env is None else env
    name = "SLURM_RESTART_COUNT" if slurm_job_id(env) else "TORCHELASTIC_RESTART_COUNT"
    try:
        return max(int(env.get(name, "0") or 0), 0)
    except ValueError:
        return 0


def requeue_job(env: Mapping[str, str] | None = None) -> str:
    """Ask SLURM to requeue this job (``scontrol requeue``); returns what happened, in words."""
    env = os.environ if env is None else env
    job = slurm_job_id(env)
    if job is None:
        return "not a SLURM job: nothing requeued"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"scontrol not found: SLURM job {job} was not requeued"
    done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        said = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        return f"`scontrol requeue {job}` failed: {said[-1] if said else f'exit code {done.returncode}'}"
    return f"requeued SLURM job {job}: it continues in this run directory"
