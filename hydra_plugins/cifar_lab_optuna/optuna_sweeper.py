"""The Hydra ``Sweeper`` plugin: a thin shell around :class:`cifar_lab.sweeps.optuna_sweeper.OptunaSearch`.

Hydra imports every module under ``hydra_plugins`` at start-up, so Optuna is imported only when a
sweep uses this sweeper. A setting the user can fix stops the command with one line
(``Error: ...``) and exit code 2, as everywhere in cifar-lab.
"""

from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from cifar_lab.cli.exits import exit_on_user_error


class OptunaSweeper(Sweeper):
    """``hydra/sweeper=optuna``: an Optuna study searched with Hydra jobs (settings: ``hydra.sweeper.*``)."""

    def __init__(self, **settings: Any) -> None:
        from cifar_lab.sweeps.optuna_sweeper import OptunaSearch

        with exit_on_user_error():
            self.search = OptunaSearch(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        with exit_on_user_error():
            self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        with exit_on_user_error():
            self.search.sweep(arguments)
