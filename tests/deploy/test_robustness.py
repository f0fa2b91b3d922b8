"""Robustness evaluation and model cards of real (tiny) runs: files, scalars, summaries, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cifar_lab.cli import evaluate
from cifar_lab.cli.train import train
from cifar_lab.errors import ConfigError
from cifar_lab.deploy.robustness import corruption_accuracy
from conftest import SYNTH, compose_cfg

QUICK = [*SYNTH, "data.source.train_size=300", "data.source.test_size=100", "data.val_size=100",
         "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
PICKED = ["robustness=true", "corruption.names=[gaussian_noise,fog]", "corruption.severities=[1,5]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    cfg = compose_cfg(QUICK, run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(QUICK), run_dir / ".hydra" / "overrides.yaml")
    train(cfg)
    return run_dir


def test_training_writes_a_model_card(trained: Path) -> None:
    card = (trained / "MODEL_CARD.md").read_text()
    acc = json.loads((trained / "metrics.json").read_text())["metrics"]["test/acc"]
    assert f"accuracy: {100 * acc:.2f}% ({round(acc * 100)} of 100 test images;" in card
    assert "split sizes: train 200, val 100, test 100" in card
    for field in ("## Model", "parameters:", "multiply-accumulates", "synthetic data", "## Recipe",
                  "95% confidence interval (Wilson)", "| class_0 |", "expected calibration error", "wall time:",
                  "CPU: ", "lightning ", "## Reproduce"):
        assert field in card, field
    assert (trained / "reliability.png").is_file()
    compute = json.loads((trained / "metrics.json").read_text())["compute"]
    assert f"- training compute: {compute['train_pflop']:.4g} PFLOP ({compute['train_images']:,} images" in card


@pytest.mark.slow  # two evaluations with corruptions
def test_evaluate_measures_robustness(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    summary = evaluate.run([f"ckpt_path={trained}", *PICKED], output_dir=out)
    result = json.loads((out / "robustness.json").read_text())
    assert set(result["accuracy"]) == {"gaussian_noise", "fog"}
    assert set(result["accuracy"]["fog"]) == {"1", "5"}
    assert result["clean_acc"] == pytest.approx(summary["metrics"]["test/acc"])
    means = result["mean_acc"]
    assert result["mean_corruption_acc"] == pytest.approx((means["gaussian_noise"] + means["fog"]) / 2)
    assert result["mean_relative_drop"] == pytest.approx(1 - result["mean_corruption_acc"] / result["clean_acc"])
    assert summary["robustness"]["mean_corruption_acc"] == result["mean_corruption_acc"]
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG" and "| fog |" in (out / "robustness.md").read_text()
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent)).Reload()
    assert {"robustness/fog/5", "robustness/gaussian_noise/1", "robustness/mean_corruption_acc"} <= set(
        events.Tags()["scalars"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Robustness" in card and "python -m cifar_lab.evaluate" in card
    again = evaluate.run([f"ckpt_path={trained}", *PICKED], output_dir=tmp_path / "again")
    assert json.loads((tmp_path / "again" / "robustness.json").read_text()) == result  # seeded
    assert again["robustness"] == summary["robustness"]


def test_unknown_corruption_is_refused_before_testing(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="corruption.names: unknown snow"):
        evaluate.run([f"ckpt_path={trained}", "robustness=true", "corruption.names=[snow]"], output_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_a_batch_the_model_cannot_run_is_one_message() -> None:
    class Hungry(nn.Module):
        def forward(self, x):
            if len(x) > 8:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return x.mean(dim=(2, 3))

    images, labels = torch.zeros(32, 3, 8, 8, dtype=torch.uint8), torch.zeros(32, dtype=torch.long)
    with pytest.raises(ConfigError, match="cannot run batches of 16 images on cpu .*lower corruption.batch_size"):
        corruption_accuracy(Hungry(), lambda x: x.float(), images, labels, ["fog"], [1], batch_size=16, clean_acc=1.0)
    result = corruption_accuracy(Hungry(), lambda x: x.float(), images, labels, ["fog"], [1], batch_size=8,
                                 clean_acc=0.5)
    assert result["clean_acc"] == 0.5 and result["accuracy"] == {"fog": {"1": 1.0}}
