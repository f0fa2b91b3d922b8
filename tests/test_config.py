"""Every option of every config group composes, and the cheap ones instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from cifar_lab import builders
from cifar_lab.builders.assemble import assemble
from cifar_lab.builders.settle import TRAIN, settle
from cifar_lab.errors import ConfigError
from conftest import CONF, compose_cfg

GROUPS = ["data", "augment", "model", "optimizer", "scheduler", "trainer", "callbacks", "logger", "debug", "experiment",
          "hparams_search"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [(group, option) for group in GROUPS for option in options(group)]


def test_train_defaults_list_has_every_group() -> None:
    text = (CONF / "train.yaml").read_text()
    for group in ["data", "model", "optimizer", "scheduler", "trainer", "callbacks", "logger", "paths", "hydra",
                  "experiment: null", "debug: null", "hparams_search: null"]:
        assert f"- {group}" in text


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    assert cfg.data.num_classes in (10, 100)
    if group in ("optimizer", "scheduler", "trainer", "callbacks", "logger"):
        node = cfg[group]
        if group == "optimizer":
            assert callable(instantiate(node))
        elif group == "trainer":
            assert node._target_ == "lightning.pytorch.Trainer"
        elif group in ("callbacks", "logger"):
            for entry in node.values():
                assert entry is None or "_target_" in entry


@pytest.mark.slow
def test_default_composition_builds_every_object(tmp_path: Path) -> None:
    cfg = compose_cfg(["data=synthetic", "model=simple_cnn", "trainer=cpu", "data.batch_size=16"], tmp_path)
    for build in (builders.build_datamodule, builders.build_module, lambda c: builders.build_trainer(c, [], [])):
        with pytest.raises(ConfigError, match="=auto is decided before anything is built"):
            build(cfg)  # undecided until settled
    run = assemble(settle(cfg, TRAIN, tmp_path), tmp_path, tmp_path / "checkpoints")  # the defaults, measured
    cfg = run.settled.cfg
    assert run.datamodule.batch_size == cfg.data.batch_size and run.module.num_classes == 10
    assert run.module.memory_format == cfg.module.memory_format != "auto"
    assert {type(c).__name__ for c in run.callbacks} >= {"ModelCheckpoint", "LearningRateMonitor"}
    assert run.trainer.max_epochs == cfg.trainer.max_epochs


def test_num_classes_flows_from_data_to_model(tmp_path: Path) -> None:
    cfg = compose_cfg(["data=cifar100", "model=simple_cnn", "module.memory_format=contiguous"], tmp_path)
    import torch

    module = builders.build_module(cfg)
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_environment_variable_sets_data_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_LAB_DATA", str(tmp_path / "elsewhere"))
    cfg = compose_cfg([], tmp_path)
    assert cfg.data.source.root == str(tmp_path / "elsewhere")
