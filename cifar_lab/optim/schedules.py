"""Learning-rate schedules that torch's built-in schedulers do not express directly.

Configs name these as ``_partial_`` factories (``conf/scheduler/*.yaml``); the module calls
them with the optimizer and, when the config leaves ``steps_per_epoch`` out, with the
number of optimizer steps per epoch (see ``ClassifierModule._scheduler_length_kwargs``).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "warmup_cosine"]


class WarmupCosine:
    """Learning-rate factor at step ``t``: linear warmup, then half a cosine down to a floor.

    - ``t < warmup``: ``start + (1 - start) * t / warmup``
    - ``warmup <= t < total``: ``floor + (1 - floor) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2``
    - ``t >= total``: ``floor`` (the rate stays at its minimum instead of rising again)

    A callable object rather than a closure, so ``LambdaLR.state_dict`` saves it with
    checkpoints and a resumed run continues the same curve.
    """

    def __init__(self, total: int, warmup: int = 0, start: float = 0.0, floor: float = 0.0) -> None:
        if total < 1:
            raise ValueError(f"the schedule needs at least one step, got total={total}")
        if not 0 <= warmup <= total:
            raise ValueError(f"warmup ({warmup} steps) must lie in [0, total={total}]")
        self.total = int(total)
        self.warmup = int(warmup)
        self.start = float(start)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (1.0 - self.start) * step / self.warmup
        if step >= self.total:
            return self.floor
        span = max(1, self.total - self.warmup)
        progress = (step - self.warmup) / span
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
        factors.append(WarmupCosine(total, warmup, start=warmup_start_factor, floor=floor))
    return LambdaLR(optimizer, lr_lambda=factors)
