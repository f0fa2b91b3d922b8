"""evaluate: the training config comes back, overrides apply on top, and the recorded test accuracy is reproduced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_lab import checkpoints
from cifar_lab.cli import evaluate
from cifar_lab.config.compose import from_training, hydra_job, replayable
from cifar_lab.errors import CheckpointError, UnsafeConfigError
from cifar_lab.cli.train import train
from conftest import FIGURES, SYNTH, compose_cfg, run_cli

QUICK = [*SYNTH, *FIGURES, "data.source.train_size=300", "data.source.test_size=100", "data.val_size=100",
         "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
REPORT_FILES = ("classification_report.txt", "confusion_matrix.png", "misclassified.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished training run with TensorBoard and the default callbacks, laid out as the CLI leaves it."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    cfg = compose_cfg(QUICK, run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra saves: unresolved, no hydra node
    OmegaConf.save(OmegaConf.create(QUICK), run_dir / ".hydra" / "overrides.yaml")
    train(cfg)
    return run_dir


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_training_run_has_reports_and_tensorboard_content(trained: Path) -> None:
    for name in (*REPORT_FILES, "curves.png"):
        assert (trained / name).is_file(), name
    report = (trained / "classification_report.txt").read_text()
    assert "class_9" in report and "weighted avg" in report and "support" in report
    summary = _summary(trained)
    assert 0.0 <= summary["metrics"]["test/ece"] <= 1.0
    assert "val/ece" in summary["metrics"]
    assert not any("per_class" in k for k in summary["metrics"])

    events = EventAccumulator(str(trained / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"val/confusion_matrix", "test/confusion_matrix", "test/misclassified"} <= set(tags["images"])
    for stage in ("val", "test"):
        for kind in ("precision", "recall", "f1"):
            assert f"{stage}_per_class/{kind}/class_0" in tags["scalars"]
    assert {"test/ece", "val/ece", "test/acc", "hp/test_acc", "hp/val_acc_best"} <= set(tags["scalars"])
    # the CUSTOM SCALARS layout: train vs val loss and accuracy on one chart each, and the learning rate
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    layouts = [e for e in EventAccumulator(str(trained / "tensorboard"), size_guidance={"tensors": 0}).Reload()
               .Tensors(metadata.CONFIG_SUMMARY_TAG)]
    assert layouts
    layout = layout_pb2.Layout.FromString(layouts[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["loss: train vs val"] == ["^train/loss$", "^val/loss$"]
    assert charts["accuracy: train vs val"][:2] == ["^train/acc$", "^val/acc$"]
    assert charts["learning rate"] == ["^lr-"]
    assert {"train/loss", "val/loss", "train/acc", "val/acc"} <= set(tags["scalars"])


@pytest.mark.slow
def test_evaluate_reproduces_recorded_test_accuracy(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    summary = evaluate.run([f"ckpt_path={trained}", "trainer.enable_progress_bar=false"], out)
    recorded = _summary(trained)
    assert summary["ckpt_path"] == str(trained / recorded["best_ckpt"])
    assert summary["config_source"] == str(trained / ".hydra" / "overrides.yaml")
    assert summary["metrics"]["test/acc"] == pytest.approx(recorded["metrics"]["test/acc"], abs=1e-6)
    assert summary["metrics"]["test/loss"] == pytest.approx(recorded["metrics"]["test/loss"], rel=1e-5)
    assert summary["metrics"]["test/ece"] == pytest.approx(recorded["metrics"]["test/ece"], abs=1e-5)
    assert summary["model"] == "simple_cnn" and summary["train_run_dir"] == str(trained)
    assert _summary(out) == summary
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    assert (trained / "classification_report.txt").read_text() == (out / "classification_report.txt").read_text()
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.callbacks.report.output_dir == str(out) and saved.ckpt_path == str(trained / recorded["best_ckpt"])


@pytest.mark.slow
def test_evaluate_a_lone_checkpoint_uses_its_stored_config(trained: Path, tmp_path: Path) -> None:
    lone = tmp_path / "elsewhere" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(trained / _summary(trained)["best_ckpt"], lone)
    out = tmp_path / "eval"
    summary = evaluate.run([f"ckpt_path={lone}", "data.eval_batch_size=7", "callbacks.report.misclassified=0"], out)
    assert summary["config_source"] == f"{lone} (stored overrides)"
    assert summary["metrics"]["test/acc"] == pytest.approx(_summary(trained)["metrics"]["test/acc"], abs=1e-6)
    saved = OmegaConf.load(out / "config.yaml")
    # paths inside the training run directory now point at this job's directory
    assert saved.callbacks.report.output_dir == str(out)
    assert saved.callbacks.model_checkpoint.dirpath == str(out / "checkpoints")
    assert saved.data.eval_batch_size == 7
    assert (out / "classification_report.txt").is_file() and not (out / "misclassified.png").exists()


@pytest.mark.slow
def test_keys_of_the_training_groups_can_be_overridden(trained: Path, tmp_path: Path) -> None:
    # data.source.test_size exists for data=synthetic (the training choice), not for the default cifar10
    out = tmp_path / "eval"
    evaluate.run([f"ckpt_path={trained}", "data.source.test_size=50"], out)
    assert OmegaConf.load(out / "config.yaml").data.source.test_size == 50
    assert "accuracy                           " in (out / "classification_report.txt").read_text()
    assert "        50\n" in (out / "classification_report.txt").read_text()


def test_training_overrides_skip_keys_under_a_group_chosen_again(trained: Path) -> None:
    ckpt = checkpoints.resolve(trained, "use")
    saved, source = checkpoints.saved_overrides(ckpt, checkpoints.load(ckpt))
    assert source == str(trained / ".hydra" / "overrides.yaml")
    # only what defines the data and the test-time settings; the network comes from the checkpoint
    assert replayable(saved, []) == [o for o in QUICK if o.startswith("data")]
    kept = replayable(saved, ["data=cifar10", "~callbacks"])
    assert "data=synthetic" in kept and not any(o.startswith(("data.", "callbacks.")) for o in kept)
    # the job's own keys are never replayed
    assert replayable(["ckpt_path=last", "hydra.run.dir=/x", "hparams_search=optuna", "seed=3"], []) == ["seed=3"]


def test_a_lone_checkpoint_carries_its_training_overrides(trained: Path) -> None:
    checkpoint = checkpoints.load(trained / _summary(trained)["best_ckpt"])
    assert checkpoint[checkpoints.OVERRIDES_KEY] == QUICK  # the training command's overrides


@pytest.mark.slow
def test_evaluate_with_tta(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    summary = evaluate.run([f"ckpt_path={trained}", "tta.enabled=true", "tta.translate=1"], out)
    assert summary["tta"] == {"enabled": True, "flip": True, "translate": 1, "shifts": None, "padding_mode": "reflect"}
    assert 0.0 <= summary["metrics"]["test/acc"] <= 1.0
    assert _summary(out)["tta"]["translate"] == 1


@pytest.mark.slow
def test_evaluate_with_explicit_tta_shifts(trained: Path, tmp_path: Path) -> None:
    """tta.shifts replaces translate's four moves: the 8 one-pixel neighbours make 18 views with flip."""
    shifts = "[[1,0],[-1,0],[0,1],[0,-1],[1,1],[-1,-1],[1,-1],[-1,1]]"
    summary = evaluate.run([f"ckpt_path={trained}", "tta.enabled=true", f"tta.shifts={shifts}"], tmp_path / "eval")
    assert summary["tta"]["shifts"] == [[1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [-1, -1], [1, -1], [-1, 1]]
    assert 0.0 <= summary["metrics"]["test/acc"] <= 1.0
    from cifar_lab.callbacks.tta import TTACallback
    from cifar_lab.builders.assemble import _with_requested_tta

    cfg = OmegaConf.create({"tta": {**summary["tta"]}})
    (requested,) = [c for c in _with_requested_tta(cfg, []) if isinstance(c, TTACallback)]
    assert len(requested.views) == 18 and (False, -1, 1) in requested.views


def test_overrides_apply_on_top_of_the_training_config() -> None:
    training = ["data=synthetic", "model=simple_cnn", "data.batch_size=32", "optimizer=sgd", "ckpt_path=last"]
    base = compose_cfg(training, Path("/tmp/x"))
    overrides = ["ckpt_path=some.ckpt", "trainer=cpu", "data.eval_batch_size=7", "~callbacks.lr_monitor",
                 "debug=limit", "+extra.key=1", "tta.enabled=true", "hydra.run.dir=/tmp/y"]
    saved = OmegaConf.to_container(base, resolve=True)
    with hydra_job("evaluate", [*replayable(training, overrides), *overrides], Path("/tmp/y")) as cfg:
        from_training(cfg, saved, overrides)
        composed_limit = cfg.trainer.limit_test_batches
    assert cfg.data.source._target_.endswith("SyntheticSource")  # the training data stays
    assert cfg.data.batch_size == 32 and cfg.data.eval_batch_size == 7
    assert cfg.model._target_.endswith("SimpleCNN")  # the checkpoint's network
    # only the data and test-time settings are replayed: the optimizer is the current command's
    assert cfg.optimizer._target_ == compose_cfg([]).optimizer._target_ != "torch.optim.SGD"
    assert cfg.trainer.accelerator == "cpu"  # group choice: the whole node
    assert composed_limit == compose_cfg(["debug=limit"]).trainer.limit_test_batches  # from debug=limit
    assert "lr_monitor" not in cfg.callbacks and "report" in cfg.callbacks
    assert cfg.extra.key == 1 and cfg.tta.enabled is True and cfg.ckpt_path == "some.ckpt"
    assert cfg.task_name == "evaluate" and "hydra" not in cfg


def test_checkpoint_resolution_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="ckpt_path is required"):
        checkpoints.resolve(None, "use")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        checkpoints.resolve(tmp_path, "use")
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoints.load(bad)
    torch.save({"state_dict": {"net.weight": torch.zeros(1)}}, tmp_path / "plain.ckpt")
    checkpoint = checkpoints.load(tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="no training config"):
        checkpoints.saved_config(tmp_path / "plain.ckpt", checkpoint)
    with pytest.raises(CheckpointError, match="do not fit"):
        checkpoints.load_network_weights(torch.nn.Linear(2, 2), checkpoint, "plain.ckpt")


def test_unsafe_checkpoints_are_refused(tmp_path: Path) -> None:
    import argparse

    pickled = tmp_path / "object.ckpt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(x=1)}, pickled)
    with pytest.raises(CheckpointError, match="refusing to load"):
        checkpoints.load(pickled)
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1)},
                "hyper_parameters": {"model": {"_target_": "os.system", "command": "true"}, "data": {}}}, hostile)
    with pytest.raises(UnsafeConfigError, match="refusing to build"):
        checkpoints.saved_config(hostile, checkpoints.load(hostile))


@pytest.mark.slow  # a fresh interpreter importing Lightning: seconds on a busy machine
def test_cli_reports_a_missing_checkpoint_without_traceback(tmp_path: Path) -> None:
    proc = run_cli([f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path, script="cifar_lab.evaluate")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"Error: ckpt_path={tmp_path / 'missing.ckpt'}: no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_train_then_evaluate(tmp_path: Path) -> None:
    run_dir = tmp_path / "train"
    proc = run_cli([*QUICK, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "eval"
    proc = run_cli([f"ckpt_path={run_dir}", f"hydra.run.dir={out}", "data.eval_batch_size=33",
                    "data.source.noise=0.35"], tmp_path, script="cifar_lab.evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Run directory: {out}" in proc.stdout
    recorded, evaluated = _summary(run_dir), _summary(out)
    assert evaluated["metrics"]["test/acc"] == pytest.approx(recorded["metrics"]["test/acc"], abs=1e-6)
    assert evaluated["config_source"] == str(run_dir / ".hydra" / "overrides.yaml")
    for name in REPORT_FILES:
        assert (out / name).is_file()
