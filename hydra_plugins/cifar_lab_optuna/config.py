"""The ``hydra/sweeper=optuna`` config node (registered in Hydra's ConfigStore when Hydra scans its plugins)."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    """``hydra.sweeper.*``: the study, its search space, and how its trials run."""

    _target_: str = "hydra_plugins.cifar_lab_optuna.optuna_sweeper.OptunaSweeper"
    # sampler and pruner are built by the sweeper (each worker seeds its sampler differently)
    _recursive_: bool = False
    # maximize or minimize the job's return value (optimized_metric)
    direction: str = "maximize"
    study_name: str = "study"
    # null: SQLite file <sweep dir>/optuna.db; an RDB URL (postgresql://user@host/db); journal:<file>
    storage: Optional[str] = None
    # trials finished in total (COMPLETE, PRUNED or FAIL): a re-run resumes up to this number
    n_trials: int = 20
    # trials launched together through hydra/launcher (in parallel with submitit or joblib)
    n_jobs: int = 1
    # worker processes of this command sharing the study (each runs its trials in turn)
    n_workers: int = 1
    sampler: Dict[str, Any] = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    pruner: Dict[str, Any] = field(default_factory=lambda: {"_target_": "optuna.pruners.NopPruner"})
    # key: search space in Hydra's override grammar, e.g. optimizer.lr: tag(log, interval(1e-4, 1e-2))
    params: Dict[str, Any] = field(default_factory=dict)
    # a running trial is stamped every heartbeat_interval s; one not stamped for grace_period s is
    # failed (its worker died)
    heartbeat_interval: float = 30.0
    grace_period: float = 120.0
    # set by the sweeper for each job: the trial it runs
    trial: Optional[int] = None


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="cifar_lab")
