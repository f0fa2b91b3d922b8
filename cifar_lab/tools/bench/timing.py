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


def _interleaved(repeats: int, runners: dict[str, Callable[[], float]], log: Callable[[str], None],
                 give_up: float | None = None, stopped: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Runs each runner once per repeat, reversing the order every other repeat. With ``give_up``, a runner
    whose first repeat gave under 1/``give_up`` of the fastest first repeat runs no more (its one figure
    stands; ``stopped`` gets why), as autotune stops a candidate after its first step."""
    names = list(runners)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            value = runners[name]()
            out[name].append(value)
            log(f"    {name:<28s} repeat {r + 1}/{repeats}: {value:10.1f} images/s")
        if r == 0 and give_up is not None:
            names = _keep_within(out, names, give_up, stopped if stopped is not None else {})
    return out


def _keep_within(out: dict[str, list[float]], names: list[str], give_up: float, stopped: dict[str, str]) -> list[str]:
    """The runners whose first figure is within ``give_up`` x the fastest first figure; the others noted."""
    fastest = max(out[n][0] for n in names)
    for name in names:
        if out[name][0] * give_up < fastest:
            stopped[name] = f"stopped after its first repeat: {fastest / out[name][0]:.1f}x slower than the fastest"
    return [n for n in names if n not in stopped]
