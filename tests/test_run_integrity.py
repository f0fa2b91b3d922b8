"""Run directories are never damaged: refused commands leave them as they were, one writer at a
time, finished runs are not resumed, moved runs use their own files, a full disk is one message."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_lab import checkpoints, fileio
from cifar_lab.cli import evaluate
from cifar_lab.cli.train import train
from cifar_lab.errors import CheckpointError, ConfigError
from cifar_lab.runs.directory import DiskFull, RunDirBusy, RunDirLock
from conftest import SYNTH, compose_cfg, run_cli

QUICK = [*SYNTH, "data.source.train_size=200", "data.source.test_size=50", "data.val_size=50",
         "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=csv"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run made by the command line, as a user has it."""
    tmp = tmp_path_factory.mktemp("finished")
    run_dir = tmp / "run"
    proc = run_cli([*QUICK, f"hydra.run.dir={run_dir}"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_refused_resume_leaves_the_run_directory_byte_identical(finished_run: Path, tmp_path: Path) -> None:
    before = _snapshot(finished_run)
    assert ".hydra/overrides.yaml" in before and "metrics.json" in before
    # the README's resume command typed without the run's overrides: another model, refused
    proc = run_cli([f"hydra.run.dir={finished_run}", "ckpt_path=last"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot resume from" in proc.stderr and "Traceback" not in proc.stderr
    # a resume of the finished run with its own overrides: refused, nothing rewritten
    proc = run_cli([*QUICK, f"hydra.run.dir={finished_run}", "ckpt_path=last"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is a finished run: it trained 1 epochs" in proc.stderr and "trainer.max_epochs=" in proc.stderr
    assert "init_from=" in proc.stderr
    assert _snapshot(finished_run) == before
    # and the run still evaluates with its own config afterwards
    summary = evaluate.run([f"ckpt_path={finished_run}"], tmp_path / "eval")
    recorded = json.loads((finished_run / "metrics.json").read_text())
    assert summary["metrics"]["test/acc"] == pytest.approx(recorded["metrics"]["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_finished_run_is_not_resumed_and_init_from_starts_a_new_one(finished_run: Path, tmp_path: Path) -> None:
    before = _snapshot(finished_run)
    with pytest.raises(CheckpointError, match="is a finished run"):
        train(compose_cfg([*QUICK, f"ckpt_path={finished_run}"], tmp_path / "again"))
    with pytest.raises(ConfigError, match="exclude each other"):
        train(compose_cfg([*QUICK, f"ckpt_path={finished_run}", f"init_from={finished_run}"], tmp_path / "x"))
    # fine-tuning: the new run starts from the finished run's best weights, in its own directory
    best = checkpoints.resolve(finished_run, "use")
    weights = {k: v for k, v in checkpoints.load(best)["state_dict"].items() if k.startswith("net.")}
    # one step at a vanishing learning rate: the saved weights are the initial ones
    cfg = compose_cfg([*QUICK, f"init_from={finished_run}", "+trainer.limit_train_batches=1", "optimizer.lr=1e-12",
                       "test=false"], tmp_path / "tuned")
    train(cfg)
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in weights.items():
        torch.testing.assert_close(tuned[key], value)
    assert _snapshot(finished_run) == before
    with pytest.raises(CheckpointError, match="its network differs"):
        train(compose_cfg([*QUICK, "model=simple_cnn_bn", f"init_from={finished_run}"], tmp_path / "other"))


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir).acquire()
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by process {os.getpid()}"):
            train(compose_cfg(QUICK, run_dir))
        assert not (run_dir / "metrics.json").exists() and not (run_dir / ".hydra").exists()
    finally:
        lock.release()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = ("import signal, sys; from pathlib import Path; from cifar_lab.runs.directory import RunDirLock; "
            f"RunDirLock(Path({str(run_dir)!r})).acquire(); print('locked', flush=True); signal.pause()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"process {holder.pid}"):
            RunDirLock(run_dir).acquire()
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: no cleanup runs
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    lock = RunDirLock(run_dir).acquire()  # the dead holder's lock went with it
    assert list(run_dir.iterdir()) == []  # taking the lock writes nothing
    lock.release()


@pytest.mark.slow
def test_a_moved_run_uses_its_own_best_checkpoint(finished_run: Path, tmp_path: Path) -> None:
    recorded = json.loads((finished_run / "metrics.json").read_text())
    assert recorded["best_ckpt"].startswith("checkpoints/")  # relative to the run directory
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished_run, moved)
    best = checkpoints.resolve(moved, "use")
    assert best == moved / recorded["best_ckpt"]
    # metrics.json written by older versions held absolute paths into the original directory
    old_style = dict(recorded, best_ckpt=str(finished_run / recorded["best_ckpt"]))
    (moved / "metrics.json").write_text(json.dumps(old_style))
    assert checkpoints.resolve(moved, "use") == moved / recorded["best_ckpt"]
    summary = evaluate.run([f"ckpt_path={moved}"], tmp_path / "eval")
    assert summary["ckpt_path"] == str(moved / recorded["best_ckpt"])


def test_disk_full_while_checkpointing_is_one_message(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) >= 2:  # the first checkpoint is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(fileio.torch, "save", save)
    with pytest.raises(DiskFull) as err:
        train(compose_cfg([*QUICK, "trainer.max_epochs=3"], run_dir))
    message = str(err.value)
    assert message.startswith("no space left on the device while writing ") and "MiB free" in message
    assert "the last good checkpoint is" in message and "ckpt_path=last" in message
    assert not list(run_dir.rglob("*.tmp"))  # no partial file left


def test_predict_output_is_checked_before_any_work(tmp_path: Path) -> None:
    from cifar_lab.cli.predict import predict
    from cifar_lab.errors import InputError

    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="is a directory; give a file name"):
        predict(tmp_path / "missing.ckpt", tmp_path / "images", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        predict(tmp_path / "missing.ckpt", tmp_path / "images", tmp_path / "file" / "p.csv")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_trainer_without_a_gpu_is_one_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu: no CUDA GPU is visible .* trainer=cpu"):
        train(compose_cfg([*QUICK, "trainer=gpu"], tmp_path / "run"))


@pytest.mark.slow
def test_a_sweep_whose_jobs_all_fail_exits_non_zero(tmp_path: Path) -> None:
    proc = run_cli(["-m", *QUICK, "optimizer.lr=-1,-2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Sweep finished: 2 jobs, 0 ok, 2 failed" in proc.stdout
    assert "Error: all 2 jobs of the sweep failed" in proc.stderr


@pytest.mark.slow
def test_a_broken_user_config_is_one_message(tmp_path: Path) -> None:
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrainer:\n  max_epochs: 3\n   bad: [1, 2\n")
    proc = run_cli(["--config-dir", str(tmp_path / "conf"), "experiment=mine", f"hydra.run.dir={tmp_path / 'run'}"],
                   tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert lines == [f'Error: a config file is not valid YAML: mapping values are not allowed here in '
                     f'"{tmp_path / "conf" / "experiment" / "mine.yaml"}", line 4, column 7; fix the file at that line']
    proc = run_cli(["model=nosuch", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Could not find 'model/nosuch' Available options in 'model': attention_net, conv_block_net" in proc.stderr


@pytest.mark.slow
def test_evaluate_never_writes_into_a_training_run(finished_run: Path, tmp_path: Path) -> None:
    before = _snapshot(finished_run)
    with pytest.raises(ConfigError, match="holds a training run; evaluate writes its own metrics.json"):
        evaluate.run([f"ckpt_path={finished_run}"], finished_run)
    assert _snapshot(finished_run) == before
