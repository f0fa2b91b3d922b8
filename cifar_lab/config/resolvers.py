"""OmegaConf resolvers the configs use; registered when cifar_lab is imported."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from cifar_lab.runs import identity


def register() -> None:
    # The process id makes run directories unique even for runs started in the same microsecond.
    if not OmegaConf.has_resolver("cifar_lab.pid"):
        OmegaConf.register_new_resolver("cifar_lab.pid", lambda: str(os.getpid()), use_cache=True)
    # A run directory's name: the launcher's job identity (SLURM job, torchrun run id), so every process of
    # one job and a requeued job agree on it; else the start time and process id (cifar_lab/runs/identity.py).
    if not OmegaConf.has_resolver("cifar_lab.run_name"):
        OmegaConf.register_new_resolver("cifar_lab.run_name", lambda: identity.run_name(), use_cache=True)
    # SLURM tasks per node for a job (conf/hydra/launcher/slurm.yaml): one per device the trainer uses.
    if not OmegaConf.has_resolver("cifar_lab.tasks_per_node"):
        OmegaConf.register_new_resolver("cifar_lab.tasks_per_node", _tasks_per_node)
    # The last part of a path: a run's name from its directory (logger=mlflow's run_name).
    if not OmegaConf.has_resolver("cifar_lab.basename"):
        OmegaConf.register_new_resolver("cifar_lab.basename", lambda path: os.path.basename(str(path).rstrip("/")))
    # logger=wandb runs offline unless an API key is configured (WANDB_API_KEY or ~/.netrc).
    if not OmegaConf.has_resolver("cifar_lab.wandb_offline"):
        OmegaConf.register_new_resolver("cifar_lab.wandb_offline", _wandb_offline)


def _wandb_offline() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" not in f.read()
    except OSError:
        return True


def _tasks_per_node(devices: object, gpus_per_node: object) -> int:
    """``trainer.devices`` when it is a count, else (``-1``, ``auto``) the node's GPUs, at least one."""
    try:
        count = int(str(devices))
    except ValueError:
        count = -1
    if count > 0:
        return count
    try:
        return max(int(str(gpus_per_node)), 1)
    except ValueError:
        return 1
