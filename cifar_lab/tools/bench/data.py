"""Measurement 1, the data path: augmented, normalised training batches per second of the
reference PIL pipeline and of cifar-lab's batched datamodule."""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset

from cifar_lab.tools.bench.lab import lab_batches, lab_datamodule
from cifar_lab.tools.bench.reference import reference_batches
from cifar_lab.tools.bench.settings import Settings
from cifar_lab.tools.bench.timing import _interleaved, _median, _sync


def time_batches(batches: Iterator, warmup: int, count: int, batch_size: int, device: torch.device) -> float:
    """Images/s over ``count`` batches after ``warmup`` untimed ones (worker start-up excluded)."""
    for _ in range(warmup):
        next(batches)
    _sync(device)
    start = time.perf_counter()
    for _ in range(count):
        x, _y = next(batches)
    _sync(device)
    return count * batch_size / (time.perf_counter() - start)


def bench_data(ref_dataset: Dataset, cfg, settings: Settings, device: torch.device, log) -> dict[str, Any]:
    bs = settings.batch_size
    dm = lab_datamodule(cfg, bs)

    def reference() -> float:
        it = reference_batches(ref_dataset, bs, settings.workers, device)
        try:
            return time_batches(it, settings.data_warmup, settings.data_batches, bs, device)
        finally:
            it.close()  # shuts the workers down before the other side runs

    def lab() -> float:
        it = lab_batches(dm, device)
        try:
            return time_batches(it, settings.data_warmup, settings.data_batches, bs, device)
        finally:
            it.close()

    runs = _interleaved(settings.repeats, {"reference": reference, "cifar_lab": lab}, log)
    x, _ = next(lab_batches(dm, device))
    return {
        "batch_size": bs,
        "reference": {"images_per_s": runs["reference"], "median": _median(runs["reference"]),
                      "workers": settings.workers},
        "cifar_lab": {"images_per_s": runs["cifar_lab"], "median": _median(runs["cifar_lab"]),
                      "output": f"{x.dtype} {'channels_last' if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else 'NCHW'}",
                      "augment": [type(op).__name__ for op in dm.train_augment.ops.values()]},
        "speedup": _median(runs["cifar_lab"]) / _median(runs["reference"]),
    }
