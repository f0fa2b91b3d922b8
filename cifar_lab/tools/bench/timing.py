"""Timing helpers shared by the measurements: device, synchronisation, medians and the
interleaved repeats (A B, B A, A B, ...) every comparison runs."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _interleaved(repeats: int, runners: dict[str, Callable[[], float]], log: Callable[[str], None]) -> dict[str, list[float]]:
    """Runs each runner once per repeat, reversing the order every other repeat."""
    names = list(runners)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            value = runners[name]()
            out[name].append(value)
            log(f"    {name:<28s} repeat {r + 1}/{repeats}: {value:10.1f} images/s")
    return out
