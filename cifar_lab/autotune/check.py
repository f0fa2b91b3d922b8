"""The run checks its own decision: were its steps as fast as the measurement promised?

After fitting, :func:`check_run` compares the run's own steady-state steps, as
:class:`cifar_lab.callbacks.estimate.RunEstimate` timed them for the run-time estimate (the median
of the first steps of the first epoch after its first, each from the step's start to
``on_before_optimizer_step``: forward and backward with the module's loss and logging), with the
whole bare step (forward, backward and optimizer step on a resident batch) the decision promised
for the chosen pair, per image. The run's part leaves out the optimizer step, data loading and
augmentation, validation and the callbacks after the step, so they cannot raise a false alarm; a
step more than ``autotune.stale_above`` (25%) slower than the promise is a promise the machine does
not keep: the cache entry is marked stale, one line says so, and the next run measures again.

Not checked (nothing to compare like with like), with the reason recorded: a run on a GPU (its
steps are asynchronous, and reading the device to time them would slow every step), several
processes (gradients are exchanged inside the step), distillation (a teacher's forward pass in
every step), a compiled network without a compiled promise, steps at another image size or batch
than measured (progressive resizing's early epochs), per-image DataLoader workers sharing the CPU.
"""

from __future__ import annotations

import logging
from typing import Any

from cifar_lab.autotune import cache
from cifar_lab.autotune.decision import Decision, pair_name
from cifar_lab.callbacks.estimate import RunEstimate

log = logging.getLogger("cifar_lab.autotune")


def check_run(decision: Decision, trainer: Any) -> dict[str, Any] | None:
    """Compare the run's steps with ``decision``'s promise; mark its cache entry stale when they are far
    slower. The result is kept in ``decision.check`` (metrics.json); None where there is no promise."""
    if decision.source not in ("measured", "cache") or decision.cache_key is None or not trainer.is_global_zero:
        return None
    estimate = next((c for c in trainer.callbacks if isinstance(c, RunEstimate)), None)
    skipped = _not_comparable(decision, trainer, estimate)
    if skipped:
        decision.check = {"skipped": skipped}
        return decision.check
    plan = estimate.plan  # type: ignore[union-attr]
    promised_s = _promised_step_s(decision)
    ratio = (plan.step_compute_s / plan.batch_images) / (promised_s / decision.batch_size)  # per image
    decision.check = {"steps_s": round(plan.step_compute_s, 5), "promised_s": round(promised_s, 5),
                      "ratio": round(ratio, 3), "stale": ratio > 1 + decision.stale_above}
    if decision.check["stale"]:
        why = (f"a run's forward and backward took {ratio:.2f}x the whole step measured for "
               f"{pair_name(decision.precision, decision.memory_format)}")
        marked = cache.mark_stale(decision.cache_key, why)
        log.warning("autotune: %s (%.0f ms against %.0f ms a step)%s", why, 1000 * plan.step_compute_s,
                    1000 * promised_s * plan.batch_images / decision.batch_size,
                    "; the cached decision is marked stale and the next run measures again" if marked else "")
    return decision.check


def _promised_step_s(decision: Decision) -> float:
    if decision.compile and "compiled_s" in decision.compile_timing:
        return float(decision.compile_timing["compiled_s"])
    chosen = decision.chosen()
    assert chosen is not None and chosen.images_per_s and decision.batch_size
    return decision.batch_size / chosen.images_per_s


def _not_comparable(decision: Decision, trainer: Any, estimate: RunEstimate | None) -> str:
    """Why this run's steps cannot be held against the promise ("" when they can)."""
    chosen = decision.chosen()
    plan = estimate.plan if estimate is not None else None
    module = trainer.lightning_module
    compiled = getattr(getattr(module, "net", None), "_compiled_call_impl", None) is not None  # nn.Module.compile
    datamodule = getattr(trainer, "datamodule", None)
    reasons = [
        (chosen is None or not chosen.images_per_s or not decision.batch_size, "the chosen pair was not timed"),
        (plan is None, "the run timed no steps"),
        (str(getattr(module, "device", "cpu")).startswith("cuda"), "steps on a GPU are asynchronous"),
        (getattr(trainer, "world_size", 1) > 1, "several processes exchange gradients in the step"),
        (getattr(module, "teacher", None) is not None, "distillation adds a teacher's forward pass"),
        (compiled and not decision.compile, "a compiled network against an eager promise"),
        (getattr(datamodule, "pipeline", "") == "per_image" and getattr(datamodule, "num_workers", 0) > 0,
         "per-image DataLoader workers share the CPU"),
    ]
    for failed, reason in reasons:
        if failed:
            return reason
    assert plan is not None
    if plan.measured_size != decision.image_size:
        return f"steps at {plan.measured_size} px, measured at {decision.image_size} px"
    if plan.batch_images != decision.batch_size:
        return f"steps of {plan.batch_images} images, measured at {decision.batch_size}"
    return ""
