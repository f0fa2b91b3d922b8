"""Faults a long run meets: a diverging loss, crashes while saving, concurrent runs, DDP, failing
sweep jobs, refused saved configs, and damaged or incomplete data."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from cifar_lab.callbacks import safety
from cifar_lab.callbacks.safety import AtomicCheckpointIO, NonFiniteLossError, use_atomic_checkpoints
from cifar_lab.fileio import atomic_torch_save
from cifar_lab.data import archive as archive_mod
from cifar_lab.data.archive import CifarArchive
from cifar_lab.data.image_folder import ImageFolderSource
from cifar_lab.data.splits import DataError
from cifar_lab.module import ClassifierModule
from cifar_lab.config.schema import ConfigError
from cifar_lab.config.trust import UnsafeConfigError, check_targets
from cifar_lab.cli.train import train
from conftest import ROOT, SYNTH, compose_cfg, run_cli, write_cifar_batches

# 4 training batches per epoch of a small CNN: a few seconds per run.
TINY = [*SYNTH, "model.filters=[8,16]", "model.fc_units=32", "logger=none", "callbacks.report=null",
        "trainer.enable_progress_bar=false", "trainer.max_epochs=2", "+trainer.limit_train_batches=4",
        "+trainer.limit_val_batches=2", "test=false"]


def _finite(state_dict: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state_dict.values() if t.is_floating_point())


# ----------------------------------------------------------------------------- non-finite loss
def test_nan_loss_stops_with_step_and_causes_keeping_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    step = ClassifierModule.training_step

    def nan_at_step_5(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 5 else loss

    monkeypatch.setattr(ClassifierModule, "training_step", nan_at_step_5)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(compose_cfg(TINY, run_dir))
    message = str(err.value)
    last = run_dir / "checkpoints" / "last.ckpt"
    # read at the epoch's last batch (batch 3, 4 batches an epoch), before its validation and checkpoints
    assert message.splitlines()[0] == ("training loss is nan at epoch 1, batch 1 (global step 5); "
                                       "training stopped at global step 8; no checkpoint was written after it.")
    assert "a learning rate too high for this model (now 0.0005: lower optimizer.lr" in message  # cosine, epoch 1
    assert f"Last good checkpoint: {last}" in message
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and _finite(saved["state_dict"])  # epoch 0's, untouched
    assert not list(last.parent.glob("*.tmp"))


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 3:  # last batch: validation and saving follow
                with torch.no_grad():
                    next(pl_module.net.parameters()).fill_(float("inf"))

    from cifar_lab import builders

    cfg = compose_cfg(TINY, tmp_path / "run")
    original = builders.build_callbacks
    builders.build_callbacks = lambda c: [*original(c), Poison()]
    try:
        with pytest.raises(NonFiniteLossError, match=r"^the weights are not finite \(net\.") as err:
            train(cfg)
    finally:
        builders.build_callbacks = original
    assert "the checkpoint was not written, so the last good one is kept" in str(err.value)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and _finite(saved["state_dict"])


def test_weight_check_ignores_metric_states(tmp_path: Path) -> None:
    module = L.LightningModule()
    module.layer = torch.nn.Linear(2, 2)
    guard = safety.NonFiniteLossGuard(tmp_path)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    state = {"layer.weight": torch.ones(2, 2), "layer.bias": torch.zeros(2),
             "val_acc_best.max_value": torch.tensor(float("-inf"))}  # a MaxMetric before its first update
    guard.on_save_checkpoint(trainer, module, {"state_dict": state})
    state["layer.bias"] = torch.tensor([0.0, float("nan")])
    with pytest.raises(NonFiniteLossError, match=r"the weights are not finite \(layer.bias\)"):
        guard.on_save_checkpoint(trainer, module, {"state_dict": state})


def test_last_checkpoint_follows_every_epoch_not_only_improvements(tmp_path: Path) -> None:
    # lr 0: val/acc never improves after epoch 0, so Lightning alone would leave last.ckpt at epoch 0
    train(compose_cfg([*TINY, "trainer.max_epochs=3", "optimizer=sgd", "optimizer.lr=1e-12"], tmp_path / "run"))
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 12 and saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 3


@pytest.mark.slow
def test_cli_diverging_run_prints_one_message_and_exits_3(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "optimizer=sgd", "optimizer.lr=1e30", f"hydra.run.dir={run_dir}"], tmp_path,
                   script="cifar_lab.cli.train")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "Error: training loss is nan at epoch 0, batch 1 (global step 1)" in proc.stderr
    assert (run_dir / "error.txt").read_text().startswith("training loss is nan")


# ----------------------------------------------------------------------------- atomic checkpoints
def test_interrupted_checkpoint_write_leaves_previous_file_intact(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    real_save = torch.save

    def crash_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_trainer_writes_checkpoints_atomically(tmp_path: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    assert use_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not use_atomic_checkpoints(trainer)  # already swapped: left alone


# ----------------------------------------------------------------------------- run directories
@pytest.mark.slow
def test_runs_started_together_get_their_own_directories(tmp_path: Path) -> None:
    env = {**os.environ, "CIFAR_LAB_LOGS": str(tmp_path / "logs")}
    # A config error ends each run right after Hydra has created its directory.
    cmd = [sys.executable, "train.py", *SYNTH, "data.batch_size=0"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    for proc in procs:
        proc.wait(timeout=300)
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    # each refused run kept its own message (.hydra/ is written only once a run is accepted)
    assert all((run / "error.txt").read_text().startswith("invalid config: data.batch_size=0") for run in runs)


@pytest.mark.slow
def test_ddp_run_writes_one_run_directory_and_logs_once(tmp_path: Path) -> None:
    proc = run_cli([*SYNTH, "trainer=ddp_cpu", "trainer.max_epochs=1", "logger=csv", "+trainer.limit_train_batches=2",
                    "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
                    "trainer.enable_progress_bar=false",
                    "model.filters=[8,16]", "model.fc_units=32"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    everything = sorted(p.relative_to(tmp_path / "logs") for p in (tmp_path / "logs").glob("*/*/*"))
    assert len(everything) == 1, everything  # logs/train/runs/<one run>
    run_dir = tmp_path / "logs" / everything[0]
    assert proc.stdout.count("Run directory:") == 1
    for name in ("metrics.json", "config.yaml", "classification_report.txt", "confusion_matrix.png", "curves.png"):
        found = [p for p in (tmp_path / "logs").rglob(name) if ".hydra" not in p.parts]
        assert found == [run_dir / name], (name, found)
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("train / 200 val / 200 test images") == 1, log_text
    assert "[rank: 1]" not in proc.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["test/acc"] >= 0


# ----------------------------------------------------------------------------- sweeps
@pytest.mark.slow
def test_multirun_with_one_failing_job_completes(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    fast = [o for o in SYNTH if not o.startswith("callbacks.")]
    proc = run_cli(["-m", *fast, "callbacks=none", "logger=none", "debug=fast_dev_run", "data.batch_size=32,0",
                    f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        overrides = list(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        records["data.batch_size=0" in overrides] = json.loads((job / "metrics.json").read_text())
    assert records[True]["status"] == "failed"
    assert "data.batch_size=0: must be an integer >= 1" in records[True]["error"]
    assert records[False]["status"] == "ok" and records[False]["metrics"]["test/acc"] >= 0


# ----------------------------------------------------------------------------- saved configs
def test_check_targets_refuses_code_outside_the_allowed_packages(monkeypatch) -> None:
    ok = OmegaConf.to_container(compose_cfg([*SYNTH, "experiment=resnet_se"], Path("/tmp/unused")), resolve=True)
    check_targets(ok)  # every stock target is allowed
    monkeypatch.delenv("CIFAR_LAB_TRUSTED_PACKAGES", raising=False)
    cases = {
        "os.system": "it is not on the allow-list",
        "torch.os.makedirs": "it is not on the allow-list",  # refused by name, before anything is imported
        "torch.hub.load": "it is not on the allow-list",
        "torch._C._jit_pass_inline": "private or malformed names",
        # reached through an admitted module: the object it resolves to decides
        "cifar_lab.data.archive.shutil.rmtree": "it resolves to shutil.rmtree, which is not on the allow-list",
        "cifar_lab.data.archive.tarfile.open": "it resolves to tarfile.TarFile.open, which is not on the allow-list",
        "${oc.env:HOME}": "an interpolated _target_ is not allowed",
    }
    for target, reason in cases.items():
        cfg = {"model": {"_target_": "cifar_lab.models.simple_cnn.SimpleCNN"},
               "callbacks": {"x": {"_target_": "lightning.pytorch.callbacks.LambdaCallback",
                                   "on_fit_start": {"_target_": target, "_args_": ["touch /tmp/pwned"]}}}}
        with pytest.raises(UnsafeConfigError) as err:
            check_targets(cfg, origin="run/config.yaml")
        assert isinstance(err.value, ConfigError)
        message = str(err.value)
        assert message.startswith("refusing to build the config from run/config.yaml")
        assert f"callbacks.x.on_fit_start._target_={target}: {reason}" in message, message


def test_trusted_packages_can_be_named(monkeypatch) -> None:
    cfg = {"model": {"_target_": "conftest.write_image_folder"}}
    with pytest.raises(UnsafeConfigError, match="CIFAR_LAB_TRUSTED_PACKAGES"):
        check_targets(cfg)
    monkeypatch.setenv("CIFAR_LAB_TRUSTED_PACKAGES", "conftest")
    check_targets(cfg)


# ----------------------------------------------------------------------------- data faults
@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing_key", "wrong_dtype"])
def test_damaged_image_cache_is_rebuilt(image_root: Path, damage: str, caplog) -> None:
    first = ImageFolderSource(image_root).load()
    cache = image_root / "cifar_lab_cache_32px.pt"
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:300])
    elif damage == "garbage":
        cache.write_bytes(b"\x00" * 64)
    else:
        payload = torch.load(cache, weights_only=True)
        if damage == "missing_key":
            del payload["test_x"]
        else:
            payload["train_x"] = payload["train_x"].float()
        torch.save(payload, cache)
    with caplog.at_level(logging.WARNING, logger="cifar_lab.data"):
        again = ImageFolderSource(image_root).load()
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    assert "rebuilding it" in caplog.text
    rebuilt = torch.load(cache, weights_only=True)  # a sound cache again
    assert torch.equal(rebuilt["train_x"], first.train_x)


def test_image_folder_class_and_split_faults(image_root: Path) -> None:
    empty = image_root / "train" / "class1"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder .*train/class1 holds no image files \(it is empty\)"):
        ImageFolderSource(image_root, cache=False).prepare()
    (empty / "notes.txt").write_text("todo")
    with pytest.raises(DataError, match="holds no image files; it holds only notes.txt"):
        ImageFolderSource(image_root, cache=False).prepare()
    empty.rename(image_root / "class1_unused")
    (image_root / "test" / "class1").rename(image_root / "test_class1_unused")
    for split in ("train", "test"):  # tool folders are not classes
        (image_root / split / ".ipynb_checkpoints").mkdir()
    assert ImageFolderSource(image_root, cache=False).load().classes == ["class0", "class2"]
    (image_root / "train").rename(image_root / "train_moved")
    with pytest.raises(DataError, match=r"train is missing: data=imagefolder needs both train/ and test/"):
        ImageFolderSource(image_root, cache=False).load()


def test_damaged_batch_file_is_extracted_again_from_its_archive(tmp_path: Path, caplog) -> None:
    folder = write_cifar_batches(tmp_path / "src")
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    CifarArchive(root, download=False).prepare()
    batch = root / "cifar-10-batches-py" / "data_batch_4"
    batch.write_bytes(batch.read_bytes()[:100])  # e.g. a disk filled up while extracting
    with caplog.at_level(logging.WARNING, logger="cifar_lab.data"):
        splits = CifarArchive(root, download=False).load()
    assert len(splits.train_x) == 100 and "extracting" in caplog.text and "data_batch_4" in caplog.text
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # staging folder removed


def test_interrupted_download_leaves_nothing_half_written(tmp_path: Path, monkeypatch) -> None:
    def interrupted(url, root, md5=None, **kwargs):
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b first megabytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(archive_mod, "download_and_extract_archive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        CifarArchive(tmp_path, download=True).prepare()
    assert list(tmp_path.iterdir()) == []  # no partial archive for the next run to trip on

    monkeypatch.setattr(archive_mod, "download_and_extract_archive",
                        lambda url, root, md5=None, **kw: write_cifar_batches(Path(root)))
    assert len(CifarArchive(tmp_path, download=True).load().train_x) == 100
