"""Peak resident memory of cifar-lab's data path relative to the uint8 images it holds,
read from ``/proc/self/status`` (Linux only; elsewhere reported as unavailable)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from cifar_lab.tools.bench.lab import lab_batches, lab_datamodule
from cifar_lab.tools.bench.settings import Settings


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_memory(cfg, settings: Settings, device: torch.device) -> dict[str, Any]:
    """Peak resident memory of cifar-lab's data path (setup + training batches) over the
    bytes of the uint8 images it keeps, read from /proc/self/status (VmHWM, reset first)."""
    gc.collect()
    base = _status_kb("VmRSS")
    if base is None or not _reset_peak_rss():
        return {"available": False}
    dm = lab_datamodule(cfg, settings.batch_size, cached=False)
    it = lab_batches(dm, device)
    for _ in range(settings.memory_batches):
        next(it)
    it.close()
    peak = _status_kb("VmHWM") or 0
    # whole storages, counted once: splits may be views of one buffer
    held = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x, _y in dm.splits.values()}
    dataset_bytes = sum(held.values())
    result = {
        "available": True,
        "dataset_uint8_mb": dataset_bytes / 2**20,
        "peak_rss_increase_mb": (peak - base) / 1024,
        "peak_ratio": (peak - base) * 1024 / dataset_bytes,
        "val_size": int(cfg.data.val_size),
        "batches": settings.memory_batches,
    }
    del dm
    gc.collect()
    return result
