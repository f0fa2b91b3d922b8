"""Turn the composed config into the objects a run needs."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cifar_lab.module import ClassifierModule

log = logging.getLogger(__name__)


def task_overrides() -> list[str]:
    """This job's command-line overrides (empty outside a Hydra job)."""
    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:
        return []


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    return instantiate(cfg.data, _convert_="all")


def build_module(cfg: DictConfig) -> ClassifierModule:
    """The network from ``model``, optimizer and scheduler partials, wrapped in the module."""
    scheduler_cfg = cfg.get("scheduler") or {}
    scheduler = instantiate(scheduler_cfg.get("scheduler")) if scheduler_cfg.get("scheduler") else None
    # A partial first: the run config passed as `hparams` holds `_target_`s that
    # instantiate() would otherwise try to build.
    module_factory = instantiate(cfg.module, _partial_=True, _convert_="all")
    return module_factory(
        net=instantiate(cfg.model, _convert_="all"),
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        scheduler_interval=scheduler_cfg.get("interval", "epoch"),
        scheduler_frequency=scheduler_cfg.get("frequency", 1),
        scheduler_monitor=scheduler_cfg.get("monitor", "val/loss"),
        hparams=OmegaConf.to_container(cfg, resolve=True),
        run_overrides=task_overrides(),
    )


def _instantiate_group(group: DictConfig | None, kind: str) -> list:
    objects = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ValueError(f"{kind}.{name} has no _target_; each {kind} entry must name a class to build")
        objects.append(instantiate(node, _convert_="all"))
    return objects


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return _instantiate_group(cfg.get("callbacks"), "callbacks")


def build_loggers(cfg: DictConfig) -> list:
    return _instantiate_group(cfg.get("logger"), "logger")


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    if not loggers:
        # LearningRateMonitor refuses to run without a logger; with logger=none it has nowhere to write.
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
