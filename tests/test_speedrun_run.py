"""Every follow-up command on the kind of run the speedrun makes: TTA inside the run, progressive
resizing, no validation split (a tiny synthetic run shared by the tests of this file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifar_lab.builders import build_trainer
from cifar_lab.callbacks.tta import TTACallback, replace_run_tta
from cifar_lab.cli import evaluate
from cifar_lab.cli.train import train
from cifar_lab.errors import ConfigError
from test_speedrun import SPEEDRUN_SYNTH
from conftest import compose_cfg, run_cli

# every test here starts a process (a command, or a fixture's run made by the command line)
pytestmark = pytest.mark.slow

# test_speedrun's tiny speedrun, with two steps, epoch lines (no enable_progress_bar=false) and fixed speed settings
SPEEDRUN_TINY = [*(o for o in SPEEDRUN_SYNTH if not o.startswith(("+trainer.limit_train_batches",
                                                                   "trainer.enable_progress_bar"))),
                 "+trainer.limit_train_batches=2", "trainer.precision=32", "module.memory_format=contiguous",
                 "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished speedrun-like run (its own 10-view TTA at test), as the command line leaves it."""
    tmp = tmp_path_factory.mktemp("speedrun")
    run_dir = tmp / "run"
    proc = run_cli([*SPEEDRUN_TINY, f"hydra.run.dir={run_dir}"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(proc.stdout)
    (run_dir / "stderr.txt").write_text(proc.stderr)
    return run_dir


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["metrics"]


def test_evaluate_tta_on_a_run_with_its_own_tta_keeps_one_layer(speedrun: Path, tmp_path: Path, capsys) -> None:
    own = evaluate.run([f"ckpt_path={speedrun}", "trainer.enable_progress_bar=false"], tmp_path / "own")
    assert own["metrics"]["test/loss"] == pytest.approx(_metrics(speedrun)["test/loss"], abs=1e-5)
    capsys.readouterr()
    # the same 10 views asked for again: the result is the run's own one-layer TTA, not views of views
    same = evaluate.run([f"ckpt_path={speedrun}", "trainer.enable_progress_bar=false", "tta.enabled=true",
                         "tta.translate=1"], tmp_path / "same")
    assert "replace the run's own test-time augmentation (10 views (test))" in capsys.readouterr().out
    assert same["metrics"]["test/loss"] == pytest.approx(own["metrics"]["test/loss"], abs=1e-5)
    assert same["tta"]["translate"] == 1
    # other views replace the run's: one layer of 2 views (flip only) differs from the run's 10
    flip = evaluate.run([f"ckpt_path={speedrun}", "trainer.enable_progress_bar=false", "tta.enabled=true",
                         "tta.translate=0"], tmp_path / "flip")
    assert flip["metrics"]["test/loss"] != pytest.approx(own["metrics"]["test/loss"], abs=1e-5)


def test_two_tta_layers_on_one_stage_are_refused_before_the_trainer_exists() -> None:
    cfg = compose_cfg(SPEEDRUN_TINY)
    run_layer, second = TTACallback(translate=1, stages=["test"]), TTACallback(translate=2, stages=["test"])
    with pytest.raises(ConfigError, match="2 test-time augmentation callbacks apply in test"):
        build_trainer(cfg, [run_layer, second], [])
    # one on test and one on predict, or a disabled one, is fine; replacing keeps exactly one on test
    build_trainer(cfg, [run_layer, TTACallback(stages=["predict"], translate=1)], [])
    build_trainer(cfg, [run_layer, TTACallback(translate=2, stages=["test"], enabled=False)], [])
    kept, replaced = replace_run_tta([run_layer, "other"], second)
    assert kept == ["other", second] and replaced == [run_layer]


def test_a_tta_layer_never_patches_a_forward_another_layer_patched() -> None:
    import torch

    from cifar_lab.module import ClassifierModule

    module = ClassifierModule(net=torch.nn.Linear(3, 2), optimizer=None)
    first, second = TTACallback(flip=True, stages=["test"]), TTACallback(flip=True, stages=["test"])
    first.on_test_start(None, module)
    with pytest.raises(ConfigError, match="applied twice in test"):
        second.on_test_start(None, module)
    second.on_test_end(None, module)  # nothing installed, nothing removed
    assert "forward" in vars(module)
    first.on_test_end(None, module)
    first.on_test_end(None, module)  # a second removal is harmless
    assert "forward" not in vars(module)


def test_the_estimate_names_the_scheduled_sizes_and_the_tta_test(speedrun: Path) -> None:
    out = (speedrun / "stdout.txt").read_text()
    line = next(line for line in out.splitlines() if line.startswith("time: about "))
    assert " per epoch at 32 px (" in line and " at 24 px), " in line, line
    assert "for 2 epochs and a 10-view test (measured on the first 2 steps)" in line, line
    assert json.loads((speedrun / "metrics.json").read_text())["data"] == {
        "source": "synthetic", "splits": {"train": 256, "val": 0, "test": 64}}
    record = json.loads((speedrun / "metrics.json").read_text())["time_estimate"]
    assert record["predicted_s"] > 0 and record["measured_s"] > 0


def test_evaluate_shows_test_and_robustness_progress_on_fewer_images(speedrun: Path, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    monkeypatch.setenv("CIFAR_LAB_PROGRESS_S", "0")
    out = tmp_path / "eval"
    evaluate.run([f"ckpt_path={speedrun}", "data.eval_batch_size=32", "robustness=true", "corruption.names=[fog]",
                  "corruption.severities=[1,3]", "corruption.max_images=20", "corruption.batch_size=8"], out)
    lines = capsys.readouterr().out.splitlines()
    # the run's own 10-view TTA test: 64 images in 2 batches; robustness: 3 batches x (fog s1, s3), the clean
    # accuracy being the test pass's
    assert [line.split(",")[0] for line in lines if line.startswith("test (10 views per image): ")] == [
        "test (10 views per image): 1/2 batches", "test (10 views per image): 2/2 batches"]
    robust = [line for line in lines if line.startswith("robustness: ")]
    assert len(robust) == 6 and robust[-1].startswith("robustness: 6/6 batches (fog s3), done in")
    assert json.loads((out / "robustness.json").read_text())["images"] == 20


def test_a_bad_max_images_is_refused_before_the_test(speedrun: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="corruption.max_images must be a whole number >= 1"):
        evaluate.run([f"ckpt_path={speedrun}", "robustness=true", "corruption.max_images=0"], tmp_path / "eval")
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_a_run_without_validation_says_so_and_writes_tensorboard(speedrun: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = (speedrun / "stdout.txt").read_text().splitlines()
    data = next(line for line in lines if line.startswith("data          : "))
    assert "no validation (trainer.limit_val_batches=0" in data and "test set" not in data
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2, epochs
    for line in epochs:
        assert "no validation" in line and " - " not in line and "val loss" not in line, line
        assert "train loss " in line and " acc " in line, line
    # the dashboards every run has: training curves and the learning rate (no val/* without validation)
    events = EventAccumulator(str(speedrun / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "test/acc"} <= scalars and any(s.startswith("lr-") for s in scalars)
    assert not any(s.startswith("val/") for s in scalars)
    assert (speedrun / "csv").is_dir() or any(speedrun.rglob("metrics.csv"))
    card = (speedrun / "MODEL_CARD.md").read_text()
    assert "val none (no validation)" in card


@pytest.mark.parametrize("steps, warned", [(8, True), (10, False)])
def test_a_run_whose_averaged_weights_miss_its_last_steps_says_so(steps: int, warned: bool, tmp_path: Path,
                                                                   caplog) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from cifar_lab.callbacks.averaging import Lookahead
    from conftest import NetModule

    data = TensorDataset(torch.randn(steps * 4, 8), torch.randint(0, 2, (steps * 4,)))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Lookahead(every_n_steps=5)])
    with caplog.at_level("WARNING", logger="cifar_lab"):
        trainer.fit(NetModule(torch.nn.Linear(8, 2)), DataLoader(data, batch_size=4))
    messages = [r.getMessage() for r in caplog.records if "averaged weights" in r.getMessage()]
    if warned:
        assert messages == ["the averaged weights this run keeps (and tests) were last updated at step 5 of 8 "
                            "(every 5 steps): its last 3 steps (38%) are not in them, so the test accuracy of a run "
                            "this short can lie far below its training accuracy; train more steps (more images or a "
                            "smaller data.batch_size)"]
    else:
        assert messages == []


def test_the_tiny_speedrun_explains_its_test_accuracy(speedrun: Path) -> None:
    out = (speedrun / "stdout.txt").read_text() + (speedrun / "stderr.txt").read_text()
    assert "last updated at step 0 of 4" in out
