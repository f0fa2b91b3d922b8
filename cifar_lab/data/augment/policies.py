"""RandAugment, TrivialAugment and AutoAugment (CIFAR-10 policy), batched with kornia.

The operations, their magnitude ranges and the sub-policies are kornia's
(``kornia.augmentation.auto``). kornia picks the operations once per call, for the whole
batch; with ``selection="image"`` (default, as torchvision's per-image transforms) every
image picks its own: the batch is split by the chosen operation and kornia runs once per
group (at most one run per candidate operation, times ``n`` for RandAugment).
``selection="batch"`` is kornia's own behaviour (one choice per batch, one run; the
magnitudes, signs and probabilities are still drawn per image).

Randomness is seeded from the datamodule's generator as for every kornia op
(:func:`~cifar_lab.data.augment.kornia_ops.seeded_rng`). ``to_torchvision()`` gives the
closest per-image torchvision transform (``RandAugment``, ``TrivialAugmentWide``,
``AutoAugment(CIFAR10)``), whose operation lists and ranges differ slightly from kornia's
(e.g. torchvision's TrivialAugmentWide rotates up to 135 degrees, kornia's up to 30).
"""

from __future__ import annotations

from typing import Iterator

import kornia.augmentation.auto as KA
import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from cifar_lab.data.augment.base import BatchOp, _check_batch
from cifar_lab.data.augment.kornia_ops import draw_seed, from_unit, seeded_rng, to_unit

__all__ = ["RandAugment", "TrivialAugment", "AutoAugment"]

SELECTIONS = ("image", "batch")


class _ChosenOps:
    """Mixin for kornia's policies: runs the sub-policies named in ``chosen`` (indices)
    instead of drawing them, when ``chosen`` is set."""

    chosen: Tensor | None = None

    def get_forward_sequence(self, params=None) -> Iterator[tuple[str, nn.Module]]:
        if params is None and self.chosen is not None:
            return self.get_children_by_indices(self.chosen)
        return super().get_forward_sequence(params)


class _KorniaRandAugment(_ChosenOps, KA.RandAugment):
    pass


class _KorniaTrivialAugment(_ChosenOps, KA.TrivialAugment):
    pass


class _KorniaAutoAugment(_ChosenOps, KA.AutoAugment):
    pass


class _Policy(BatchOp):
    """A kornia policy applied per image. Subclasses set ``self.policy`` and ``self.rounds``
    (sub-policies applied one after the other to each image: ``n`` for RandAugment, else 1)."""

    policy: _ChosenOps
    rounds: int = 1

    def __init__(self, selection: str = "image") -> None:
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection = selection

    @property
    def num_candidates(self) -> int:
        return len(self.policy)

    def choose(self, batch_size: int) -> Tensor:
        """(B, rounds) distinct sub-policy indices per image, uniform (global RNG)."""
        return torch.rand(batch_size, self.num_candidates).argsort(dim=1)[:, : self.rounds]

    def _run_chosen(self, xf: Tensor, chosen: Tensor) -> Tensor:
        self.policy.chosen = chosen
        try:
            return self.policy(xf)
        finally:
            self.policy.chosen = None

    def _per_image(self, xf: Tensor) -> Tensor:
        choice = self.choose(xf.shape[0])
        for r in range(self.rounds):
            out = torch.empty_like(xf)
            for op in choice[:, r].unique().tolist():
                index = torch.nonzero(choice[:, r] == op).flatten().to(xf.device)
                out[index] = self._run_chosen(xf[index], torch.tensor([op]))
            xf = out
        return xf

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        if x.shape[0] == 0:
            return x.clone()
        with seeded_rng(draw_seed(generator), x.device):
            xf = to_unit(x)
            out = self.policy(xf) if self.selection == "batch" else self._per_image(xf)
        return from_unit(out, x)


class RandAugment(_Policy):
    """RandAugment: ``n`` distinct operations per image from kornia's list of 15 (auto
    contrast, equalize, invert, rotate, posterize, solarize, solarize-add, colour, contrast,
    brightness, sharpness, shear x/y, translate x/y), each at magnitude ``m`` of 30 with a
    random sign for the symmetric ones.

    Args:
        n: operations per image (1..15).
        m: magnitude, 1..29 (``m / 30`` of each operation's range).
        selection: "image" (each image its own operations) or "batch" (kornia's: one choice
            per batch).
    """

    def __init__(self, n: int = 2, m: int = 9, selection: str = "image") -> None:
        super().__init__(selection)
        self.n, self.m = int(n), int(m)
        self.policy = _KorniaRandAugment(n=self.n, m=self.m)
        self.rounds = self.n

    def to_torchvision(self) -> v2.Transform:
        # 31 bins: bin m is m / 30 of each range, as kornia's magnitude m
        return v2.RandAugment(num_ops=self.n, magnitude=self.m, num_magnitude_bins=31)

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, selection={self.selection!r}"


class TrivialAugment(_Policy):
    """TrivialAugment: one operation per image from kornia's list of 12, at a magnitude
    drawn uniformly per image.

    Args:
        selection: "image" (each image its own operation) or "batch" (kornia's).
    """

    def __init__(self, selection: str = "image") -> None:
        super().__init__(selection)
        self.policy = _KorniaTrivialAugment()

    def to_torchvision(self) -> v2.Transform:
        return v2.TrivialAugmentWide()

    def extra_repr(self) -> str:
        return f"selection={self.selection!r}"


class AutoAugment(_Policy):
    """AutoAugment with a searched policy (default: CIFAR-10's 25 sub-policies of two
    operations, each applied with its own probability and magnitude bin).

    Args:
        policy: "cifar10", "imagenet" or "svhn".
        selection: "image" (each image its own sub-policy) or "batch" (kornia's).
    """

    def __init__(self, policy: str = "cifar10", selection: str = "image") -> None:
        super().__init__(selection)
        names = {"cifar10": v2.AutoAugmentPolicy.CIFAR10, "imagenet": v2.AutoAugmentPolicy.IMAGENET,
                 "svhn": v2.AutoAugmentPolicy.SVHN}
        if policy not in names:
            raise ValueError(f"policy must be one of {sorted(names)}, got {policy!r}")
        self.policy_name = policy
        self._tv_policy = names[policy]
        self.policy = _KorniaAutoAugment(policy=policy)

    def to_torchvision(self) -> v2.Transform:
        return v2.AutoAugment(self._tv_policy)

    def extra_repr(self) -> str:
        return f"policy={self.policy_name!r}, selection={self.selection!r}"
