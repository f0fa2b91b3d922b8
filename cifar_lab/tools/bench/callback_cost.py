"""Measurement 3b, what a run's callbacks cost per training step: the default set's step against no
callbacks (paired, as in :mod:`cifar_lab.tools.bench.overhead`), and each callback's microseconds.

A callback's cost is the time Lightning's dispatcher spends on it in the six per-step hooks: each
hook is called once per callback alone, in the run's order, then once with no callback (the
dispatcher's own cost); per callback, the median over steps of its time in a step's hooks, less the
median of the empty calls' time in a step.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from cifar_lab.tools.bench.paired import _paired_fit
from cifar_lab.tools.bench.timing import _median

EMPTY = "(dispatch to no callback)"
STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")


def default_callbacks(cfg, out_dir: Path) -> list:
    """The callbacks of a default training run written to a file (no terminal): the config's
    ``callbacks`` group (its progress bar replaced by per-epoch lines), the safety callbacks, the
    compute counter, the checkpoint-state guard and the run-time estimate, as ``cifar_lab.cli.train``
    and ``cifar_lab.builders.build_trainer`` assemble them."""
    import io

    from lightning.pytorch.callbacks import ProgressBar

    from cifar_lab import builders
    from cifar_lab.callbacks.checkpoint_state import CheckpointStateGuard
    from cifar_lab.callbacks.compute import TrainingCompute
    from cifar_lab.callbacks.estimate import RunEstimate
    from cifar_lab.callbacks.progress import EpochLines, TestLines
    from cifar_lab.callbacks.safety import safety_callbacks

    checkpoints = out_dir / "checkpoints"
    configured = [c for c in builders.build_callbacks(cfg) if not isinstance(c, ProgressBar)]
    quiet = io.StringIO()  # the lines a run would print
    return [*configured, *safety_callbacks(checkpoints), TrainingCompute(), CheckpointStateGuard(checkpoints, None),
            RunEstimate(test=False, stream=quiet), EpochLines(stream=quiet), TestLines(stream=quiet)]


@contextmanager
def timed_dispatch(costs: dict[str, list[float]], warmup: int) -> Iterator[None]:
    """Time each callback in Lightning's per-step hooks after ``warmup`` steps: ``costs[name]`` gets one
    entry (seconds) per step, and ``costs[EMPTY]`` the same hooks dispatched to no callback."""
    from lightning.pytorch.trainer import call

    real = call._call_callback_hooks
    step: dict[str, float] = defaultdict(float)
    steps = [0]

    def dispatch(trainer, hook_name: str, *args: Any, monitoring_callbacks: bool | None = None, **kwargs: Any):
        if hook_name not in STEP_HOOKS:
            return real(trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs)
        if hook_name == "on_train_batch_start":
            if steps[0] > warmup:
                for name, seconds in step.items():
                    costs[name].append(seconds)
            step.clear()
            steps[0] += 1
        everyone = trainer.callbacks
        try:
            for callback in [*everyone, None]:  # the empty call last: the first pays for a cold cache
                trainer.callbacks = [] if callback is None else [callback]
                start = time.perf_counter()
                real(trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs)
                step[EMPTY if callback is None else type(callback).__name__] += time.perf_counter() - start
        finally:
            trainer.callbacks = everyone

    call._call_callback_hooks = dispatch
    try:
        yield
    finally:
        call._call_callback_hooks = real


def bench_callbacks(settled, steps: int, warmup: int, repeats: int, device: torch.device, log) -> dict[str, Any]:
    """The default set's paired step cost (ms, median over ``repeats`` fits) and each callback's per-step
    microseconds (median over the steps of one instrumented fit)."""
    cfg = settled.cfg
    out: dict[str, Any] = {"steps": steps, "method": "paired fits, none vs the default set; per callback: "
                           "dispatcher time per step, medians"}
    times: dict[str, dict[str, list[float]]] = {label: {"lightning": [], "plain": []} for label in ("none", "default")}
    for r in range(repeats):
        for label in ("none", "default") if r % 2 == 0 else ("default", "none"):
            with tempfile.TemporaryDirectory() as tmp:
                extra = default_callbacks(cfg, Path(tmp)) if label == "default" else []
                res = _paired_fit(settled, steps, warmup, device, extra)
            for k in ("lightning", "plain"):
                times[label][k].extend(res[k])
            log(f"    callbacks {label:<7s} repeat {r + 1}/{repeats}: median step "
                f"{1000 * _median(res['lightning']):7.2f} ms Lightning, {1000 * _median(res['plain']):7.2f} ms plain")
    for label, t in times.items():
        diffs = [a - b for a, b in zip(t["lightning"], t["plain"])]
        out[label] = {"lightning_median_step_ms": 1000 * _median(t["lightning"]),
                      "plain_median_step_ms": 1000 * _median(t["plain"]),
                      "median_paired_difference_ms": 1000 * _median(diffs), "steps_timed": len(diffs)}
    out["default_minus_none_ms"] = (out["default"]["median_paired_difference_ms"]
                                    - out["none"]["median_paired_difference_ms"])
    costs: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = default_callbacks(cfg, Path(tmp))
        with timed_dispatch(costs, warmup):
            _paired_fit(settled, steps, warmup, device, callbacks)
    empty = _median(costs.pop(EMPTY, []))
    costs.pop("PairedSteps", None)  # the measurement's own callback (it runs the hand-written step)
    out["dispatch_empty_us"] = 1e6 * empty
    out["per_callback_us"] = {name: 1e6 * (_median(values) - empty) for name, values in costs.items()}
    out["per_callback_total_us"] = sum(out["per_callback_us"].values())
    return out
