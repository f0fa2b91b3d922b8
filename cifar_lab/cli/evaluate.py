"""Evaluate a trained checkpoint on the test set, with the config it was trained with.

    python -m cifar_lab.evaluate ckpt_path=<run dir or .ckpt> [overrides]

``ckpt_path`` is a .ckpt file or a training run directory (its best checkpoint, see
:mod:`cifar_lab.checkpoints`). The config is rebuilt by composing the training command's
own overrides (its ``.hydra/overrides.yaml``, or the copy stored in the checkpoint) and then
the ones given here (:mod:`cifar_lab.config.compose`), so keys of the
groups the training run chose can be set directly (``data.source.test_size=100`` for a
``data=synthetic`` run), and a group choice (``data=imagefolder``, ``trainer=cpu``) replaces
that group. The network is the one saved with the checkpoint.

The job writes, in its own run directory (``logs/evaluate/runs/...`` or ``hydra.run.dir``):
``config.yaml`` (the config used), the report files of the configured callbacks
(``classification_report.txt``, ``confusion_matrix.png``, ...), TensorBoard events and
``metrics.json`` with the ``test/*`` metrics. With ``robustness=true`` it also measures the
accuracy under common corruptions (:mod:`cifar_lab.deploy.robustness`): ``robustness.json``,
``robustness.md``, the heat map ``robustness.png`` and ``robustness/*`` TensorBoard scalars.
``MODEL_CARD.md`` (:mod:`cifar_lab.deploy.model_card`) describes the evaluated checkpoint, with the
robustness summary when measured.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_lab import checkpoints
from cifar_lab.builders.assemble import Assembly, assemble
from cifar_lab.builders.settle import EVALUATE, runtime_record, settle
from cifar_lab.deploy import robustness
from cifar_lab.deploy.corruptions import SEVERITIES, check_corruptions
from cifar_lab.deploy.robustness import corruption_accuracy
from cifar_lab.callbacks.tta import as_tested
from cifar_lab.config.compose import from_training, hydra_job, replayable
from cifar_lab.config.schema import check_tta
from cifar_lab.models import trainable_params
from cifar_lab.runs.summary import data_record, scalars, write_summary
from cifar_lab.config.tree import print_and_save
from cifar_lab.errors import ConfigError
from cifar_lab.cli.exits import run_command
from cifar_lab.deploy.model_card import card_for_run, command_line
from cifar_lab.runs.directory import RunDirLock, holds_run, refuse_symlinks

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- evaluation


def _training_summary(ckpt_file: Path) -> dict[str, Any]:
    parent = ckpt_file.resolve().parent
    run_dir = checkpoints.run_dir_of_checkpoint(ckpt_file) or (parent.parent if parent.name == "checkpoints" else parent)
    if not (run_dir / "metrics.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def evaluate(cfg: DictConfig, ckpt_file: Path, checkpoint: dict[str, Any], config_source: str = "") -> dict[str, Any]:
    """Test the checkpoint's weights with ``cfg``; write reports and metrics.json in the run directory."""
    start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    refuse_symlinks(run_dir)
    if holds_run(run_dir) and not _is_evaluation(run_dir):
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds a training run; evaluate writes its own metrics.json and reports, so "
            "it needs a directory of its own: leave hydra.run.dir out, or choose an empty or new directory"
        )
    lock = RunDirLock(run_dir).acquire() if rank_zero_only.rank == 0 else None
    try:
        return _evaluate(cfg, ckpt_file, checkpoint, config_source, run_dir, start)
    finally:
        if lock is not None:
            lock.release()


def _is_evaluation(run_dir: Path) -> bool:
    """An earlier evaluate job's directory (its metrics.json says so), which may be written again."""
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("task") == "evaluate"
    except (OSError, ValueError, AttributeError):
        return False


def _evaluate(cfg: DictConfig, ckpt_file: Path, checkpoint: dict[str, Any], config_source: str, run_dir: Path,
              start: float) -> dict[str, Any]:
    """Settle, assemble, test (and measure robustness), report."""
    _check_evaluation_options(cfg)
    settled = settle(cfg, EVALUATE, trained=(ckpt_file, checkpoint))
    cfg = settled.cfg
    if rank_zero_only.rank == 0:
        print_and_save(cfg, run_dir, print_tree=bool(cfg.get("print_config", False)))
        log.info("evaluating %s with the config from %s", ckpt_file, config_source)
        print(_runtime_line(settled), flush=True)
    L.seed_everything(cfg.seed, workers=True)
    run = assemble(settled, run_dir)
    try:
        run.trainer.test(run.module, datamodule=run.datamodule)
    except SystemExit:  # Lightning exits with status 1 after Ctrl-C: the command's own code is 130
        if run.trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    robust = _robustness(cfg, run.trainer, run.module, run.datamodule, run_dir) if cfg.get("robustness") else None
    summary = _summary(run, ckpt_file, checkpoint, config_source, robust, start)
    if run.trainer.is_global_zero:
        _write_results(run, summary, ckpt_file, checkpoint, robust)
    return summary


def _check_evaluation_options(cfg: DictConfig) -> None:
    """evaluate's own keys (tta.*, corruption.*), before any work."""
    check_tta(cfg.get("tta"), int(OmegaConf.select(cfg, "data.source.image_size", default=32) or 32))
    if cfg.get("robustness"):  # a bad corruption name stops the job before the test runs
        check_corruptions((cfg.get("corruption") or {}).get("names", "all"),
                          list((cfg.get("corruption") or {}).get("severities", SEVERITIES)))
        robustness.check_max_images((cfg.get("corruption") or {}).get("max_images"))


def _runtime_line(settled: Any) -> str:
    record = runtime_record(settled)
    return (f"precision {record['precision']}, memory format {record['memory_format']}, compile "
            f"{str(record['compile']).lower()} ({settled.decision.source})")


def _summary(run: Assembly, ckpt_file: Path, checkpoint: dict[str, Any], config_source: str,
             robust: dict[str, Any] | None, start: float) -> dict[str, Any]:
    """metrics.json's content."""
    cfg, trainer = run.settled.cfg, run.trainer
    tta = cfg.get("tta") or {}
    trained = _training_summary(ckpt_file)
    return {
        "task": "evaluate",
        "run_dir": str(cfg.paths.output_dir),
        "ckpt_path": str(ckpt_file),
        "train_run_dir": str(trained.get("run_dir") or checkpoints.run_dir_of_checkpoint(ckpt_file) or ""),
        "config_source": config_source,
        "model": trained.get("model") or str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1],
        "choices": trained.get("choices", {}),
        "params": trainable_params(run.module.net),
        "data": data_record(_data_choice(cfg), {"test": run.datamodule.splits["test"]}),
        "epochs": int(checkpoint.get("epoch", -1)) + 1,
        "global_step": int(checkpoint.get("global_step", 0)),
        "seed": cfg.seed,
        "tta": OmegaConf.to_container(cfg.tta, resolve=True) if tta.get("enabled", False) else None,
        **runtime_record(run.settled),
        "metrics": scalars(trainer.callback_metrics, ("test/",)),
        "robustness": {k: robust[k] for k in ("clean_acc", "mean_corruption_acc", "mean_relative_drop")
                       } if robust else None,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }


def _write_results(run: Assembly, summary: dict[str, Any], ckpt_file: Path, checkpoint: dict[str, Any],
                   robust: dict[str, Any] | None) -> None:
    """metrics.json and MODEL_CARD.md in the evaluation's directory (rank 0)."""
    cfg = run.settled.cfg
    run_dir = Path(cfg.paths.output_dir)
    write_summary(run_dir, summary)
    training, _ = checkpoints.saved_overrides(ckpt_file, checkpoint)
    trained = _training_summary(ckpt_file)
    evaluation = [f"ckpt_path={ckpt_file}", *(["robustness=true"] if robust else [])]
    card_for_run(run_dir, cfg, run.module.net, run.datamodule, run.trainer, choices={"model": summary["model"],
                 **summary["choices"]}, overrides=training or [],
                 wall_time_s=trained.get("wall_time_total_s", trained.get("wall_time_s")),
                 checkpoint=str(ckpt_file), robustness=robust, recorded=summary,
                 command=command_line("python train.py", training or []) + "\n"
                 + command_line("python -m cifar_lab.evaluate", evaluation))
    print(f"Run directory: {run_dir}")


def _data_choice(cfg: DictConfig) -> str:
    """The data option this evaluation composed (e.g. ``cifar10_1``), else the source class."""
    from hydra.core.hydra_config import HydraConfig

    try:
        choice = HydraConfig.get().runtime.choices.get("data")
    except ValueError:
        choice = None
    return str(choice or str(OmegaConf.select(cfg, "data.source._target_", default="")).rsplit(".", 1)[-1])


def _robustness(cfg: DictConfig, trainer: L.Trainer, module: Any, datamodule: Any, run_dir: Path) -> dict[str, Any]:
    """Accuracy under corruption on the test set (:mod:`cifar_lab.deploy.robustness`): files, scalars, a table."""
    options = cfg.get("corruption") or {}
    names, severities = check_corruptions(options.get("names", "all"), list(options.get("severities", SEVERITIES)))
    images, labels = datamodule.splits["test"]
    result = corruption_accuracy(  # the test pass's network (TTA included) and its clean test/acc
        as_tested(module.net, trainer.callbacks), datamodule.normalize, images, labels, names, severities,
        batch_size=int(options.get("batch_size") or datamodule.eval_batch_size),
        clean_acc=float(trainer.callback_metrics["test/acc"]),
        device=trainer.strategy.root_device, seed=int(options.get("seed", 0)),
        autocast=trainer.strategy.precision_plugin.forward_context,
        max_images=robustness.check_max_images(options.get("max_images")))
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(robustness.scalars(result), step=trainer.global_step)
        robustness.write_report(result, run_dir)
        print(robustness.format_table(result), end="")
    return result


def ckpt_argument(overrides: Sequence[str]) -> str | None:
    """The value of ``ckpt_path=...`` among command-line overrides (the last one wins)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # noqa: BLE001 - Hydra's parse error, one line
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    values = [o.value() for o in parsed if o.key_or_group == "ckpt_path" and not o.is_delete()]
    return str(values[-1]) if values else None


def run(overrides: Sequence[str], output_dir: str | Path | None = None, *, logging_to_file: bool = False
        ) -> dict[str, Any]:
    """``python -m cifar_lab.evaluate <overrides>``; the job directory is ``output_dir`` (else hydra.run.dir)."""
    ckpt_file = checkpoints.resolve(ckpt_argument(overrides), "use")
    checkpoint = checkpoints.load(ckpt_file)
    saved, config_origin = checkpoints.saved_config(ckpt_file, checkpoint)
    training, source = checkpoints.saved_overrides(ckpt_file, checkpoint)
    if training is None:
        log.warning("%s: the training command's overrides are not known; composing on the defaults", ckpt_file)
    replayed = replayable(training or [], overrides)
    with hydra_job("evaluate", [*replayed, *overrides], output_dir, logging_to_file=logging_to_file) as cfg:
        from_training(cfg, saved, overrides)
        with open_dict(cfg):
            cfg.ckpt_path = str(ckpt_file)
        return evaluate(cfg, ckpt_file, checkpoint, source or config_origin)


def main(argv: Sequence[str] | None = None) -> None:
    run_command(run, __doc__, argv)


if __name__ == "__main__":
    main()
