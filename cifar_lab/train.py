"""Training entry logic: seed, build, fit, test the best checkpoint, write metrics.json."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from cifar_lab import builders
from cifar_lab.config_tree import print_and_save

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (the run directory)."""
    return Path(cfg.paths.output_dir)


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """``last`` stays Lightning's own (newest last.ckpt of this run dir); a run directory means its last.ckpt."""
    if ckpt_path in (None, "", "last"):
        return ckpt_path or None
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: no checkpoint at {path}. Pass a .ckpt file, a run directory holding "
            "checkpoints/last.ckpt, or ckpt_path=last together with hydra.run.dir=<that run directory>"
        )
    return str(path)


def _scalars(metrics: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for key, value in sorted(metrics.items()):
        if key.startswith(prefixes):
            out[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return out


def _choices() -> dict[str, str]:
    try:
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    except ValueError:  # not inside a Hydra app (tests calling train() directly)
        return {}


def train(cfg: DictConfig) -> float | None:
    """Run one training job as configured; return the metric named by ``optimized_metric``."""
    start = time.perf_counter()
    run_dir = run_dir_of(cfg)
    if rank_zero_only.rank == 0:
        print_and_save(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = builders.build_datamodule(cfg)
    if rank_zero_only.rank == 0:
        # Fail on missing data before anything expensive is built (other DDP ranks wait in fit).
        datamodule.prepare_data()
    module = builders.build_module(cfg)
    callbacks = builders.build_callbacks(cfg)
    loggers = builders.build_loggers(cfg)
    trainer = builders.build_trainer(cfg, callbacks, loggers)

    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path")))
    val_metrics = _scalars(trainer.callback_metrics, ("val/",))
    train_metrics = _scalars(trainer.callback_metrics, ("train/",))

    best_ckpt = ""
    if cfg.get("test", True):
        checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        best_ckpt = checkpoint.best_model_path if checkpoint else ""
        if not best_ckpt:
            log.warning("no best checkpoint was saved; testing the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=best_ckpt or None, weights_only=False)
    test_metrics = _scalars(trainer.callback_metrics, ("test/",))

    metrics = {**train_metrics, **val_metrics, **test_metrics}
    summary = {
        "run_dir": str(run_dir),
        "model": _choices().get("model", str(cfg.model.get("_target_", ""))),
        "choices": _choices(),
        "params": sum(p.numel() for p in module.net.parameters() if p.requires_grad),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_ckpt": best_ckpt,
        "seed": cfg.seed,
        "metrics": metrics,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        print(f"Run directory: {run_dir}")

    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; available: {sorted(metrics)}")
    value = metrics[name]
    return value if math.isfinite(value) else float("nan")
