"""What a run prints: a short header of what was chosen, and no noise the user cannot act on.

The whole composed config goes to ``<run>/config.yaml`` (and ``print_config=true`` prints it);
the console gets :func:`header`: the overrides, the run directory, the model and its size, the
data, the device and the measured precision and memory format. :func:`quiet_third_party`
filters known third-party messages that say nothing actionable, narrowly, by message and
origin; everything else still shows.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["quiet_third_party", "header", "format_duration", "PassProgress"]

# (logger name, start of the message) of Lightning info lines that offer nothing to act on
_QUIET_LINES = (
    ("lightning.pytorch.utilities.rank_zero", "Trainer already configured with model summary callbacks"),
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),
    ("lightning.pytorch.utilities.rank_zero", "Loading `train_dataloader` to estimate number of stepping batches"),
)


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)


def quiet_third_party() -> None:
    """Silence third-party messages the user cannot act on (idempotent)."""
    # Lightning 2.6 calls a torch pytree API torch deprecated; one line per fit/test, nothing to do.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"(lightning\.pytorch\.utilities\._pytree|typing_extensions)")
    # The model summary cannot size bf16 weights and says so; the count printed is still right.
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary",
                            module=r"lightning\.pytorch\.utilities\.model_summary")
    # Lightning's hint to start a command with srun on every machine that has it (a cluster's login node) applies
    # only inside an allocation (a job) where the command was started without srun.
    if not os.environ.get("SLURM_JOB_ID"):
        warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    by_logger: dict[str, list[str]] = {}
    for name, start in _QUIET_LINES:
        by_logger.setdefault(name, []).append(start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(tuple(starts)))


def _choice(choices: dict[str, str], group: str, fallback: Any) -> str:
    return choices.get(group) or str(fallback).rsplit(".", 1)[-1]


def _choices_without_none(choices: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in choices.items() if v not in ("None", "null", "")}


def _validation(cfg: DictConfig) -> str:
    """What the run validates on: nothing, a fold of k-fold cross-validation, the test set, or a held-out
    split of the training images."""
    limit = OmegaConf.select(cfg, "trainer.limit_val_batches", default=None)
    if limit is not None and float(limit) == 0:
        return "no validation (trainer.limit_val_batches=0; the final weights are tested)"
    if OmegaConf.select(cfg, "data.folds", default=None):
        return f"validation fold {cfg.data.fold} of {cfg.data.folds}"
    val_size = OmegaConf.select(cfg, "data.val_size", default=None)
    return "validation on the test set" if val_size == 0 else f"validation {val_size} images"


def header(cfg: DictConfig, run_dir: Path, params: int, choices: dict[str, str], overrides: list[str],
           tuned: Any) -> str:
    """The run's header: about a dozen lines saying what was chosen and where it goes."""
    data = cfg.data
    choices = _choices_without_none(choices)
    source = OmegaConf.select(cfg, "data.source._target_", default="") or ""
    threads = torch.get_num_threads()
    device = "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() and \
        str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")) in ("auto", "gpu", "cuda") else "CPU"
    if device == "CPU":
        from cifar_lab.host import cpu_name

        device = f"CPU {cpu_name()} ({threads} thread{'s' if threads != 1 else ''})"
    lines = [
        f"run directory : {run_dir}",
        f"overrides     : {' '.join(overrides) if overrides else '(none: the defaults)'}",
        f"experiment    : {choices.get('experiment') or 'none'}",
        f"model         : {_choice(choices, 'model', cfg.model.get('_target_', ''))} "
        f"({params:,} trainable parameters)",
        f"data          : {_choice(choices, 'data', source)}, batch {data.batch_size}, "
        f"{_validation(cfg)}, "
        f"augment {choices.get('augment', 'custom')}",
        f"optimizer     : {_choice(choices, 'optimizer', cfg.optimizer.get('_target_', ''))} "
        f"lr {OmegaConf.select(cfg, 'optimizer.lr', default='-')}, "
        f"scheduler {choices.get('scheduler', 'none')}",
        f"training      : {cfg.trainer.max_epochs} epochs, seed {cfg.seed}",
        f"device        : {device}",
        # where the choice came from: measured / cache / re-measured (why), with its margin
        f"precision     : {tuned.precision}, memory format {tuned.memory_format}, compile "
        f"{str(OmegaConf.select(cfg, 'module.compile', default=False)).lower()} ({getattr(tuned, 'label', tuned.source)})",
        f"full config   : {run_dir / 'config.yaml'} (print_config=true prints it here)",
    ]
    if os.environ.get("CIFAR_LAB_DATA"):
        lines.insert(5, f"data root     : {os.environ['CIFAR_LAB_DATA']} (CIFAR_LAB_DATA)")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class PassProgress:
    """Plain progress lines for a long pass outside the training loop (robustness, test, export parity)::

        robustness: 12/50 batches (fog s2), 1m 02s, about 3m 25s left

    A line every ``every_s`` seconds (default ``$CIFAR_LAB_PROGRESS_S``, else 10), and a last one
    when a pass that printed any ends; a pass shorter than ``every_s`` prints nothing.
    """

    def __init__(self, label: str, total: int, unit: str = "batches", every_s: float | None = None,
                 stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit, self.stream = label, max(1, int(total)), unit, stream
        self.every_s = float(os.environ.get("CIFAR_LAB_PROGRESS_S", 10)) if every_s is None else float(every_s)
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.printed = 0

    def advance(self, n: int = 1, detail: str = "") -> None:
        self.done = min(self.total, self.done + n)
        now = time.perf_counter()
        finished = self.done >= self.total
        if (finished and not self.printed and now - self.start < self.every_s) or \
                (not finished and now - self._last < self.every_s):
            return
        self._last = now
        self.printed += 1
        elapsed = now - self.start
        where = f" ({detail})" if detail else ""
        tail = (f"done in {format_duration(elapsed)}" if finished else
                f"{format_duration(elapsed)}, about {format_duration(elapsed / self.done * (self.total - self.done))} left")
        print(f"{self.label}: {self.done}/{self.total} {self.unit}{where}, {tail}", file=self.stream or sys.stdout,
              flush=True)
