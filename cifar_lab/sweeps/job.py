"""The Optuna trial the current Hydra job runs, reached through the study's storage.

The sweeper gives each job ``hydra.sweeper.trial=<number>``; the job's Hydra config also holds the
study's name, storage and pruner, so a job in another process or on another machine reports to the
same study.
"""

from __future__ import annotations

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_lab.sweeps.storage import open_storage, resolve_storage

__all__ = ["current_trial"]


def current_trial() -> optuna.Trial | None:
    """This job's trial, or None outside a job of the Optuna sweeper."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not in a Hydra job
        return None
    sweeper = hydra_cfg.sweeper
    number = OmegaConf.select(sweeper, "trial", default=None)
    if number is None:
        return None
    storage = open_storage(resolve_storage(sweeper.storage, hydra_cfg.sweep.dir))
    pruner = instantiate(OmegaConf.to_container(sweeper.pruner, resolve=True))
    study = optuna.load_study(study_name=sweeper.study_name, storage=storage, pruner=pruner,
                              sampler=optuna.samplers.RandomSampler())
    study_id = storage.get_study_id_from_name(sweeper.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, int(number)))
