"""Model card: accuracy with its Wilson interval, per-class precision/recall and calibration, checked by hand,
all read from the run's one test pass."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassCalibrationError

from cifar_lab.callbacks.reports import CalibrationError, ClassificationReport
from cifar_lab.cli.train import train
from cifar_lab.deploy.model_card import command_line, from_test_pass, wilson_interval, write_model_card
from cifar_lab.module import ClassifierModule
from conftest import FIGURES, SYNTH, compose_cfg

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


def test_reliability_bins_are_the_terms_of_torchmetrics_calibration_error() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 10, generator=g).mul(2).softmax(dim=1)
    labels = torch.randint(0, 10, (500,), generator=g)
    metric = CalibrationError(10, n_bins=15, norm="l1")
    metric.update(probs, labels)
    ece = float(metric.compute())
    assert ece == pytest.approx(float(MulticlassCalibrationError(10, n_bins=15, norm="l1")(probs, labels)), abs=1e-7)
    bins = metric.bins
    assert len(bins["count"]) == 15 and sum(bins["count"]) == 500
    terms = sum(abs(c - a) * n for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"])) / 500
    assert terms == pytest.approx(ece, abs=1e-6)
    # a sure prediction (confidence exactly 1) is drawn in the last bin
    metric.update(torch.eye(10)[:3], torch.arange(3))
    metric.compute()
    assert metric.bins["count"][-1] >= 3 and sum(metric.bins["count"]) == 503


def _colour_test(tmp_path: Path) -> tuple[dict, float]:
    """The report's result and test/acc of the colour network on 50 hand-made images (one test pass)."""
    # 50 images: 20 red, 20 green, 10 blue; the labels say 10 of the green ones are blue -> 40 correct
    colours = torch.tensor([0] * 20 + [1] * 20 + [2] * 10)
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 10 + [2] * 10)
    images = torch.zeros(50, 3, 4, 4)
    images[torch.arange(50), colours] = 1.0
    module = ClassifierModule(colour_net(), optimizer=partial(torch.optim.SGD, lr=0.0), num_classes=3,
                              memory_format="contiguous")
    report = ClassificationReport(output_dir=str(tmp_path / "report"), class_names=CLASSES, misclassified=0,
                                  log_hparams=False, write_files=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[report], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    metrics = trainer.test(module, DataLoader(TensorDataset(images, labels), batch_size=16), verbose=False)[0]
    return report.results["test"], metrics["test/acc"]


def test_card_for_known_predictions(tmp_path: Path) -> None:
    result, acc = _colour_test(tmp_path)
    facts = {"model": "colour_net", "target": "torch.nn.Sequential", "image_size": 4,
             "data": "hand-made colours", "splits": {"train": 0, "val": 0, "test": 50}, "experiment": None,
             "overrides": ["model=colour", "seed=3"], "seed": 3, "wall_time_s": 75.0, "checkpoint": "best.ckpt",
             "command": command_line("python train.py", ["model=colour", "seed=3"])}
    card = write_model_card(tmp_path, facts, colour_net(), from_test_pass(acc, 1, result), CLASSES)
    text = card.read_text()
    assert card.name == "MODEL_CARD.md" and (tmp_path / "reliability.png").is_file()
    assert "- parameters: 12" in text
    assert "- multiply-accumulates per 4x4 image: 144" in text  # 1x1 conv: 3 * 3 * 16 pixels
    assert "accuracy: 80.00% (40 of 50 test images; one view per image)" in text
    assert "95% confidence interval (Wilson): 66.96% - 88.76%" in text
    # red: 20/20 both; green predicted 20, 10 right (precision .5), all 10 green found; blue: 10 of 20 found
    assert "| red | 1.000 | 1.000 | 20 |" in text
    assert "| green | 0.500 | 1.000 | 10 |" in text
    assert "| blue | 1.000 | 0.500 | 20 |" in text
    # every image gets the same confidence (e / (e + 2), 0.576), 80% of them right: ECE = |0.576 - 0.8|
    confidence = torch.e / (torch.e + 2)
    assert f"expected calibration error (15 bins): {abs(confidence - 0.8):.4f}" in text
    assert result["ece"] == pytest.approx(abs(confidence - 0.8), abs=1e-6)
    assert "python train.py model=colour seed=3" in text and "wall time: 1m15s" in text
    assert "CPU: " in text and "torch " in text and "## Robustness" not in text


def test_card_without_a_report_gives_the_runs_accuracy_only(tmp_path: Path) -> None:
    facts = {"model": "colour_net", "image_size": 4, "data": "hand-made colours", "command": "python train.py"}
    text = write_model_card(tmp_path, facts, colour_net(), from_test_pass(0.8, 10), CLASSES).read_text()
    assert "- accuracy: 80.00% (the run's test/acc; the mean of 10 test-time augmentation views per image)" in text
    assert "not collected (the run has no callbacks.report)" in text
    assert "## Calibration" not in text and not (tmp_path / "reliability.png").exists()
    assert "not tested (test=false)" in write_model_card(tmp_path, facts, colour_net(), None, CLASSES).read_text()


TTA = "+callbacks.tta={_target_:cifar_lab.callbacks.tta.TTACallback,flip:true,translate:1,stages:[test]}"


@pytest.mark.slow  # a training run: about 15 s
def test_a_training_run_passes_over_the_test_set_once_per_tta_view(tmp_path: Path, monkeypatch) -> None:
    """Reports, the model card and calibration read the test pass's predictions: the network sees each test
    image once per TTA view (10 here), however many of them are written."""
    seen: list[int] = []
    start_test = ClassifierModule.on_test_start

    def counting(module: ClassifierModule) -> None:
        net = module.net

        def count(called: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # not the copy the card counts multiply-accumulates on (a deep copy keeps the hook), nor the
            # compute record's probe (one all-zero image)
            if called is net and bool(args[0].any()):
                seen.append(len(args[0]))

        net.register_forward_hook(count)
        start_test(module)

    monkeypatch.setattr(ClassifierModule, "on_test_start", counting)
    run_dir = tmp_path / "run"
    train(compose_cfg([*SYNTH, *FIGURES, "data.source.train_size=100", "data.source.test_size=40", "data.val_size=20",
                       "data.eval_batch_size=16", "trainer.max_epochs=1", TTA], run_dir))
    assert sum(seen) == 10 * 40
    card = (run_dir / "MODEL_CARD.md").read_text()
    acc = json.loads((run_dir / "metrics.json").read_text())["metrics"]["test/acc"]
    assert f"- accuracy: {100 * acc:.2f}% ({round(acc * 40)} of 40 test images; the mean of 10 test-time" in card
    for name in ("reliability.png", "classification_report.txt", "confusion_matrix.png", "misclassified.png"):
        assert (run_dir / name).is_file(), name
