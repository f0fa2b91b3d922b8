"""The augment config group (conf/augment/): every option composes and builds, command-line
edits of data.augment keep working, and the three policies train end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from cifar_lab import builders
from cifar_lab.cli.train import train
from cifar_lab.data import augment as A
from conftest import CONF, SYNTH, compose_cfg

OPTIONS = sorted(p.stem for p in (CONF / "augment").glob("*.yaml"))

# option -> the op types it builds, in order
EXPECTED = {
    "standard": [A.RandomCrop, A.HorizontalFlip],
    "none": [],
    "conv_block_net": [A.RandomCrop, A.HorizontalFlip, A.ColorJitter],
    "squeezenet": [A.RandomCrop, A.HorizontalFlip, A.ColorJitter, A.RandomRotation],
    "resnet_se": [A.RandomCrop, A.HorizontalFlip, A.RandomGrayscale, A.RandomAutocontrast],
    "speedrun": [A.RandomCrop, A.AlternatingFlip, A.ProgressiveResize],
    "randaugment": [A.RandomCrop, A.HorizontalFlip, A.RandAugment],
    "trivialaugment": [A.RandomCrop, A.HorizontalFlip, A.TrivialAugment],
    "autoaugment": [A.RandomCrop, A.HorizontalFlip, A.AutoAugment],
}


def _ops(cfg) -> list:
    with open_dict(cfg):  # the batches' layout is decided when settling; either one has the same ops
        cfg.module.memory_format = "contiguous"
    return list(builders.build_datamodule(cfg).train_augment.ops.values())


def test_every_option_is_known() -> None:
    assert set(OPTIONS) == set(EXPECTED)


@pytest.mark.parametrize("option", OPTIONS)
def test_option_composes_and_builds(option: str, tmp_path: Path) -> None:
    cfg = compose_cfg(["data=synthetic", f"augment={option}"], tmp_path)
    assert [type(op) for op in _ops(cfg)] == EXPECTED[option]


@pytest.mark.parametrize("option", OPTIONS)
def test_option_file_is_commented(option: str) -> None:
    """Every key has a comment (on the line above or at the end of its line); ``_target_``
    names the op the comment above its entry describes."""
    lines = (CONF / "augment" / f"{option}.yaml").read_text().splitlines()
    assert lines[0].startswith("# @package data")
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z_]+:", line) and not line.startswith("defaults:") and "_target_:" not in line:
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"{option}.yaml:{i + 1}: {line}"


def test_standard_is_the_default_for_every_data_source(tmp_path: Path) -> None:
    for data in ("cifar10", "cifar100", "synthetic", "imagefolder"):
        cfg = compose_cfg([f"data={data}"], tmp_path)
        assert OmegaConf.to_container(cfg.data.augment) == {
            "crop": {"_target_": "cifar_lab.data.augment.RandomCrop", "size": 32, "padding": 4,
                     "padding_mode": "constant"},
            "flip": {"_target_": "cifar_lab.data.augment.HorizontalFlip", "p": 0.5},
        }, data


def test_command_line_edits_of_data_augment(tmp_path: Path) -> None:
    cfg = compose_cfg(["data=synthetic", "data.augment.flip=null"], tmp_path)
    assert [type(op) for op in _ops(cfg)] == [A.RandomCrop]
    gray = "+data.augment.gray={_target_: cifar_lab.data.augment.RandomGrayscale, p: 0.2}"  # as README shows
    cfg = compose_cfg(["data=synthetic", gray], tmp_path)
    ops = _ops(cfg)
    assert [type(op) for op in ops] == [A.RandomCrop, A.HorizontalFlip, A.RandomGrayscale] and ops[2].p == 0.2
    cfg = compose_cfg(["data=synthetic", "augment=randaugment", "data.augment.policy.m=15",
                       "data.augment.policy.selection=batch"], tmp_path)
    policy = _ops(cfg)[-1]
    assert (policy.n, policy.m, policy.selection) == (2, 15, "batch")
    # the command line beats an experiment's choice
    cfg = compose_cfg(["data=synthetic", "experiment=resnet_se", "augment=autoaugment"], tmp_path)
    assert [type(op) for op in _ops(cfg)] == EXPECTED["autoaugment"]


def test_debug_overfit_switches_augmentation_off(tmp_path: Path) -> None:
    for extra in ([], ["experiment=resnet_se"], ["augment=randaugment"]):
        cfg = compose_cfg(["data=synthetic", *extra, "debug=overfit"], tmp_path)
        assert cfg.data.augment is None and _ops(cfg) == []


POLICY_RUN = [
    *SYNTH,
    "logger=none",
    "trainer.enable_progress_bar=false",
    "debug=fast_dev_run",
    "data.batch_size=16",
    "data.eval_batch_size=32",
]


@pytest.mark.slow
@pytest.mark.parametrize("option", ["randaugment", "trivialaugment", "autoaugment"])
def test_policy_trains_on_synthetic_data(option: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(compose_cfg([*POLICY_RUN, f"augment={option}"], run_dir))
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == 1 and 0.0 <= summary["metrics"]["test/acc"] <= 1.0


@pytest.mark.slow
def test_policy_trains_with_the_per_image_pipeline(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(compose_cfg([*POLICY_RUN, "augment=autoaugment", "data.pipeline=per_image"], run_dir))
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1
