"""Batched RandAugment, TrivialAugment and AutoAugment: per-image choices, seeding, per-image
torchvision equivalents."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from cifar_lab.data.augment import AutoAugment, BatchAugment, HorizontalFlip, RandAugment, RandomCrop, TrivialAugment
from conftest import random_images as _batch

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

POLICIES = {
    "randaugment": lambda selection="image": RandAugment(n=2, m=9, selection=selection),
    "trivialaugment": lambda selection="image": TrivialAugment(selection=selection),
    "autoaugment": lambda selection="image": AutoAugment("cifar10", selection=selection),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("selection", ["image", "batch"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_policy_shape_dtype_and_seeding(name, selection, dtype):
    op = POLICIES[name](selection)
    x = _batch(24, dtype=dtype)
    torch.manual_seed(0)
    a = op(x, _gen(1))
    torch.manual_seed(99)
    state = torch.get_rng_state()
    b = op(x, _gen(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)  # the generator decides, not the global RNG
    assert torch.equal(torch.get_rng_state(), state)  # which the op does not advance
    assert not torch.equal(op(x, _gen(2)), a)
    if dtype.is_floating_point:
        assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_choices_differ_per_image(name):
    op = POLICIES[name]()
    choice = op.choose(64)
    assert choice.shape == (64, op.rounds)
    assert torch.unique(choice[:, 0]).numel() > 1
    assert choice.max() < op.num_candidates
    # one image repeated 64 times comes out in many versions
    same = _batch(1).expand(64, -1, -1, -1).contiguous()
    out = op(same, _gen(3))
    assert torch.unique(out.flatten(1), dim=0).shape[0] > 4


def test_randaugment_draws_distinct_operations_per_image():
    op = RandAugment(n=3, m=5)
    choice = op.choose(500)
    assert all(len(set(row)) == 3 for row in choice.tolist())
    counts = torch.bincount(choice.flatten(), minlength=op.num_candidates)
    assert (counts > 0).all()  # every one of kornia's 15 operations gets picked
    assert op.num_candidates == 15


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_to_torchvision_runs_per_image(name):
    import PIL.Image

    op = POLICIES[name]()
    t = op.to_torchvision()
    expected = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide,
                "autoaugment": v2.AutoAugment}[name]
    assert isinstance(t, expected)
    x = _batch(2)
    assert t(x[0]).shape == (3, 32, 32) and t(x[0]).dtype == torch.uint8
    img = PIL.Image.fromarray(x[0].permute(1, 2, 0).numpy())
    assert t(img).size == (32, 32)
    aug = BatchAugment({"crop": RandomCrop(32, 4), "flip": HorizontalFlip(), "policy": op}, MEAN, STD)
    y = aug.to_torchvision()(x[0])
    assert y.shape == (3, 32, 32) and y.dtype == torch.float32


def test_policy_settings_reach_torchvision_and_are_checked():
    t = RandAugment(n=3, m=15).to_torchvision()
    assert (t.num_ops, t.magnitude, t.num_magnitude_bins) == (3, 15, 31)
    assert AutoAugment().to_torchvision().policy == v2.AutoAugmentPolicy.CIFAR10
    assert AutoAugment("svhn").to_torchvision().policy == v2.AutoAugmentPolicy.SVHN
    with pytest.raises(ValueError):
        RandAugment(m=30)
    with pytest.raises(ValueError):
        RandAugment(n=0)
    with pytest.raises(ValueError):
        AutoAugment("mnist")
    with pytest.raises(ValueError):
        TrivialAugment(selection="epoch")


def test_policy_in_batch_augment_is_reproducible_and_empty_batch_works():
    aug = BatchAugment({"crop": RandomCrop(32, 4), "flip": HorizontalFlip(), "policy": RandAugment()}, MEAN, STD)
    x = _batch(16)
    a, b = aug(x, _gen(5)), aug(x, _gen(5))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert RandAugment()(x[:0], _gen(0)).shape == (0, 3, 32, 32)
