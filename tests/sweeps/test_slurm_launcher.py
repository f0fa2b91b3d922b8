"""hydra/launcher=slurm composes for every sweeper and trainer: a grid sweep (no Optuna keys), CPU-only jobs,
one task per device of the trainer (the jobs run on the real cluster in tests/cluster/test_slurm.py)."""

from __future__ import annotations


import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cifar_lab  # noqa: F401  (registers resolvers)
from conftest import CONF


def _launcher(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize("overrides,tasks,parallel", [
    ([], 1, 256),                                               # grid sweep, the default trainer: one task
    (["trainer=ddp_cpu"], 2, 256),                              # a trial is a 2-task DDP job under srun
    (["trainer=ddp", "hydra.launcher.gpus_per_node=4"], 4, 256),  # devices: -1, one task per GPU of the node
    (["hparams_search=optuna", "hydra.sweeper.n_jobs=3"], 1, 3),  # Optuna: n_jobs trials at once
])
def test_the_slurm_launcher_composes(overrides: list[str], tasks: int, parallel: int) -> None:
    launcher = _launcher(overrides)
    assert launcher["tasks_per_node"] == tasks
    assert launcher["array_parallelism"] == parallel


def test_cpu_only_jobs() -> None:
    assert _launcher(["hydra.launcher.gpus_per_node=0"])["gpus_per_node"] == 0
