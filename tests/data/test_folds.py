"""k-fold cross-validation: folds are stratified, seeded, disjoint and cover the training set."""

from __future__ import annotations

import pytest
import torch

from cifar_lab.config.schema import find_problems
from cifar_lab.data.datamodule import CIFARDataModule
from cifar_lab.data.folds import fold_split, stratified_folds
from cifar_lab.data.synthetic import SyntheticSource
from cifar_lab.errors import DataError
from conftest import compose_cfg


def _labels(n: int = 997, classes: int = 10, seed: int = 3) -> torch.Tensor:
    """Uneven class sizes, so remainders are exercised."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("seed", [0, 7])
def test_folds_are_disjoint_cover_and_are_stratified(k: int, seed: int) -> None:
    labels = _labels()
    folds = stratified_folds(labels, k, seed)
    assert len(folds) == k
    joined = torch.cat(folds)
    assert len(joined) == len(labels)  # disjoint: nothing counted twice ...
    assert torch.equal(joined.sort().values, torch.arange(len(labels)))  # ... and covering
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for c in range(10):
        per_fold = [int((labels[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)
    for i in range(k):  # fold i validates, the others train: a partition of the training set
        keep, held = fold_split(labels, k, i, seed)
        assert torch.equal(held, folds[i])
        assert len(set(keep.tolist()) & set(held.tolist())) == 0
        assert len(keep) + len(held) == len(labels)


@pytest.mark.parametrize("k", [3, 5])
def test_the_seed_decides_the_folds(k: int) -> None:
    labels = _labels()
    same = stratified_folds(labels, k, 1)
    assert all(torch.equal(a, b) for a, b in zip(same, stratified_folds(labels, k, 1)))
    other = stratified_folds(labels, k, 2)
    assert not all(torch.equal(a, b) for a, b in zip(same, other))
    # another seed still cuts disjoint, covering folds
    assert torch.equal(torch.cat(other).sort().values, torch.arange(len(labels)))


def test_a_fold_out_of_range_is_refused() -> None:
    with pytest.raises(DataError, match=r"data.fold=3 must lie in \[0, 2\]"):
        fold_split(_labels(), 3, 3, 0)
    with pytest.raises(DataError, match="data.folds=20 is more than the 10 training images"):
        fold_split(_labels(10), 20, 0, 0)


def test_the_datamodule_validates_on_the_fold() -> None:
    source = SyntheticSource(num_classes=10, train_size=300, test_size=50, seed=0)
    train_images = source.load().train_x
    seen = []
    for fold in range(3):
        dm = CIFARDataModule(source, batch_size=64, num_classes=10, val_size=123, folds=3, fold=fold, seed=5)
        dm.setup("fit")
        val_x, val_y = dm.splits["val"]
        assert len(val_x) == 100 and len(dm.splits["train"][0]) == 200  # val_size is unused with folds
        assert torch.bincount(val_y, minlength=10).tolist() == [10] * 10
        expected = fold_split(source.load().train_y, 3, fold, 5)[1]
        assert torch.equal(val_x, train_images[expected])
        seen.append(expected)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(300))


def test_config_checks_folds_before_any_data_is_read() -> None:
    base = ["data=synthetic", "model=simple_cnn"]
    assert find_problems(compose_cfg([*base, "data.folds=5", "data.fold=4"])) == []
    assert any(p.startswith("data.fold=5:") for p in find_problems(compose_cfg([*base, "data.folds=5", "data.fold=5"])))
    assert any(p.startswith("data.folds=1:") for p in find_problems(compose_cfg([*base, "data.folds=1"])))
    too_many = find_problems(compose_cfg([*base, "data.source.train_size=50", "data.val_size=10", "data.folds=60"]))
    assert any(p.startswith("data.folds=60:") for p in too_many)
