"""Mixup / CutMix on whole training batches, on the training device.

:class:`BatchMixer` is meant for TRAINING batches only: the datamodule calls it after
augmentation and normalisation while the trainer is fitting; validation, test and
prediction batches are never passed to it and keep their hard ``int64`` labels.

Every call returns soft targets ``float32 (B, num_classes)`` whose rows sum to 1, also
for batches that end up unmixed (one-hot rows), so the training step sees one format.
:func:`dominant_label` recovers a hard label for accuracy under mixing.

Randomness: all draws use the ``generator`` passed to the call (on its device), or the
global torch RNG when it is None. ``torch.distributions.Beta`` cannot take a
generator, so ``Beta(alpha, alpha)`` is drawn by NumPy's ``Generator.beta`` seeded
with one 63-bit integer drawn from the torch generator: the lambda is reproducible
from the torch generator state (or from ``torch.manual_seed`` when no generator is
given) and costs one scalar draw. The per-epoch on/off decision of ``mode="epoch"``
uses its own generator seeded from ``(seed, epoch)`` so that a resumed run takes the
same decision.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BatchMixer", "dominant_label", "one_hot_targets", "MODES"]

MODES = ("batch", "epoch")  # when BatchMixer decides whether to mix: per batch, or once per epoch


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


def _rand_scalar(generator: torch.Generator | None, device: torch.device) -> float:
    return float(torch.rand((), generator=generator, device=device))


def _randint_scalar(high: int, generator: torch.Generator | None, device: torch.device) -> int:
    return int(torch.randint(0, high, (), generator=generator, device=device))


def sample_beta(alpha: float, generator: torch.Generator | None = None) -> float:
    """One ``Beta(alpha, alpha)`` draw, reproducible from the torch ``generator``."""
    device = _draw_device(generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


class BatchMixer:
    """Mixup / CutMix for training batches.

    Args:
        num_classes: number of classes of the soft targets.
        mixup_alpha: Beta parameter of mixup; None or 0 disables mixup.
        cutmix_alpha: Beta parameter of CutMix; None or 0 disables CutMix.
        prob: probability that a batch (``mode="batch"``) or a whole epoch
            (``mode="epoch"``) is mixed.
        mode: "batch" decides per batch from the call's generator; "epoch" decides once
            per epoch from ``torch.Generator().manual_seed(seed * 1000003 + epoch)``,
            so the decision is a function of ``(seed, epoch)`` only and every batch of a
            mixed epoch is mixed.
        stop_epoch: from this epoch on nothing is mixed (None: never stops).
        switch_prob: when both alphas are set, probability that a mixed batch uses
            CutMix rather than mixup.
        seed: seed of the per-epoch decisions of ``mode="epoch"``.

    Call: ``mixer(x, y, epoch, generator=None) -> (x_mixed, y_soft)`` with ``x`` a float
    batch ``(B, C, H, W)`` and ``y`` int64 labels ``(B,)`` (or soft targets). One
    ``lam ~ Beta(alpha, alpha)`` and one partner permutation per batch: mixup returns
    ``lam * x + (1 - lam) * x[perm]``; CutMix pastes one box of ``x[perm]`` (the same
    box for the whole batch) and sets ``lam`` to the exact unpasted area fraction.
    Targets are ``lam * onehot(y) + (1 - lam) * onehot(y[perm])``. The last decision
    is kept in ``last`` (``{"mixed", "kind", "lam"}``) for logging.
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
        self.last: dict[str, object] = {"mixed": False, "kind": None, "lam": 1.0}

    # ------------------------------------------------------------------ decisions
    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha is not None or self.cutmix_alpha is not None) and self.prob > 0

    def epoch_decision(self, epoch: int) -> bool:
        """``mode="epoch"``: whether ``epoch`` is a mixing epoch (deterministic in
        ``(seed, epoch)``; ignores ``stop_epoch``)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        return bool(torch.rand((), generator=g) < self.prob)

    def active(self, epoch: int) -> bool:
        """Whether batches of ``epoch`` may be mixed at all."""
        if not self.enabled:
            return False
        if self.stop_epoch is not None and epoch >= self.stop_epoch:
            return False
        if self.mode == "epoch":
            return self.epoch_decision(epoch)
        return True

    # ------------------------------------------------------------------ mixing
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
        self.last = {"mixed": False, "kind": None, "lam": 1.0}
        if not self.active(epoch) or x.shape[0] < 2:
            return x, targets
        dev = _draw_device(generator)
        if self.mode == "batch" and self.prob < 1.0 and not _rand_scalar(generator, dev) < self.prob:
            return x, targets

        if self.mixup_alpha is not None and self.cutmix_alpha is not None:
            use_cutmix = _rand_scalar(generator, dev) < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha is not None
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = sample_beta(alpha, generator)
        perm = torch.randperm(x.shape[0], generator=generator, device=dev).to(x.device)

        if use_cutmix:
            x_mixed, lam = self.cutmix(x, perm, lam, generator)
        else:
            x_mixed = self.mixup(x, perm, lam)
        y_soft = targets.mul(lam).add_(targets[perm], alpha=1.0 - lam)
        self.last = {"mixed": True, "kind": "cutmix" if use_cutmix else "mixup", "lam": lam}
        return x_mixed, y_soft

    @staticmethod
    def mixup(x: Tensor, perm: Tensor, lam: float) -> Tensor:
        """``lam * x + (1 - lam) * x[perm]``."""
        return x.mul(lam).add_(x[perm], alpha=1.0 - lam)

    @staticmethod
    def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> tuple[int, int, int, int]:
        """Box ``(top, bottom, left, right)`` covering about ``1 - lam`` of the image:
        sides ``sqrt(1 - lam)`` of the image's, centred at a uniform pixel, clipped."""
        device = device if device is not None else _draw_device(generator)
        cut = math.sqrt(max(0.0, 1.0 - lam))
        ch, cw = int(height * cut), int(width * cut)
        cy = _randint_scalar(height, generator, device)
        cx = _randint_scalar(width, generator, device)
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        return top, bottom, left, right

    def cutmix(self, x: Tensor, perm: Tensor, lam: float, generator: torch.Generator | None = None
               ) -> tuple[Tensor, float]:
        """Pastes one box of ``x[perm]`` into ``x``; returns the batch and the exact
        fraction of each image that kept its own pixels."""
        H, W = x.shape[-2:]
        top, bottom, left, right = self.cutmix_box(H, W, lam, generator)
        out = x.clone()
        if bottom > top and right > left:
            out[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(H * W)
        return out, lam

    def __repr__(self) -> str:
        return (
            f"BatchMixer(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, mode={self.mode!r}, "
            f"stop_epoch={self.stop_epoch}, switch_prob={self.switch_prob}, seed={self.seed})"
        )
