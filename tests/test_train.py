"""train.py end to end through the real CLI, plus in-process runs for what needs inspection."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cifar_lab.cli.train import train
from conftest import SYNTH, compose_cfg, run_cli, write_cifar_batches


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_cli_fast_dev_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*SYNTH, "debug=fast_dev_run", "print_config=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the short header always; the whole config tree because print_config=true asked for it
    assert f"run directory : {run_dir}" in proc.stdout
    assert "CONFIG" in proc.stdout and f"Run directory: {run_dir}" in proc.stdout
    summary = _metrics(run_dir)
    assert {"test/acc", "test/loss", "val/acc"} <= set(summary["metrics"])
    assert summary["params"] > 0 and summary["wall_time_s"] > 0 and summary["model"] == "simple_cnn"
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_short_run_learns_above_chance(tmp_path: Path) -> None:
    cfg = compose_cfg([*SYNTH, "trainer.max_epochs=3", "optimizer=adam", "scheduler=none",
                       "logger=csv", "trainer.enable_progress_bar=false"], tmp_path / "run")
    value = train(cfg)
    summary = _metrics(tmp_path / "run")
    assert summary["metrics"]["test/acc"] > 0.5, summary  # chance is 0.1
    assert value == summary["metrics"]["val/acc_best"]
    assert not Path(summary["best_ckpt"]).is_absolute()  # relative to the run directory (portable)
    assert (tmp_path / "run" / summary["best_ckpt"]).is_file()
    with (tmp_path / "run" / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss_step", "train/acc_step", "train/loss", "train/acc", "val/acc", "val/acc_best"} <= set(rows[0])
    # every row the logger wrote for a training step carries both the loss and the batch accuracy
    step_rows = [r for r in rows if r["train/loss_step"]]
    assert step_rows and all(0.0 <= float(r["train/acc_step"]) <= 1.0 for r in step_rows)
    assert sum(bool(r["train/loss"]) for r in rows) == 3  # one epoch value per epoch


@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_at_next_epoch(tmp_path: Path) -> None:
    base = [*SYNTH, "logger=none", "trainer.enable_progress_bar=false", "scheduler=cosine"]
    run_dir = tmp_path / "run"
    train(compose_cfg([*base, "trainer.max_epochs=1"], run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0

    resumed_dir = tmp_path / "resumed"
    train(compose_cfg([*base, "trainer.max_epochs=2", f"ckpt_path={run_dir}"], resumed_dir))
    summary = _metrics(resumed_dir)
    assert summary["epochs"] == 2
    ckpt = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1
    steps_per_epoch = torch.load(last, weights_only=False)["global_step"]
    assert ckpt["global_step"] == 2 * steps_per_epoch


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    proc = run_cli([*SYNTH, "trainer=ddp_cpu", "trainer.max_epochs=1", "logger=csv",
                    f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _metrics(run_dir)
    assert summary["metrics"]["test/acc"] >= 0
    # one run directory, written once
    assert proc.stdout.count("Run directory:") == 1
    assert sorted(p.name for p in (tmp_path / "logs").glob("*/runs/*")) == []


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *SYNTH, "debug=fast_dev_run", "optimizer=sgd,adam", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep_dir.glob("*/metrics.json"))
    assert jobs == ["0", "1"]
    optimizers = {json.loads((sweep_dir / j / "metrics.json").read_text())["choices"]["optimizer"] for j in jobs}
    assert optimizers == {"sgd", "adam"}


@pytest.mark.slow
def test_no_data_stops_before_building_model(tmp_path: Path) -> None:
    proc = run_cli(["model=simple_cnn", f"data.root={tmp_path / 'empty'}", "data.source.download=false",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0
    assert f"no cifar10 data found: looked for {tmp_path / 'empty'}" in proc.stderr
    assert "data=synthetic" in proc.stderr
    assert "Traceback" not in proc.stderr.split("no cifar10 data found")[1][:2000]


@pytest.mark.slow
def test_corrupted_batch_file_stops_with_its_name(tmp_path: Path) -> None:
    folder = write_cifar_batches(tmp_path / "cifar")
    (folder / "data_batch_2").write_bytes(b"garbage")
    proc = run_cli(["model=simple_cnn", "debug=fast_dev_run", f"data.root={tmp_path / 'cifar'}",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0 and "data_batch_2" in proc.stderr


@pytest.mark.slow
def test_unknown_option_lists_available(tmp_path: Path) -> None:
    proc = run_cli(["model=nope"], tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'model/nope'" in proc.stderr and "simple_cnn" in proc.stderr


@pytest.mark.slow
def test_cifar_archive_run_end_to_end(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path / "cifar", per_batch=40, test=40)
    cfg = compose_cfg(["model=simple_cnn", f"data.root={tmp_path / 'cifar'}", "data.val_size=20",
                       "trainer=cpu", "debug=limit", "logger=none", "trainer.enable_progress_bar=false",
                       "callbacks.progress_bar=null"], tmp_path / "run")
    train(cfg)
    summary = _metrics(tmp_path / "run")
    assert summary["epochs"] == 2 and 0 <= summary["metrics"]["test/acc"] <= 1
