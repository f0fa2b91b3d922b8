"""OmegaConf resolvers the configs use; registered when cifar_lab is imported."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def register() -> None:
    # The process id makes run directories unique even for runs started in the same microsecond.
    if not OmegaConf.has_resolver("cifar_lab.pid"):
        OmegaConf.register_new_resolver("cifar_lab.pid", lambda: str(os.getpid()), use_cache=True)
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
