"""Model card: accuracy with its Wilson interval, per-class precision/recall and calibration, checked by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError

from cifar_lab.deploy.model_card import calibration, command_line, wilson_interval, write_model_card

CLASSES = ["red", "green", "blue"]


def colour_net() -> nn.Module:
    """Predicts an image's dominant colour: a 1x1 identity convolution, then global average pooling."""
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        net[0].bias.zero_()
    return net


def test_wilson_interval_matches_a_hand_computation() -> None:
    # 40 of 50, z = 1.96: centre (0.8 + 1.96^2/100) / (1 + 1.96^2/50) = 0.838416 / 1.076832 = 0.778592;
    # half width 1.96 * sqrt(0.8 * 0.2 / 50 + 1.96^2 / 10000) / 1.076832 = 0.108967
    low, high = wilson_interval(40, 50)
    assert low == pytest.approx(0.778592 - 0.108967, abs=1e-5)
    assert high == pytest.approx(0.778592 + 0.108967, abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_calibration_error_matches_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 10, generator=g).mul(2).softmax(dim=1)
    labels = torch.randint(0, 10, (500,), generator=g)
    expected = MulticlassCalibrationError(10, n_bins=15, norm="l1")(probs, labels)
    result = calibration(probs, labels)
    assert result["ece"] == pytest.approx(float(expected), abs=1e-6)
    assert sum(result["count"]) == 500


def test_card_for_known_predictions(tmp_path: Path) -> None:
    # 50 images: 20 red, 20 green, 10 blue; the labels say 10 of the green ones are blue -> 40 correct
    colours = torch.tensor([0] * 20 + [1] * 20 + [2] * 10)
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 10 + [2] * 10)
    images = torch.zeros(50, 3, 4, 4, dtype=torch.uint8)
    images[torch.arange(50), colours] = 255
    facts = {"model": "colour_net", "target": "torch.nn.Sequential", "image_size": 4,
             "data": "hand-made colours", "splits": {"train": 0, "val": 0, "test": 50}, "experiment": None,
             "overrides": ["model=colour", "seed=3"], "seed": 3, "wall_time_s": 75.0, "checkpoint": "best.ckpt",
             "command": command_line("python train.py", ["model=colour", "seed=3"])}
    card = write_model_card(tmp_path, facts, colour_net(), lambda x: x.float() / 255, (images, labels), CLASSES)
    text = card.read_text()
    assert card.name == "MODEL_CARD.md" and (tmp_path / "reliability.png").is_file()
    assert "- parameters: 12" in text
    assert "- multiply-accumulates per 4x4 image: 144" in text  # 1x1 conv: 3 * 3 * 16 pixels
    assert "accuracy: 80.00% (40 of 50 test images;" in text
    assert "95% confidence interval (Wilson): 66.96% - 88.76%" in text
    # red: 20/20 both; green predicted 20, 10 right (precision .5), all 10 green found; blue: 10 of 20 found
    assert "| red | 1.000 | 1.000 | 20 |" in text
    assert "| green | 0.500 | 1.000 | 10 |" in text
    assert "| blue | 1.000 | 0.500 | 20 |" in text
    assert "expected calibration error (15 bins): 0.2" in text  # confident (p ~ 0.58) on all, 80% right
    assert "python train.py model=colour seed=3" in text and "wall time: 1m15s" in text
    assert "CPU: " in text and "torch " in text and "## Robustness" not in text
    probs = colour_net()(images.float() / 255).softmax(dim=1).detach()
    assert f"{calibration(probs, labels)['ece']:.4f}" in text
    assert math.isclose(calibration(probs, labels)["ece"], abs(float(probs.max(dim=1).values.mean()) - 0.8),
                        abs_tol=1e-6)
