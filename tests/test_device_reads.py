"""A steady-state training step reads nothing back from the device, for the default run and every experiment.

Each read (``.item()``, ``bool(t)``, ``.cpu()``, ... : tests/device_reads.py) is a host-device
synchronisation on a GPU. The runs here are in-process, on the CPU, at a tiny size; reads are counted
per training step from the 6th step on, and only the steps the loggers write and each epoch's last
step (validation, epoch metrics and checkpoints follow it) may read. A failure names each read's call site.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from cifar_lab import builders
from cifar_lab.callbacks.compute import TrainingCompute
from cifar_lab.callbacks.progress import EpochLines
from cifar_lab.callbacks.safety import safety_callbacks
from cifar_lab.cli.train import train
from conftest import CONF, compose_cfg
from device_reads import DeviceReads, StepWindows

# 60 training images in batches of 4: 15 steps, of which 8 are steady (after the 5 of warm-up, less the
# logging step and the epoch's last), the fewest the check counts (`_check`)
TINY = ["data=synthetic", "data.source.train_size=68", "data.source.test_size=16", "data.val_size=8",
        "trainer=cpu", "trainer.max_epochs=1", "data.batch_size=4",
        "data.eval_batch_size=8", "trainer.precision=32", "module.memory_format=channels_last", "test=false",
        "trainer.log_every_n_steps=8"]

# what an experiment needs to run small (and offline)
SHRINK = {
    "speedrun": ["model.widths=[8,16,16]", "trainer.max_epochs=2", "data.augment.resize.schedule=[[0,16],[1,null]]",
                 "callbacks.whitening.num_images=64"],
    "speedrun_long": ["model.widths=[8,16,16]", "trainer.max_epochs=2",
                      "data.augment.resize.schedule=[[0,16],[1,null]]", "callbacks.whitening.num_images=64"],
    "finetune_pretrained": ["model.pretrained=false"],
    "conv_block_net": ["model.channels=[8,8,8,8,8,8,8,8,8,8]", "model.branches=2"],
    # every epoch mixes (its per-epoch draw, probability 0.9, could leave the tiny run's one epoch unmixed)
    "resnet_se": ["model.depths=[1,1,1,1]", "model.widths=[8,8,8,8]", "model.stem_width=8", "data.mixing.prob=1.0"],
    "pseudo_se_net": ["model.channels=[4,4,4,4]", "model.hidden_units=16"],
    "simple_cnn": ["model.filters=[4,8]", "model.fc_units=16"],
    "simple_cnn_bn": ["model.filters=[4,8]", "model.fc_units=16"],
}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _counted(overrides: list[str], tmp_path: Path, monkeypatch) -> StepWindows:
    reads = DeviceReads()
    windows = StepWindows(reads)
    built = builders.build_callbacks
    monkeypatch.setattr(builders, "build_callbacks", lambda cfg: [windows, *built(cfg)])
    cfg = compose_cfg([*TINY, *overrides], tmp_path / "run")
    with reads:
        train(cfg)
    return windows


def _check(windows: StepWindows) -> None:
    steady = windows.steady("train")
    assert len(steady) >= 8, f"too few steady steps to count ({len(steady)})"
    offending = windows.offending("train")
    assert not offending, "device reads in steady-state training steps:\n" + "\n".join(offending)


def test_module_and_safety_callbacks_read_only_at_logging_steps(tmp_path: Path) -> None:
    """The quick version: the module, the safety callbacks and the per-step ones, on a Trainer of their own."""
    cfg = compose_cfg([*TINY, "model=simple_cnn", "model.filters=[4,8]", "model.fc_units=16"], tmp_path / "run")
    module, datamodule = builders.build_module(cfg), builders.build_datamodule(cfg)
    reads = DeviceReads()
    windows = StepWindows(reads)
    callbacks = [windows, *safety_callbacks(tmp_path / "checkpoints"), TrainingCompute(), EpochLines()]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, log_every_n_steps=8, default_root_dir=tmp_path,
                        callbacks=callbacks, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    with reads:
        trainer.fit(module, datamodule=datamodule)
    _check(windows)
    logging = [w for w in windows.windows if w.stage == "train" and w.logs and w.step >= windows.warmup]
    assert logging and all(any("safety.py" in site for _, site in w.reads) for w in logging), logging


@pytest.mark.slow  # about 15 s: a whole run, reports included, every op through the counter
def test_default_run_reads_nothing_in_a_steady_training_step(tmp_path: Path, monkeypatch) -> None:
    windows = _counted(["model=simple_cnn", "model.filters=[4,8]", "model.fc_units=16", "logger=csv"],
                       tmp_path, monkeypatch)
    _check(windows)
    # the counter sees reads where they are allowed: the loss guard's check at each logging step
    logging = [w for w in windows.windows if w.stage == "train" and w.logs and w.step >= windows.warmup]
    assert logging and all(any("safety.py" in site for _, site in w.reads) for w in logging), logging


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_reads_nothing_in_a_steady_training_step(name: str, tmp_path: Path, monkeypatch) -> None:
    _check(_counted([f"experiment={name}", *SHRINK.get(name, [])], tmp_path, monkeypatch))
