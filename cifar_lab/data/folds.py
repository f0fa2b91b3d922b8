"""k-fold cross-validation: the training set cut into K class-stratified, seeded, disjoint folds.

Each class's images are shuffled with the seed and dealt to the folds in turn, continuing the
rotation from one class to the next, so every fold holds each class's images to within one and
fold sizes differ by at most one. ``data.folds=K data.fold=i`` validates on fold i and trains on
the other K - 1 (:meth:`cifar_lab.data.datamodule.CIFARDataModule.setup`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cifar_lab.errors import DataError

__all__ = ["stratified_folds", "fold_split"]


def stratified_folds(labels: Tensor, folds: int, seed: int) -> list[Tensor]:
    """``folds`` sorted index tensors: disjoint, covering ``range(len(labels))``, stratified by label."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    g = torch.Generator().manual_seed(seed)
    assigned = torch.empty(len(labels), dtype=torch.long)
    offset = 0
    for c in torch.unique(labels, sorted=True):
        members = torch.nonzero(labels == c).flatten()
        shuffled = members[torch.randperm(len(members), generator=g)]
        assigned[shuffled] = (torch.arange(len(shuffled)) + offset) % folds
        offset += len(shuffled)
    return [torch.nonzero(assigned == i).flatten() for i in range(folds)]


def fold_split(labels: Tensor, folds: int, fold: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, validation) for fold ``fold`` of ``folds``, both sorted."""
    if not 0 <= fold < folds:
        raise DataError(f"data.fold={fold} must lie in [0, {folds - 1}] for data.folds={folds}")
    if folds > len(labels):
        raise DataError(f"data.folds={folds} is more than the {len(labels)} training images; use fewer folds")
    parts = stratified_folds(labels, folds, seed)
    keep = torch.cat([p for i, p in enumerate(parts) if i != fold]).sort().values
    return keep, parts[fold]
