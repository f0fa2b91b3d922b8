"""A memory budget for training steps: what the batch-size finder compares each trial with.

On a GPU the device runs out by itself; on a CPU the machine swaps or the kernel kills the
process long before torch notices. :class:`MemoryBudget` measures a trial's peak memory (the
process's peak resident memory on a CPU, via Linux's ``/proc/self/clear_refs`` reset of the
high-water mark; the peak reserved CUDA memory on a GPU) after every training step and raises
:class:`OverBudget` past the budget.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch

__all__ = ["MemoryBudget", "OverBudget", "peak_memory", "reset_peak_memory", "supported"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class OverBudget(RuntimeError):
    """A training step's peak memory went over the budget."""


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's peak statistics, or the process's resident high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _CLEAR_REFS.write_text("5")


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak since :func:`reset_peak_memory`: CUDA memory reserved, or resident process memory."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    found = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    if found is None:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return int(found.group(1)) * 1024


def supported(device: torch.device) -> bool:
    """Whether peaks can be measured here (CUDA, or Linux with a resettable high-water mark)."""
    return device.type == "cuda" or (_STATUS.is_file() and _CLEAR_REFS.exists())


class MemoryBudget(L.Callback):
    """Measure the peak memory of a fit's training steps; raise :class:`OverBudget` past ``budget_bytes``.

    ``peak`` is the largest peak seen since the fit started (``None`` before the first step).
    """

    def __init__(self, budget_bytes: int | None) -> None:
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.peak: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak = None
        reset_peak_memory(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.peak = max(peak_memory(pl_module.device), self.peak or 0)
        if self.budget_bytes is not None and self.peak > self.budget_bytes:
            raise OverBudget(f"batch {len(batch[1])} peaked at {self.peak / 2**30:.2f} GiB, over the budget of "
                             f"{self.budget_bytes / 2**30:.2f} GiB")
