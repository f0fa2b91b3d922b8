"""Mixup / CutMix on whole training batches, on the training device.

:class:`BatchMixer` is meant for TRAINING batches only: the datamodule calls it after
augmentation and normalisation while the trainer is fitting; validation, test and
prediction batches are never passed to it and keep their hard ``int64`` labels.

Every call returns soft targets ``float32 (B, num_classes)`` whose rows sum to 1, also
for batches that end up unmixed (one-hot rows), so the training step sees one format.
:func:`dominant_label` recovers a hard label for accuracy under mixing.

Randomness: all draws use the ``generator`` passed to the call, on its device, or the
global torch RNG when it is None, and stay there: the mix / no-mix and mixup / CutMix
decisions, the lambda and the box are device tensors applied with ``torch.where`` and
``torch.lerp``, so a training step reads nothing back to the host (each read would be a
host-device synchronisation on a GPU). Every call makes the same draws whatever they decide,
so the generator's state after a batch does not depend on its values. The per-epoch on/off
decision of ``mode="epoch"`` is taken on the host from its own Python generator seeded from
``(seed, epoch)``, so that a resumed run takes the same decision.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BatchMixer", "cutmix_box", "dominant_label", "one_hot_targets", "sample_beta", "MODES"]

MODES = ("batch", "epoch")  # when BatchMixer decides whether to mix: per batch, or once per epoch
_UNMIXED = {"mixed": False, "cutmix": False, "lam": 1.0}  # ``BatchMixer.last`` of a batch that cannot be mixed


def one_hot_targets(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Hard labels ``(B,)`` -> one-hot ``(B, num_classes)``; soft targets pass through."""
    if y.ndim == 2:
        if y.shape[1] != num_classes:
            raise ValueError(f"soft targets have {y.shape[1]} classes, expected {num_classes}")
        return y.to(dtype)
    if y.ndim != 1:
        raise ValueError(f"targets must be (B,) labels or (B, C) soft targets, got shape {tuple(y.shape)}")
    return F.one_hot(y.to(torch.int64), num_classes).to(dtype)


def dominant_label(y: Tensor) -> Tensor:
    """Class with the largest weight per row of soft targets (hard labels pass through)."""
    if y.ndim == 1:
        return y
    return y.argmax(dim=-1)


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_beta(alpha: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One ``Beta(alpha, alpha)`` draw, a 0-d float32 tensor on the ``generator``'s device.

    ``torch.distributions.Beta`` cannot take a generator; its sampler (a two-class Dirichlet) can.
    """
    device = _draw_device(generator)
    concentration = torch.as_tensor(alpha, dtype=torch.float32, device=device).expand(2)
    return torch._sample_dirichlet(concentration, generator=generator)[0]


def cutmix_box(height: int, width: int, lam: Tensor, cy: Tensor, cx: Tensor) -> Tensor:
    """``(height, width)`` bool mask of the box covering about ``1 - lam`` of the image: sides
    ``sqrt(1 - lam)`` of the image's (rounded down), centred at pixel ``(cy, cx)``, clipped."""
    cut = (1.0 - lam).clamp(min=0.0).sqrt()
    half_h, half_w = (height * cut).floor().long() // 2, (width * cut).floor().long() // 2
    rows, cols = torch.arange(height, device=lam.device), torch.arange(width, device=lam.device)
    inside_rows = (rows >= cy - half_h) & (rows < cy + half_h)
    inside_cols = (cols >= cx - half_w) & (cols < cx + half_w)
    return inside_rows[:, None] & inside_cols[None, :]


class BatchMixer:
    """Mixup / CutMix for training batches.

    Args:
        num_classes: number of classes of the soft targets.
        mixup_alpha: Beta parameter of mixup; None or 0 disables mixup.
        cutmix_alpha: Beta parameter of CutMix; None or 0 disables CutMix.
        prob: probability that a batch (``mode="batch"``) or a whole epoch
            (``mode="epoch"``) is mixed.
        mode: "batch" decides per batch from the call's generator; "epoch" decides once
            per epoch from ``random.Random(seed * 1000003 + epoch)``, so the decision is a
            function of ``(seed, epoch)`` only and every batch of a mixed epoch is mixed.
        stop_epoch: from this epoch on nothing is mixed (None: never stops).
        switch_prob: when both alphas are set, probability that a mixed batch uses
            CutMix rather than mixup.
        seed: seed of the per-epoch decisions of ``mode="epoch"``.

    Call: ``mixer(x, y, epoch, generator=None) -> (x_mixed, y_soft)`` with ``x`` a float
    batch ``(B, C, H, W)`` and ``y`` int64 labels ``(B,)`` (or soft targets). One
    ``lam ~ Beta(alpha, alpha)`` and one partner permutation per batch: mixup returns
    ``lam * x + (1 - lam) * x[perm]``; CutMix pastes one box of ``x[perm]`` (the same
    box for the whole batch, :func:`cutmix_box`) and sets ``lam`` to the exact unpasted
    area fraction. Targets are ``lam * onehot(y) + (1 - lam) * onehot(y[perm])``. The last
    decision is kept in ``last`` (``{"mixed", "cutmix", "lam"}``, 0-d device tensors once a
    batch may be mixed: read them only where a read is due, e.g. when logging).
    """
    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float | None = 1.0,
        cutmix_alpha: float | None = None,
        prob: float = 1.0,
        mode: str = "batch",
        stop_epoch: int | None = None,
        switch_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be positive")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, a in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if a is not None and (a < 0 or not math.isfinite(a)):
                raise ValueError(f"{name} must be a non-negative number or None, got {a}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must lie in [0, 1], got {switch_prob}")
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha) if mixup_alpha else None
        self.cutmix_alpha = float(cutmix_alpha) if cutmix_alpha else None
        self.prob = float(prob)
        self.mode = mode
        self.stop_epoch = None if stop_epoch is None else int(stop_epoch)
        self.switch_prob = float(switch_prob)
        self.seed = int(seed)
        self.last: dict[str, object] = dict(_UNMIXED)

    # ------------------------------------------------------------------ decisions
    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha is not None or self.cutmix_alpha is not None) and self.prob > 0

    def epoch_decision(self, epoch: int) -> bool:
        """``mode="epoch"``: whether ``epoch`` is a mixing epoch (deterministic in
        ``(seed, epoch)``, drawn on the host; ignores ``stop_epoch``)."""
        return random.Random(self.seed * 1_000_003 + int(epoch)).random() < self.prob

    def active(self, epoch: int) -> bool:
        """Whether batches of ``epoch`` may be mixed at all."""
        if not self.enabled:
            return False
        if self.stop_epoch is not None and epoch >= self.stop_epoch:
            return False
        if self.mode == "epoch":
            return self.epoch_decision(epoch)
        return True

    def draw(self, batch_size: int, height: int, width: int, generator: torch.Generator | None = None
             ) -> dict[str, Tensor]:
        """One batch's draws, on the generator's device, in a fixed order: the mix / no-mix coin
        (``mode="batch"``, ``prob < 1``), the mixup / CutMix coin (both alphas set), ``lam``, the
        partner permutation ``perm``, the box centre (CutMix enabled). Returns ``mixed`` and
        ``cutmix`` (0-d bool), ``lam`` (0-d float32, the Beta draw) and ``perm``, plus ``box``
        (``(height, width)`` bool, the box a CutMix pastes) when CutMix is enabled."""
        device = _draw_device(generator)
        mixed = torch.ones((), dtype=torch.bool, device=device)
        if self.mode == "batch" and self.prob < 1.0:
            mixed = torch.rand((), generator=generator, device=device) < self.prob
        cutmix = torch.full((), self.cutmix_alpha is not None, dtype=torch.bool, device=device)
        if self.mixup_alpha is not None and self.cutmix_alpha is not None:
            cutmix = torch.rand((), generator=generator, device=device) < self.switch_prob
        alpha = self.cutmix_alpha if self.mixup_alpha is None else self.mixup_alpha
        if self.mixup_alpha is not None and self.cutmix_alpha is not None:
            alpha = torch.where(cutmix, self.cutmix_alpha, self.mixup_alpha)
        lam = sample_beta(alpha, generator)
        draws = {"mixed": mixed, "cutmix": cutmix, "lam": lam,
                 "perm": torch.randperm(batch_size, generator=generator, device=device)}
        if self.cutmix_alpha is not None:
            centre = [torch.randint(0, n, (), generator=generator, device=device) for n in (height, width)]
            draws["box"] = cutmix_box(height, width, lam, *centre)
        return draws

    def __call__(
        self, x: Tensor, y: Tensor, epoch: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        if x.ndim != 4:
            raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError("mix normalised float batches (got an integer batch)")
        if y.shape[0] != x.shape[0]:
            raise ValueError("x and y have different batch sizes")
        targets = one_hot_targets(y.to(x.device), self.num_classes)
        self.last = dict(_UNMIXED)
        if not self.active(epoch) or x.shape[0] < 2:
            return x, targets
        draws = {k: v.to(x.device) for k, v in self.draw(x.shape[0], *x.shape[-2:], generator).items()}
        x_mixed, y_soft, lam = self.mix(x, targets, draws)
        self.last = {"mixed": draws["mixed"], "cutmix": draws["cutmix"] & draws["mixed"], "lam": lam}
        return x_mixed, y_soft

    def mix(self, x: Tensor, targets: Tensor, draws: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Applies :meth:`draw`'s draws: ``(x_mixed, y_soft, lam)`` with ``lam`` the weight of each
        image's own pixels and label (the Beta draw for mixup, the unpasted area for CutMix, 1
        unmixed). Pixel weights are 1 (own) or 0 (partner) in a CutMix box, ``lam`` for mixup; the
        blend is ``torch.lerp``, exact at weights 0 and 1."""
        lam, perm = draws["lam"], draws["perm"]
        weight = lam
        if "box" in draws:
            own = ~draws["box"]
            weight = torch.where(draws["cutmix"], own.to(lam.dtype), lam)
            lam = torch.where(draws["cutmix"], own.to(lam.dtype).mean(), lam)
        weight = torch.where(draws["mixed"], weight, 1.0)
        lam = torch.where(draws["mixed"], lam, 1.0)
        x_mixed = torch.lerp(x[perm], x, weight.to(x.dtype))
        y_soft = torch.lerp(targets[perm], targets, lam.to(targets.dtype))
        return x_mixed, y_soft, lam

    def __repr__(self) -> str:
        return (
            f"BatchMixer(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, mode={self.mode!r}, "
            f"stop_epoch={self.stop_epoch}, switch_prob={self.switch_prob}, seed={self.seed})"
        )
