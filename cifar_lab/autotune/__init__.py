"""Measured runtime settings: ``auto`` precision, memory format and compilation for this network here.

``trainer.precision=auto``, ``module.memory_format=auto`` (the defaults) and ``module.compile=auto``
are resolved by :func:`decide` before the Trainer is built. It times real training steps of the
run's network, optimizer and batch size on the run's device for each candidate pair (``32`` and
``bf16-mixed`` on a CPU; ``bf16-mixed`` or ``16-mixed`` and ``32`` on a GPU; ``channels_last``
and ``contiguous``) in interleaved rounds until the fastest is ahead by more than the spread
between rounds, within a time budget (``rounds``); undecided at the budget, it takes the usual
pair for the device and says so. A reduced precision whose convolution a cached probe found far
slower than fp32 on this machine (emulated bf16) is not timed at all (``probe``). The decision
is cached with what it was measured under (``cache``; a change measures again and says why);
the run compares its own steps with the promise and marks a promise it did not keep stale
(``check``); ``python -m cifar_lab.autotune show|clear [model]`` lists or clears the cache
(``command``). An explicit value always wins and is never measured; a resumed run keeps its
checkpoint's values; under DDP rank 0 decides and the other ranks read its decision from the
run directory. ``compile=auto`` times the chosen pair compiled too and compiles only when the
run's steps save more than compiling costs.

Figures per CPU kind: docs/benchmarks.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names load their module on first use, so `python -m cifar_lab.autotune show` reads the cache without torch.
_EXPORTS = {
    "AUTO": "decision", "Candidate": "decision", "Decision": "decision", "format_table": "decision",
    "Rules": "rounds", "Trial": "rounds", "run_race": "rounds",
    "cache_path": "cache",
    "conv_step": "probe", "probed": "probe",
    "autocast_for": "device", "candidate_pairs": "device", "MEMORY_FORMATS": "device",
    "decide": "resolve", "expected_steps": "resolve", "log_to_tensorboard": "resolve", "compile_key": "resolve",
    "precision_probes": "resolve",
    "check_run": "check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
