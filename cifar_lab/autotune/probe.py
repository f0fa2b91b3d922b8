"""The precision probe: is a reduced precision worth timing on this device at all?

Where a CPU has no native bf16 (AVX2 only: no AVX512-BF16, no AMX), bf16 autocast convolutions are
emulated and several times slower than fp32 (a heavy network's single bf16 step can take minutes),
and a round cannot interrupt a step. So before any candidate of a reduced precision (``bf16-mixed``,
``16-mixed``) is timed, the probe times one convolution of CIFAR's shape (batch 4, 64 -> 64
channels, 32x32, 3x3, channels_last), forward and backward, in fp32 and in the reduced precision:
one warm-up call each, then ``REPEATS`` interleaved pairs (fp32, reduced, fp32, reduced, ...); each
side's fastest call counts (load only ever slows a call down). Convolutions make most of every
network's step here, and a matmul is no test: on an AVX2-only AMD EPYC (Zen 3) bf16 took 5.3x
fp32's time for this convolution at batch 8, but 1.3x for a 256 x 256 matmul. When the reduced
precision takes more than ``autotune.probe_slower`` times fp32's time, its candidates are not
timed: they stay in the table with a note. The result is cached with the decisions (kind
``probe``) under the device, torch version and threads, so it runs once per machine setup.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import torch
import torch.nn.functional as F

from cifar_lab.autotune import cache
from cifar_lab.autotune.device import autocast_for, isolated_rng, machine
from cifar_lab.autotune.rounds import UNSUPPORTED, StepTimer

REPEATS = 3
SHAPE = {"batch": 4, "channels": 64, "size": 32, "kernel": 3}  # part of the cache key: a new shape measures again


@dataclass
class ProbeStep:
    """One call of the probe's convolution at one precision (forward and backward)."""

    precision: str
    run: Callable[[], Any]

    def __call__(self) -> Any:
        return self.run()


ProbeSteps = Callable[[str, torch.device], ProbeStep]  # (precision, device) -> the probe's step


def conv_step(precision: str, device: torch.device) -> ProbeStep:
    """The probe's convolution, forward and backward (input and weight gradients), at ``precision``."""
    batch, channels, size, kernel = SHAPE["batch"], SHAPE["channels"], SHAPE["size"], SHAPE["kernel"]
    x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
    weight = 0.05 * torch.randn(channels, channels, kernel, kernel, device=device).contiguous(
        memory_format=torch.channels_last)
    x.requires_grad_(True), weight.requires_grad_(True)

    def step() -> Any:
        with autocast_for(precision, device):
            out = F.conv2d(x, weight, padding=kernel // 2)
        grads = torch.autograd.grad(out.float().sum(), (x, weight))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return grads

    return ProbeStep(precision, step)


def measure(precision: str, device: torch.device, timer: StepTimer, build: ProbeSteps = conv_step,
            repeats: int = REPEATS) -> dict[str, float] | None:
    """The probe's fastest fp32 call and fastest ``precision`` call in seconds (``fp32_s``, ``reduced_s``);
    None where ``precision`` fails to run here."""
    try:
        full, reduced = build("32", device), build(precision, device)
        timer(full), timer(reduced)  # warm-up: allocations, kernel selection
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            times[0].append(timer(full))
            times[1].append(timer(reduced))
    except UNSUPPORTED:  # a precision this device lacks: its candidates say so when they are built
        return None
    return {"fp32_s": min(times[0]), "reduced_s": min(times[1])}


def verdict(precision: str, found: dict[str, float] | None, slower: float) -> str:
    """The note of a precision not worth timing, its convolution over ``slower`` times fp32's time ("" when
    its candidates are timed)."""
    ratio = _ratio(found)
    if ratio is None or ratio <= slower:
        return ""
    return f"not timed: {precision} convolution {ratio:.1f}x slower than fp32 here (probe)"


def _ratio(found: dict[str, float] | None) -> float | None:
    return found["reduced_s"] / found["fp32_s"] if found and found.get("fp32_s") else None


def probed(precision: str, device: torch.device, timer: StepTimer, build: ProbeSteps,
           slower: float) -> dict[str, Any]:
    """The probe's result for ``precision`` here, read from the cache or measured (and cached):
    ``{"source", "fp32_s", "reduced_s", "ratio", "note"}``."""
    under = machine(device)
    key = cache.entry_key(cache.digest({"probe": precision, "device_type": device.type, "shape": SHAPE}), under)
    entry = cache.read().get(key)
    if entry and entry.get("fp32_s"):
        found, source = {"fp32_s": entry["fp32_s"], "reduced_s": entry["reduced_s"]}, "cache"
    else:
        with isolated_rng(device):
            found, source = measure(precision, device, timer, build), "measured"
        if found is not None:
            cache.store(key, {"kind": "probe", "precision": precision, "under": under, **found,
                              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    ratio = _ratio(found)
    return {"source": source, **(found or {}), "ratio": None if ratio is None else round(ratio, 2),
            "note": verdict(precision, found, slower)}
