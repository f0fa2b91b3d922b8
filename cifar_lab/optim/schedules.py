"""Learning-rate schedules that torch's built-in schedulers do not express directly.

Both are a linear warmup followed by a decay, as one :class:`WarmupDecay` factor with a
``shape``: ``cosine`` (:func:`warmup_cosine`, lengths in epochs) or ``linear``
(:func:`linear_warmup_decay`, the triangular schedule of fast CIFAR recipes, lengths as a
fraction of the run). Configs name the factories as ``_partial_`` (``conf/scheduler/*.yaml``);
the module calls them with the optimizer and, when the config leaves them out,
``steps_per_epoch`` or ``total_steps`` (``ClassifierModule._scheduler_length_kwargs``).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

INTERVALS = ("epoch", "step")  # when Lightning steps a scheduler (the config's scheduler.interval)

__all__ = ["SHAPES", "WarmupDecay", "warmup_cosine", "linear_warmup_decay"]

SHAPES = ("cosine", "linear")


class WarmupDecay:
    """Learning-rate factor at step ``t``: ``start -> 1`` linearly over ``warmup`` steps, then ``1 -> end``.

    - ``t < warmup``: ``start + (1 - start) * t / warmup``
    - ``warmup <= t < total``: from 1 down to ``end`` along half a cosine (``shape="cosine"``)
      or a straight line (``shape="linear"``)
    - ``t >= total``: ``end`` (the rate stays at its minimum instead of rising again)

    A callable object rather than a closure, so ``LambdaLR.state_dict`` saves it with
    checkpoints and a resumed run continues the same curve.
    """

    def __init__(self, total: int, warmup: int = 0, start: float = 0.0, end: float = 0.0,
                 shape: str = "cosine") -> None:
        if total < 1:
            raise ValueError(f"the schedule needs at least one step, got total={total}")
        if not 0 <= warmup <= total:
            raise ValueError(f"warmup ({warmup} steps) must lie in [0, total={total}]")
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        self.total, self.warmup = int(total), int(warmup)
        self.start, self.end = float(start), float(end)
        self.shape = shape

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (1.0 - self.start) * step / self.warmup
        if step >= self.total:
            return self.end
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.shape == "cosine" else 1.0 - progress
        return self.end + (1.0 - self.end) * remaining


def warmup_cosine(
    optimizer: Optimizer,
    T_max: float,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.01,
    eta_min: float = 0.0,
    steps_per_epoch: int | None = None,
) -> LambdaLR:
    """Cosine annealing over ``T_max`` epochs whose first ``warmup_epochs`` ramp up linearly.

    Lengths are given in epochs and converted to scheduler steps with ``steps_per_epoch``
    (the module fills it in): step the scheduler with ``interval: step`` for a smooth
    per-batch curve, or set ``steps_per_epoch: 1`` with ``interval: epoch`` to step once
    per epoch. Warmup starts at ``warmup_start_factor`` times each group's learning rate
    and reaches it after ``warmup_epochs``; the cosine then ends at ``eta_min`` (an
    absolute learning rate, as in ``CosineAnnealingLR``) after ``T_max`` epochs in all,
    and stays there.
    """
    if steps_per_epoch is None or steps_per_epoch < 1:
        raise ValueError("warmup_cosine needs steps_per_epoch >= 1 (filled in by the module when left out)")
    if not 0.0 <= warmup_start_factor <= 1.0:
        raise ValueError(f"warmup_start_factor must lie in [0, 1], got {warmup_start_factor}")
    if warmup_epochs < 0 or warmup_epochs > T_max:
        raise ValueError(f"warmup_epochs={warmup_epochs} must lie in [0, T_max={T_max}]")
    total = max(1, round(T_max * steps_per_epoch))
    warmup = min(total, round(warmup_epochs * steps_per_epoch))
    factors = []
    for group in optimizer.param_groups:
        base_lr = group.get("initial_lr", group["lr"])
        floor = eta_min / base_lr if base_lr > 0 else 0.0
        factors.append(WarmupDecay(total, warmup, start=warmup_start_factor, end=floor, shape="cosine"))
    return LambdaLR(optimizer, lr_lambda=factors)


def linear_warmup_decay(optimizer: Optimizer, total_steps: int | None = None, warmup_fraction: float = 0.2,
                        start_factor: float = 0.2, end_factor: float = 0.0) -> LambdaLR:
    """Triangular schedule over the whole run, stepped per optimizer step (``interval: step``).

    The rate rises linearly from ``start_factor`` to 1 (times each group's rate) during the first
    ``warmup_fraction`` of ``total_steps``, then falls linearly to ``end_factor`` at the end.
    ``total_steps`` is filled in by the module (the trainer's estimated optimizer steps).
    """
    if total_steps is None or total_steps < 1:
        raise ValueError("linear_warmup_decay needs total_steps >= 1 (filled in by the module when left out)")
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must lie in [0, 1], got {warmup_fraction}")
    warmup = round(warmup_fraction * total_steps)
    return LambdaLR(optimizer, WarmupDecay(int(total_steps), warmup, start_factor, end_factor, shape="linear"))
