"""Settle, then assemble: every command's precision, memory format and compilation come from one settle call,
and every object is built from its result (cifar_lab/builders/settle.py, assemble.py).

The decision is faked (``autotune.decide`` replaced): its choice differs from anything the config states,
so a built object that shows it took it from the one settled config, and nowhere else.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from cifar_lab import autotune, builders
from cifar_lab.builders import assemble as assembly
from cifar_lab.builders import settle as settling
from cifar_lab.checkpoints import Resume
from cifar_lab.errors import ConfigError
from conftest import ROOT, SYNTH, compose_cfg

AUTO = ["trainer.precision=auto", "module.memory_format=auto", "module.compile=auto"]
TINY = [*SYNTH, *AUTO, "data.source.train_size=120", "data.source.test_size=40", "data.val_size=40",
        "model.filters=[4,8]", "model.fc_units=16", "data.batch_size=16", "logger=none",
        "trainer.enable_progress_bar=false"]


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """autotune.decide replaced: channels_last, 32, no compilation; each call recorded."""
    calls: list[dict[str, Any]] = []

    def decide(cfg, run_dir=None, resume_config=None, rank=0, train_images=None, **measure):
        calls.append({"resume_config": resume_config, "train_images": train_images})
        with open_dict(cfg):
            cfg.trainer.precision, cfg.module.memory_format, cfg.module.compile = "32", "channels_last", False
        return autotune.Decision("32", "channels_last", "measured", compile=False)

    monkeypatch.setattr(autotune, "decide", decide)
    return calls


def _uses_the_decision(run: assembly.Assembly) -> None:
    conv = next(m for m in run.module.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert run.module.memory_format == "channels_last" and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert run.datamodule.channels_last  # batches in the network's layout, given at construction
    assert run.module.hparams["module"]["memory_format"] == "channels_last"  # the checkpoint records it
    assert run.module.hparams["trainer"]["precision"] == "32" and run.module.hparams["module"]["compile"] is False
    if run.trainer is not None:
        assert run.trainer.precision == "32-true"


def test_settled_config_is_final_read_only_and_leaves_the_composed_one(tmp_path: Path, decisions: list) -> None:
    cfg = compose_cfg(TINY, tmp_path)
    settled = settling.settle(cfg, settling.TRAIN, tmp_path)
    assert len(decisions) == 1 and decisions[0]["train_images"] == 80  # 120 - 40 held out: the run's length
    assert "auto" not in {str(settled.cfg.trainer.precision), str(settled.cfg.module.memory_format),
                          str(settled.cfg.module.compile)}
    assert cfg.module.memory_format == "auto"  # the composed config is not changed
    with pytest.raises(Exception, match="read-only"):
        settled.cfg.module.memory_format = "contiguous"
    _uses_the_decision(assembly.assemble(settled, tmp_path, tmp_path / "checkpoints"))


@pytest.mark.parametrize("role", [settling.TRAIN, settling.SWEEP_TRIAL, settling.TUNE_LR, settling.TUNE_BATCH_SIZE,
                                  settling.BENCH], ids=lambda r: r.name)
def test_each_role_builds_from_its_one_settle_call(role: settling.Role, tmp_path: Path, decisions: list) -> None:
    settled = settling.settle(compose_cfg(TINY, tmp_path), role, tmp_path)
    run = assembly.assemble(settled, tmp_path, tmp_path / "checkpoints")
    assert len(decisions) == 1
    _uses_the_decision(run)
    assert (run.trainer is None) == (role == settling.BENCH)
    assert (run.loggers == []) if not role.loggers else True


@pytest.mark.parametrize("role", [settling.TRAIN, settling.SWEEP_TRIAL, settling.TUNE_BATCH_SIZE, settling.TUNE_LR,
                                  settling.BENCH], ids=lambda r: r.name)
def test_a_run_reads_its_data_once(role: settling.Role, tmp_path: Path, decisions: list,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """settle reads the training set (missing data fails before timing); the run's datamodule reuses those splits
    as they were split (held-out rows moved in place), and a role that reads nothing first reads it once itself."""
    from cifar_lab.data.synthetic import SyntheticSource

    loads = []
    load = SyntheticSource.load
    monkeypatch.setattr(SyntheticSource, "load", lambda self: loads.append(1) or load(self))
    settled = settling.settle(compose_cfg(TINY, tmp_path), role, tmp_path)
    run = assembly.assemble(settled, tmp_path, tmp_path / "checkpoints")
    run.datamodule.prepare_data()
    run.datamodule.setup("fit")
    assert len(loads) == 1
    fresh = builders.build_datamodule(run.settled.cfg)
    fresh.setup("fit")
    assert fresh.classes == run.datamodule.classes
    for split in ("train", "val", "test"):
        for got, expected in zip(run.datamodule.splits[split], fresh.splits[split]):
            assert torch.equal(got, expected), split


def test_a_resume_keeps_its_checkpoints_choices(tmp_path: Path) -> None:
    """The real decision: the checkpoint's saved precision and memory format win over `auto`, nothing measured."""
    saved = {"trainer": {"precision": "32"}, "module": {"memory_format": "channels_last"}}
    cfg = compose_cfg([*TINY[:-3], "trainer.precision=auto", "module.memory_format=auto", "module.compile=false"],
                      tmp_path)
    settled = settling.settle(cfg, settling.RESUME, tmp_path, resume=Resume(str(tmp_path / "last.ckpt"), [], saved))
    assert settled.decision.source == "checkpoint"
    assert (settled.cfg.trainer.precision, settled.cfg.module.memory_format) == ("32", "channels_last")


def test_evaluate_tests_the_checkpoints_weights_and_ignores_init_from(tmp_path: Path, decisions: list,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_cfg([*TINY, f"init_from={tmp_path}"], tmp_path)
    net = compose_cfg([*SYNTH, "model.filters=[4,8]", "model.fc_units=16"], tmp_path).model
    from hydra.utils import instantiate

    trained = instantiate(net)
    checkpoint = {"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()},
                  "hyper_parameters": {"trainer": {"precision": "32"}}}
    with caplog.at_level("INFO"):
        settled = settling.settle(cfg, settling.EVALUATE, trained=(tmp_path / "x.ckpt", checkpoint))
    assert decisions[0]["resume_config"] == checkpoint["hyper_parameters"]  # its saved choices are kept
    assert "not used by evaluate" in caplog.text
    run = assembly.assemble(settled, tmp_path)
    _uses_the_decision(run)
    for name, value in trained.state_dict().items():
        assert torch.equal(run.module.net.state_dict()[name], value)


def test_roles_refuse_what_they_cannot_use(tmp_path: Path, decisions: list) -> None:
    with pytest.raises(ConfigError, match="tune lr does not resume a run; drop ckpt_path"):
        settling.settle(compose_cfg([*TINY, f"ckpt_path={tmp_path}"], tmp_path), settling.TUNE_LR, tmp_path)
    with pytest.raises(ConfigError, match="init_from=.*: bench does not start from a checkpoint's weights"):
        settling.settle(compose_cfg([*TINY, f"init_from={tmp_path}"], tmp_path), settling.BENCH)
    with pytest.raises(ConfigError, match="module.memory_format=nhwc: must be auto or one of"):
        settling.settle(compose_cfg([*TINY, "module.memory_format=nhwc"], tmp_path), settling.TRAIN, tmp_path)
    assert decisions == []  # refused before anything is decided


def test_tune_starts_from_init_froms_weights(tmp_path: Path, decisions: list) -> None:
    from hydra.utils import instantiate

    source = compose_cfg(TINY, tmp_path)
    trained = instantiate(source.model)
    ckpt = tmp_path / "trained.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()},
                "hyper_parameters": OmegaConf.to_container(source, resolve=True)}, ckpt)
    settled = settling.settle(compose_cfg([*TINY, f"init_from={ckpt}"], tmp_path), settling.TUNE_LR, tmp_path)
    run = assembly.assemble(settled, tmp_path)
    for name, value in trained.state_dict().items():
        assert torch.equal(run.module.net.state_dict()[name], value)


def test_the_bench_settles_through_the_one_call(decisions: list) -> None:
    from cifar_lab.tools import bench
    from cifar_lab.tools.bench.lab import assembled_module

    settled = bench.autotuned(bench.compose(["data=synthetic", "model=simple_cnn", *AUTO]), 8, train_images=50000)
    assert len(decisions) == 1 and decisions[0]["train_images"] == 50000
    _uses_the_decision(assembly.assemble(settled))
    assert assembled_module(settled, torch.device("cpu")).memory_format == "channels_last"


@pytest.mark.slow
def test_train_evaluate_and_the_finders_call_settle_once_and_record_its_choice(
        tmp_path: Path, decisions: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, each command: one settle call, one decision, its objects built from the settled config, and
    the choice in what it writes (metrics.json, lr_find.json, batch_size.json)."""
    from cifar_lab.cli import evaluate, train, tune

    settles: list[str] = []
    built: list[assembly.Assembly] = []

    def spy_settle(cfg, role, *args, **kwargs):
        settles.append(role.name)
        return settling.settle(cfg, role, *args, **kwargs)

    def spy_assemble(*args, **kwargs):
        built.append(assembly.assemble(*args, **kwargs))
        return built[-1]

    for command in (train, evaluate, tune):
        monkeypatch.setattr(command, "settle", spy_settle)
        monkeypatch.setattr(command, "assemble", spy_assemble)
    run_dir = tmp_path / "run"
    train.train(compose_cfg([*TINY, "trainer.max_epochs=1"], run_dir))
    evaluated = evaluate.run([f"ckpt_path={run_dir}"], tmp_path / "eval")
    lr = tune.find_lr(compose_cfg([*TINY, "task_name=tune"], tmp_path / "lr"), tmp_path / "lr", 20, 1e-4, 1e-1)
    size = tune.find_batch_size(compose_cfg([*TINY, "task_name=tune"], tmp_path / "bs"), tmp_path / "bs", 64.0,
                                "linear", max_trials=2, steps=1)
    assert settles == ["train", "evaluate", "tune lr", "tune batch_size"]
    assert len(decisions) == 4  # one decision per settle call
    assert decisions[1]["resume_config"]["module"]["memory_format"] == "channels_last"  # evaluate: the checkpoint's
    for run in built:
        _uses_the_decision(run)
    trained = json.loads((run_dir / "metrics.json").read_text())
    for record in (trained, evaluated, lr, size):
        assert (record["precision"], record["memory_format"], record["compile"]) == ("32", "channels_last", False)
    assert OmegaConf.load(run_dir / "config.yaml").module.memory_format == "channels_last"  # the settled config


def test_no_command_function_is_over_60_lines() -> None:
    """The commands read as steps: settle, assemble, run, report; a long function hides a second job."""
    long = []
    for path in sorted((ROOT / "cifar_lab" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
