"""Corruptions: each changes the image more at each severity, keeps shape and dtype, and is seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifar_lab.deploy.corruptions import CORRUPTIONS, SEVERITIES, check_corruptions, corrupt
from cifar_lab.errors import ConfigError


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Smooth uint8 images (random 8x8 colours upscaled), like natural images more than noise is."""
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(32, 3, 8, 8, generator=g), size=32, mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 200 + 20).round().to(torch.uint8)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_severity_changes_the_image_more(images: torch.Tensor, name: str) -> None:
    change = []
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == torch.uint8
        change.append(float((out.float() - images.float()).abs().mean()))
    assert change[0] > 0, f"{name} at severity 1 leaves the images unchanged"
    assert all(a < b for a, b in zip(change, change[1:])), f"{name}: mean |change| {change} is not increasing"


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_deterministic_under_a_seed(images: torch.Tensor, name: str) -> None:
    assert torch.equal(corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=7))


def test_random_corruptions_depend_on_the_seed(images: torch.Tensor) -> None:
    assert not torch.equal(corrupt(images, "gaussian_noise", 3, seed=0), corrupt(images, "gaussian_noise", 3, seed=1))


def test_bad_requests(images: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="unknown snow; choose from gaussian_noise"):
        check_corruptions(["snow"], [1])
    with pytest.raises(ConfigError, match="severities must lie in 1-5"):
        check_corruptions("all", [0, 6])
    with pytest.raises(ValueError, match="expected uint8 images"):
        corrupt(images.float(), "fog", 1)
    assert check_corruptions("all", [1])[0] == list(CORRUPTIONS)
