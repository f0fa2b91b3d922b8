"""``logger=wandb``: what the other loggers get, for Weights & Biases runs.

Lightning's :class:`~lightning.pytorch.loggers.WandbLogger` logs the metrics; the report callback
adds the run config (as W&B config, once) and the report files (saved into the run's files),
and the training command saves ``metrics.json`` and ``MODEL_CARD.md`` the same way and finishes
the W&B run, so the next job of a sweep gets a run of its own. Offline runs (the default without
an API key, :func:`cifar_lab.config.resolvers`'s ``cifar_lab.wandb_offline``) live in
``<run dir>/wandb/offline-run-*``; ``wandb sync <that folder>`` uploads them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lightning.pytorch.loggers import WandbLogger

__all__ = ["log_config", "save_files", "finish"]

log = logging.getLogger(__name__)


def _wandb(loggers: Iterable[Any]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def log_config(loggers: Iterable[Any], params: Callable[[], dict[str, Any]]) -> None:
    """The flattened run config as each W&B run's config."""
    for logger in _wandb(loggers):
        try:
            logger.log_hyperparams(params())
        except Exception as err:  # noqa: BLE001 - a tracking hiccup does not stop training
            log.warning("could not log the config to W&B: %s", err)


def save_files(loggers: Iterable[Any], files: Sequence[Path]) -> None:
    """Copy ``files`` (report files, metrics.json, the model card) into each W&B run's files."""
    for logger in _wandb(loggers):
        try:
            for path in files:
                if path.is_file():
                    logger.experiment.save(str(path), base_path=str(path.parent), policy="now")
        except Exception as err:  # noqa: BLE001 - the files stay in the run directory either way
            log.warning("could not save the report files to W&B: %s", err)


def finish() -> None:
    """End this process's W&B run, if one is active (offline: its files are complete for ``wandb sync``).

    Called when a training job ends, however it ends, so the next job of a sweep starts a run of its own.
    """
    wandb = sys.modules.get("wandb")  # never imported here: only when a WandbLogger started a run
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.finish()
    except Exception as err:  # noqa: BLE001
        log.warning("could not finish the W&B run: %s", err)
