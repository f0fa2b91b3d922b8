"""Exact mid-epoch resume with augmentation delegated to kornia: kornia draws from the global
RNG, so its draws are seeded from the datamodule's per-epoch generator (saved in every
checkpoint); a resumed run must equal the uninterrupted one, weights and metrics exactly.

Same runs and helpers as tests/test_resume.py, with RandAugment and two kornia ops added.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from cifar_lab.callbacks.safety import TrainingInterrupted
from cifar_lab.cli.train import train
from conftest import compose_cfg
from test_resume import BASE, _assert_same_run, _summary, _weights, interrupt_at, python_sigint_handler  # noqa: F401

KORNIA = [
    *BASE,
    "augment=randaugment",  # crop + flip + RandAugment, operations chosen per image
    "+data.augment.jitter={_target_:cifar_lab.data.augment.ColorJitter,brightness:0.3,hue:0.1}",
    "+data.augment.rotation={_target_:cifar_lab.data.augment.RandomRotation,degrees:10,p:0.5}",
]


@pytest.fixture(scope="module")
def kornia_reference(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """The uninterrupted run: its metrics and final weights."""
    run_dir = tmp_path_factory.mktemp("kornia_reference") / "run"
    train(compose_cfg(KORNIA, run_dir))
    return _summary(run_dir), _weights(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_kornia_augmentation_resumes_mid_epoch_exactly(tmp_path: Path, kornia_reference, interrupt_at,
                                                       monkeypatch) -> None:
    run_dir = tmp_path / "run"
    interrupt_at(5, signal.SIGTERM)  # batch 2 of 4 in epoch 1
    with pytest.raises(TrainingInterrupted):
        train(compose_cfg(KORNIA, run_dir))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    monkeypatch.undo()
    train(compose_cfg([*KORNIA, "ckpt_path=last"], run_dir))
    _assert_same_run(run_dir, kornia_reference)


def test_kornia_augmentation_changes_the_run(tmp_path: Path, kornia_reference) -> None:
    """The ops are really on: without them the same run ends elsewhere."""
    run_dir = tmp_path / "plain"
    train(compose_cfg(BASE, run_dir))
    weights = _weights(run_dir / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(weights[k], kornia_reference[1][k]) for k in weights)
