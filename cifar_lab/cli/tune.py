"""Finders for a training run as composed by ``train.py``: the learning rate and the batch size.

    python -m cifar_lab.tune lr [--steps 100] [--min-lr 1e-6] [--max-lr 1] <train overrides>
    python -m cifar_lab.tune batch_size [--memory-gb G] [--rule linear|sqrt] [--max-trials 10] <train overrides>

Both compose the same config as ``python train.py <train overrides>`` (model, data, optimizer,
precision and the callbacks that change training, e.g. whitening), train a few steps in a
directory of their own (``logs/tune/runs/<time>/``) and print the override to use; neither
changes a config file or the run directories of ``train.py``.

The config is settled as ``train.py`` settles it (``auto`` precision, memory format and compilation
decided, printed and recorded in the finder's JSON); ``init_from=<checkpoint>`` starts the finder
from that checkpoint's weights (the network a fine-tuning run starts from), and ``ckpt_path`` is
refused (a finder resumes no run).

``lr``: Lightning's learning-rate range test (``Tuner.lr_find``): the rate grows exponentially
from ``--min-lr`` to ``--max-lr`` over ``--steps`` training steps, and the suggestion is the rate
of the steepest descent of the (smoothed) loss. ``lr_find.png`` (loss against rate, suggestion
marked) and ``lr_find.json`` are saved in the command's directory.

``batch_size``: the batch doubles from ``data.batch_size`` (as Lightning's batch-size scaler does
in power mode) while 3 training steps fit in memory, up to the whole training set. On a GPU the
limit is the device's memory (running out of it) or ``--memory-gb`` (peak reserved memory); on a
CPU it is ``--memory-gb`` (default: half the memory available when the command starts), compared
with the process's peak resident memory during the steps
(:mod:`cifar_lab.callbacks.memory_budget`); ``batch_size.json`` holds each size's peak.
The learning rate is rescaled by the rule ``--rule`` names: ``linear`` (Goyal et al. 2017,
lr x new/old batch; SGD) or ``sqrt`` (lr x sqrt(new/old); often preferred for Adam).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig, OmegaConf

from cifar_lab.builders.assemble import assemble
from cifar_lab.builders.settle import TUNE_BATCH_SIZE, TUNE_LR, Role, Settled, runtime_record, settle
from cifar_lab.callbacks.memory_budget import MemoryBudget, OverBudget, supported
from cifar_lab.config.compose import hydra_job
from cifar_lab.errors import ConfigError, InputError
from cifar_lab.cli.exits import exit_on_user_error

RULES = ("linear", "sqrt")


def _settled(cfg: DictConfig, role: Role, run_dir: Path) -> Settled:
    """The config settled as ``train.py`` settles it (a finder starts from init_from's weights where given),
    its choices printed and recorded in the finder's JSON."""
    settled = settle(cfg, role, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = runtime_record(settled)
    print(f"{role.name}: precision {record['precision']}, memory format {record['memory_format']}, compile "
          f"{str(record['compile']).lower()} ({settled.decision.source})", flush=True)
    L.seed_everything(settled.cfg.seed, verbose=False)
    return settled


def find_lr(cfg: DictConfig, run_dir: Path, steps: int, min_lr: float, max_lr: float) -> dict[str, Any]:
    """The range test's suggestion, its curve (``lr_find.json``) and plot (``lr_find.png``).

    It runs ``steps`` training steps whatever the run's epoch limits are (epochs end and start again as
    its batch limits say; validation, which the test does not use, is off); a run that trains no batch
    or stops by time is refused before any step.
    """
    _refuse_finder_limits(cfg)
    settled = _settled(cfg, TUNE_LR, run_dir)
    # --steps bounds the test: epochs (of limit_train_batches batches each) follow one another until then
    run = assemble(settled, run_dir, max_epochs=-1, min_epochs=None, limit_val_batches=0, num_sanity_val_steps=0)
    finder = Tuner(run.trainer).lr_find(run.module, datamodule=run.datamodule, min_lr=min_lr, max_lr=max_lr,
                                        num_training=steps, update_attr=False)
    if finder is None:
        raise ConfigError("the learning-rate range test did not run (fast_dev_run?); drop debug=fast_dev_run")
    suggestion = finder.suggestion()
    ran = len(finder.results.get("lr", []))
    if suggestion is None and ran == 0:
        raise ConfigError("the learning-rate range test ran no step; check the training data and batch limits")
    if suggestion is None and ran < steps:
        raise ConfigError(f"the learning-rate range test stopped after {ran} of its {steps} steps: the loss diverged "
                          f"(above 4x its lowest) at a rate of {finder.results['lr'][-1]:.3g}; lower --max-lr")
    if suggestion is None:
        raise ConfigError(f"the loss curve of {ran} steps is too short or flat to "
                          "suggest a rate; raise --steps or widen --min-lr/--max-lr")
    fig = finder.plot(suggest=True)
    fig.axes[0].set_title(f"Learning-rate range test ({steps} steps): suggested {suggestion:.3g}")
    fig.savefig(run_dir / "lr_find.png", dpi=100, bbox_inches="tight")
    result = {"suggestion": suggestion, "configured_lr": OmegaConf.select(cfg, "optimizer.lr"),
              **runtime_record(settled),
              "steps": steps, "min_lr": min_lr, "max_lr": max_lr, "lr": finder.results["lr"],
              "loss": finder.results["loss"]}
    (run_dir / "lr_find.json").write_text(json.dumps(result, indent=2))
    return result


def _refuse_finder_limits(cfg: DictConfig) -> None:
    """Run limits a range test of --steps steps cannot honour (no step at all, a time limit)."""
    trainer = cfg.trainer
    if trainer.get("limit_train_batches") in (0, 0.0):
        raise ConfigError("trainer.limit_train_batches=0 trains no batch, and the learning-rate range test needs "
                          "training steps; drop the override for the finder")
    if trainer.get("max_time"):
        raise ConfigError(f"trainer.max_time={trainer.max_time} would stop the learning-rate range test before its "
                          "--steps; drop it for the finder (--steps bounds the test)")


def rescaled_lr(lr: float, old: int, new: int, rule: str) -> float:
    """``lr`` for batch ``new`` from a batch of ``old`` by the named rule (``linear`` or ``sqrt``)."""
    ratio = new / old
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def _default_budget_gb() -> float:
    found = re.search(r"MemAvailable:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text())
    if found is None:
        raise InputError("cannot read the available memory (/proc/meminfo); give the budget with --memory-gb")
    return int(found.group(1)) / 2**20 / 2


def _trial(settled: Settled, run_dir: Path, budget: MemoryBudget, size: int, steps: int) -> None:
    """``steps`` training steps at batch ``size``, assembled afresh (no validation)."""
    run = assemble(settled.with_batch_size(size), run_dir, extra_callbacks=(budget,), max_epochs=1, max_steps=steps,
                   limit_train_batches=steps, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False)
    run.trainer.fit(run.module, datamodule=run.datamodule)


def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (OverBudget, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def find_batch_size(cfg: DictConfig, run_dir: Path, memory_gb: float | None, rule: str,
                    max_trials: int, steps: int = 3) -> dict[str, Any]:
    """The largest batch (``data.batch_size`` doubled while it fits) whose training steps stay in memory."""
    settled = _settled(cfg, TUNE_BATCH_SIZE, run_dir)
    device = torch.device("cuda" if _on_gpu(settled.cfg) else "cpu")
    if device.type != "cuda" and memory_gb is None:
        memory_gb = _default_budget_gb()
    if not supported(device):
        raise InputError("peak memory cannot be measured on this system (Linux /proc/self/clear_refs is needed); "
                         "run on Linux or a GPU")
    budget = MemoryBudget(None if memory_gb is None else int(memory_gb * 2**30))
    largest = int(settled.train_images or 0)  # no batch is larger than the training set
    start = int(cfg.data.batch_size)
    found, failure, peaks = _double_while_it_fits(settled, run_dir, budget, device, start, largest, max_trials, steps)
    if found is None:
        raise ConfigError(f"data.batch_size={start} does not fit: {failure}; start from a smaller data.batch_size"
                          + (" or raise --memory-gb" if memory_gb is not None else ""))
    lr = OmegaConf.select(cfg, "optimizer.lr")
    result = {"batch_size": found, "start": start, "device": str(device), "memory_gb": memory_gb,
              "stopped_by": failure or f"--max-trials {max_trials}", "rule": rule, "lr": lr,
              "rescaled_lr": rescaled_lr(float(lr), start, found, rule) if lr else None,
              "peaks_gib": {str(k): round(v, 3) for k, v in peaks.items()}, **runtime_record(settled)}
    (run_dir / "batch_size.json").write_text(json.dumps(result, indent=2))
    return result


def _on_gpu(cfg: DictConfig) -> bool:
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def _double_while_it_fits(settled: Settled, run_dir: Path, budget: MemoryBudget, device: torch.device, start: int,
                          largest: int, max_trials: int, steps: int) -> tuple[int | None, str, dict[int, float]]:
    """The largest size that trained, why the doubling stopped, and each size's peak memory (GiB)."""
    peaks: dict[int, float] = {}
    found, failure = None, ""
    size = min(start, largest)
    for _ in range(max_trials):
        try:
            _trial(settled, run_dir, budget, size, steps)
        except Exception as err:  # noqa: BLE001 - out of memory ends the search; anything else is raised
            if not _out_of_memory(err):
                raise
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            failure = message if isinstance(err, OverBudget) else f"batch {size}: {message}"
            break
        finally:
            if budget.peak is not None:
                peaks[size] = budget.peak / 2**30
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        found = size
        if size >= largest:
            failure = f"batch {size} is the whole training set"
            break
        size = min(2 * size, largest)
    return found, failure, peaks


def _print_lr(result: dict[str, Any], run_dir: Path) -> None:
    print(f"Learning-rate range test: {result['steps']} steps from {result['min_lr']:g} to {result['max_lr']:g} "
          f"(configured optimizer.lr={result['configured_lr']})")
    print(f"suggested learning rate: {result['suggestion']:.3g} (steepest descent of the smoothed loss)")
    print(f"plot: {run_dir / 'lr_find.png'}")
    print(f"use: optimizer.lr={result['suggestion']:.3g}")


def _print_batch_size(result: dict[str, Any], run_dir: Path) -> None:
    limit = f"{result['memory_gb']:.2f} GiB budget" if result["memory_gb"] is not None else "the device's memory"
    print(f"largest batch that fits {limit} on {result['device']}: {result['batch_size']} "
          f"(started at {result['start']}, doubled until {result['stopped_by']}; peak memory per batch size in "
          f"{run_dir / 'batch_size.json'})")
    override = f"data.batch_size={result['batch_size']}"
    if result["rescaled_lr"] is not None:
        rule = "lr x new/old batch" if result["rule"] == "linear" else "lr x sqrt(new/old batch)"
        print(f"learning rate by the {result['rule']} scaling rule ({rule}): {result['lr']:g} -> "
              f"{result['rescaled_lr']:.3g}")
        override += f" optimizer.lr={result['rescaled_lr']:.3g}"
    print(f"use: {override}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar_lab.tune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="finder", required=True)
    lr = sub.add_parser("lr", help="learning-rate range test")
    lr.add_argument("--steps", type=int, default=100, help="training steps of the test (default 100)")
    lr.add_argument("--min-lr", type=float, default=1e-6)
    lr.add_argument("--max-lr", type=float, default=1.0)
    batch = sub.add_parser("batch_size", help="largest batch that fits in memory")
    batch.add_argument("--memory-gb", type=float, default=None,
                       help="memory budget in GiB (CPU default: half the available memory; GPU: the device's)")
    batch.add_argument("--rule", choices=RULES, default="linear", help="how the learning rate follows the batch")
    batch.add_argument("--max-trials", type=int, default=10, help="doublings tried at most (default 10)")
    for p in (lr, batch):
        p.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=simple_cnn data=synthetic")
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The finder, its options and the train overrides, in any order (``--steps 50 model=x data=y``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    unknown = [word for word in extra if "=" not in word or word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    return args


def run(argv: Sequence[str]) -> dict[str, Any]:
    args = parse(argv)
    if args.finder == "lr" and (args.steps < 2 or not 0 < args.min_lr < args.max_lr):
        raise InputError("--steps must be >= 2 and 0 < --min-lr < --max-lr")
    if args.finder == "batch_size" and (args.max_trials < 1 or (args.memory_gb is not None and args.memory_gb <= 0)):
        raise InputError("--max-trials must be >= 1 and --memory-gb > 0")
    with hydra_job("train", ["task_name=tune", *args.overrides], logging_to_file=True) as cfg:
        run_dir = Path(cfg.paths.output_dir)
        if args.finder == "lr":
            result = find_lr(cfg, run_dir, args.steps, args.min_lr, args.max_lr)
            _print_lr(result, run_dir)
        else:
            result = find_batch_size(cfg, run_dir, args.memory_gb, args.rule, args.max_trials)
            _print_batch_size(result, run_dir)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    from cifar_lab.console import quiet_third_party

    quiet_third_party()
    with exit_on_user_error():
        run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
