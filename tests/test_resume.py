"""Interrupt and resume: a stopped run continues to exactly the result of an uninterrupted one.

Runs are in-process, tiny (a small CNN with dropout, mixup, 4 training batches per epoch) and
deterministic on the CPU; the interruption is a real signal sent to this process from a
callback at a chosen training step.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from cifar_lab.callbacks.safety import TrainingInterrupted
from cifar_lab.config.schema import ConfigError
from cifar_lab.cli.train import train
from conftest import SYNTH, compose_cfg

BASE = [
    *SYNTH,
    "model.filters=[8,16]",
    "model.fc_units=32",
    "model.dropout=0.3",  # draws from the global RNG: exact only if its state is restored
    # mixup on half the batches: draws from the datamodule's per-epoch generator
    "data.mixing={_target_:cifar_lab.data.mixing.BatchMixer,num_classes:10,mixup_alpha:1.0,prob:0.5,mode:batch}",
    "optimizer=adam",
    "scheduler=cosine",
    "logger=none",
    "callbacks.report=null",
    "trainer.enable_progress_bar=false",
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "+trainer.num_sanity_val_steps=1",
]


class SignalAt(L.Callback):
    """Sends ``signum`` to this process when training reaches ``step`` (before that batch runs)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own Ctrl-C handler for each test, whatever the runner inherited: a shell
    starts background jobs with SIGINT ignored, and the tests check that it is restored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def interrupt_at(monkeypatch):
    """``interrupt_at(step, signum)``: the next train() gets a SignalAt callback."""
    from cifar_lab import builders

    def arm(step: int, signum: signal.Signals) -> None:
        build = builders.build_callbacks
        monkeypatch.setattr(builders, "build_callbacks", lambda cfg: [*build(cfg), SignalAt(step, int(signum))])

    return arm


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """The uninterrupted run: its metrics and final weights."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(compose_cfg(BASE, run_dir))
    return _summary(run_dir), _weights(run_dir / "checkpoints" / "last.ckpt")


def _assert_same_run(run_dir: Path, reference) -> None:
    summary, weights = reference
    resumed = _summary(run_dir)
    assert resumed["global_step"] == summary["global_step"] == 12
    assert resumed["metrics"] == summary["metrics"]  # every train/val/test metric, exactly
    final = _weights(run_dir / "checkpoints" / "last.ckpt")
    assert final.keys() == weights.keys()
    for key in weights:
        assert torch.equal(final[key], weights[key]), key


@pytest.mark.parametrize("signum,step", [
    (signal.SIGINT, 6),    # Ctrl-C in the middle of epoch 1 (batch 2 of 4)
    (signal.SIGTERM, 7),   # SIGTERM on the last batch of epoch 1: stops after its validation
])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path: Path, reference, interrupt_at, monkeypatch,
                                                    signum, step) -> None:
    run_dir = tmp_path / "run"
    interrupt_at(step, signum)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(compose_cfg(BASE, run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert stopped.value.checkpoint == str(last) and stopped.value.exit_code == 128 + signum
    assert "ckpt_path=last" in str(stopped.value) and f"hydra.run.dir={run_dir}" in str(stopped.value)
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == step + 1  # the batch in flight was finished, nothing after it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    monkeypatch.undo()
    train(compose_cfg([*BASE, "ckpt_path=last"], run_dir))
    _assert_same_run(run_dir, reference)


def test_resume_from_explicit_path_into_new_run_dir(tmp_path: Path, reference, interrupt_at, monkeypatch) -> None:
    first = tmp_path / "first"
    interrupt_at(5, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(compose_cfg(BASE, first))
    monkeypatch.undo()
    second = tmp_path / "second"
    train(compose_cfg([*BASE, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"], second))
    _assert_same_run(second, reference)
    assert _summary(second)["resumed_from"] == str(first / "checkpoints" / "last.ckpt")


def test_same_seed_deterministic_runs_are_identical(tmp_path: Path, reference) -> None:
    run_dir = tmp_path / "again"
    train(compose_cfg(BASE, run_dir))
    _assert_same_run(run_dir, reference)


# ----------------------------------------------------------------------------- refused resumes
def _one_epoch(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    train(compose_cfg([*BASE, "trainer.max_epochs=1", "test=false"], run_dir))
    return run_dir


def test_resume_refuses_another_model_and_missing_checkpoints(tmp_path: Path) -> None:
    run_dir = _one_epoch(tmp_path)
    other = [*BASE, "model=simple_cnn_bn", f"ckpt_path={run_dir}"]
    refused = r"cannot resume from .*last\.ckpt: it was trained with a different setup"
    with pytest.raises(ConfigError, match=refused) as err:
        train(compose_cfg(other, tmp_path / "other"))
    assert "model.batch_norm: False in the checkpoint, True now" in str(err.value)
    assert not (tmp_path / "other" / "config.yaml").exists()  # refused before anything was built

    with pytest.raises(ConfigError, match="ckpt_path=last: no last.ckpt in"):
        train(compose_cfg([*BASE, "ckpt_path=last"], tmp_path / "fresh"))
    with pytest.raises(ConfigError, match="no checkpoint at"):
        train(compose_cfg([*BASE, f"ckpt_path={tmp_path / 'nowhere.ckpt'}"], tmp_path / "fresh2"))


def test_resume_refuses_corrupt_and_pickled_checkpoints(tmp_path: Path) -> None:
    run_dir = _one_epoch(tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="truncated or corrupted"):
        train(compose_cfg([*BASE, f"ckpt_path={truncated}"], tmp_path / "a"))

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "x": Payload()}, evil)
    with pytest.raises(ConfigError, match="refusing to load"):
        train(compose_cfg([*BASE, f"ckpt_path={evil}"], tmp_path / "b"))
    assert not (tmp_path / "pwned").exists()


def test_resume_refuses_saved_config_with_foreign_target(tmp_path: Path) -> None:
    run_dir = _one_epoch(tmp_path)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["data"]["source"]["_target_"] = "os.system"
    tampered = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, tampered)
    with pytest.raises(ConfigError, match=r"refusing to build the config from .*tampered\.ckpt") as err:
        train(compose_cfg([*BASE, f"ckpt_path={tampered}"], tmp_path / "c"))
    assert "data.source._target_=os.system" in str(err.value)


def test_resume_warns_about_values_taken_from_the_checkpoint(tmp_path: Path, caplog) -> None:
    run_dir = _one_epoch(tmp_path)
    cfg = compose_cfg([*BASE, "trainer.max_epochs=2", "optimizer.lr=0.5", "test=false", f"ckpt_path={run_dir}"],
                      tmp_path / "d")
    with caplog.at_level("WARNING", logger="cifar_lab.cli.train"):
        train(cfg)
    text = caplog.text
    assert "optimizer.lr: 0.001 in the checkpoint, 0.5 now (the checkpoint's value is restored)" in text
    assert "scheduler.scheduler.T_max: 1 in the checkpoint, 2 now" in text


class DoubleCtrlC(L.Callback):
    """Two Ctrl-C in a row at ``step``: the second aborts at once."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_second_ctrl_c_aborts_without_saving(tmp_path: Path, monkeypatch) -> None:
    from cifar_lab import builders

    build = builders.build_callbacks
    monkeypatch.setattr(builders, "build_callbacks", lambda cfg: [*build(cfg), DoubleCtrlC(6)])
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(compose_cfg(BASE, run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert str(stopped.value) == (f"training aborted by a second Ctrl-C, without saving; "
                                  f"the last good checkpoint is {last}")
    assert stopped.value.exit_code == 130
    assert torch.load(last, weights_only=True)["global_step"] == 4  # written when epoch 0 was complete
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_a_resumed_segment_stopped_before_its_results_is_finished_not_refused(tmp_path: Path) -> None:
    """A resume (epochs 2-3) killed after its training, before its own metrics.json: the first segment's
    metrics.json is still there, and must not make the run look finished."""
    run_dir = tmp_path / "run"
    first = [*BASE, "trainer.max_epochs=1", "test=false"]
    train(compose_cfg(first, run_dir))
    earlier = (run_dir / "metrics.json").read_text()
    train(compose_cfg([*BASE, "trainer.max_epochs=3", "ckpt_path=last"], run_dir))
    finished = _summary(run_dir)
    (run_dir / "metrics.json").write_text(earlier)  # the state a kill after the training leaves
    train(compose_cfg([*BASE, "trainer.max_epochs=3", "ckpt_path=last"], run_dir))
    again = _summary(run_dir)
    assert again["global_step"] == finished["global_step"]
    assert {k: v for k, v in again["metrics"].items() if k.startswith("test/")} == \
        {k: v for k, v in finished["metrics"].items() if k.startswith("test/")}
    assert again["metrics"]["val/acc_best"] == finished["metrics"]["val/acc_best"]
    # once its results are written, the same resume is refused as finished
    with pytest.raises(ConfigError, match="is a finished run"):
        train(compose_cfg([*BASE, "trainer.max_epochs=3", "ckpt_path=last"], run_dir))
