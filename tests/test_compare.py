"""compare: finds metrics.json under run and sweep directories, tabulates and plots them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_lab.cli import compare
from conftest import ROOT, run_command

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, model: str, params: int, optimizer: str, lr: float, batch_size: int,
              val_best: float | None, test_acc: float | None, wall: float, epochs: int = 3,
              **extra) -> Path:
    """A run directory as training writes it; ``extra`` keys are added to its metrics.json."""
    run_dir.mkdir(parents=True)
    metrics = {"val/acc": val_best or 0.0}
    if val_best is not None:
        metrics["val/acc_best"] = val_best
    if test_acc is not None:
        metrics["test/acc"] = test_acc
    summary = {"run_dir": str(run_dir), "model": model, "choices": {"model": model, "optimizer": optimizer,
                                                                    "scheduler": "cosine"},
               "params": params, "epochs": epochs, "metrics": metrics, "wall_time_s": wall, **extra}
    (run_dir / "metrics.json").write_text(json.dumps(summary))
    config = {"optimizer": {"_target_": f"torch.optim.{optimizer.upper()}", "lr": lr},
              "data": {"batch_size": batch_size}, "model": {"_target_": f"x.{model}"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    single = write_run(tmp_path / "runs" / "a", "simple_cnn", 2_122_186, "sgd", 0.05, 128, 0.71, 0.70, 95.0)
    sweep = tmp_path / "multiruns" / "sweep"
    write_run(sweep / "0", "resnet_se", 11_200_000, "adamw", 0.001, 256, 0.90, 0.895, 3725.0, epochs=30)
    write_run(sweep / "1", "squeezenet", 730_000, "adam", 0.003, 64, 0.80, None, 610.0)
    (sweep / "multirun.yaml").write_text("{}")
    return single, sweep


def test_table_and_plot_for_a_run_and_a_sweep(runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    single, sweep = runs
    out, plot = tmp_path / "report" / "compare.md", tmp_path / "report" / "compare.png"
    assert compare.main([str(single), str(sweep), "--out", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "model", "params", "optimizer", "lr", "batch size", "scheduler", "epochs",
                      "best val acc", "test acc", "wall time", "data (train/val/test)"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # best test accuracy first; the run without a test accuracy last
    assert rows[0] == ["sweep/0", "resnet_se", "11.20M", "adamw", "0.001", "256", "cosine", "30", "90.00%",
                       "89.50%", "1h02m05s", "-"]
    assert rows[1] == ["a", "simple_cnn", "2.12M", "sgd", "0.05", "128", "cosine", "3", "71.00%", "70.00%", "1m35s", "-"]
    assert rows[2][:2] == ["sweep/1", "squeezenet"] and rows[2][9] == "-" and rows[2][2] == "730.00k"
    text = out.read_text()
    assert text.startswith("# Run comparison") and "\n".join(lines) in text
    assert plot.read_bytes()[:8] == PNG
    assert f"Wrote {plot}" in printed


def test_search_from_a_parent_folder_and_sorting(runs: tuple[Path, Path], tmp_path: Path) -> None:
    found = compare.collect([tmp_path])
    assert sorted(r.model for r in found) == ["resnet_se", "simple_cnn", "squeezenet"]
    by_time = compare.sort_runs(found, "wall_time_s")
    assert [r.model for r in by_time] == ["resnet_se", "squeezenet", "simple_cnn"]
    assert compare.markdown_table(by_time).count("\n") == 5


def test_bad_metrics_file_is_skipped(runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    broken = tmp_path / "runs" / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    found = compare.collect([tmp_path / "runs"])
    assert [r.model for r in found] == ["simple_cnn"]
    assert "skipping" in capsys.readouterr().err


def test_nothing_to_compare(tmp_path: Path, capsys) -> None:
    assert compare.main([str(tmp_path)]) == 2
    assert "no readable metrics.json" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_cli(runs: tuple[Path, Path], tmp_path: Path) -> None:
    single, sweep = runs
    proc = run_command([sys.executable, "-m", "cifar_lab.compare", str(single), str(sweep), "--plot",
                           str(tmp_path / "c.png")], cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resnet_se" in proc.stdout and (tmp_path / "c.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- resumed and failed runs
def _rows(text: str) -> dict[str, list[str]]:
    """The table's data rows by run label."""
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {row[0]: row for row in rows}


def test_resumed_run_shows_its_total_wall_time(tmp_path: Path, capsys) -> None:
    ckpt = str(tmp_path / "runs" / "a" / "checkpoints" / "last.ckpt")
    write_run(tmp_path / "runs" / "a", "simple_cnn", 2_122_186, "sgd", 0.05, 128, 0.71, 0.70, 95.0)
    # resumed in its own run directory: 5 minutes now, 7m03s before the interruption
    write_run(tmp_path / "runs" / "b", "simple_cnn", 2_122_186, "sgd", 0.05, 128, 0.72, 0.71, 300.0,
              resumed_from=ckpt, wall_time_total_s=723.0)
    # written before totals were recorded: only this segment's time is known
    write_run(tmp_path / "runs" / "c", "simple_cnn", 2_122_186, "sgd", 0.05, 128, 0.69, 0.68, 60.0,
              resumed_from=ckpt)
    # a new run's total equals its own time and is shown without a mark
    write_run(tmp_path / "runs" / "d", "simple_cnn", 2_122_186, "sgd", 0.05, 128, 0.60, 0.59, 30.0,
              resumed_from=None, wall_time_total_s=30.0)

    assert compare.main([str(tmp_path / "runs")]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["runs/b"][10] == "12m03s (resumed)"
    assert rows["runs/c"][10] == "1m00s (resumed, last part)"
    assert rows["runs/a"][10] == "1m35s" and rows["runs/d"][10] == "30s"

    found = compare.collect([tmp_path / "runs"])
    resumed = next(r for r in found if r.run == "runs/b")
    assert resumed.resumed and resumed.wall_time_s == 723.0
    # sorting and the plot use the total
    assert [r.run for r in compare.sort_runs(found, "wall_time_s")] == ["runs/b", "runs/a", "runs/c", "runs/d"]


def test_failed_sweep_jobs_show_failed(runs: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    single, sweep = runs
    # a job that raised before training wrote anything: sweep.py's record and Hydra's config only
    crashed = sweep / "2"
    (crashed / ".hydra").mkdir(parents=True)
    (crashed / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"optimizer": {"_target_": "torch.optim.SGD", "lr": 0.5}, "data": {"batch_size": 32},
         "model": {"_target_": "x.simple_cnn"}}))
    (crashed / "metrics.json").write_text(json.dumps({
        "status": "failed", "objective": {"name": "val/acc_best", "value": None},
        "error": "DataError: no CIFAR-10 data in /data\nsecond line of the message"}))
    # a diverged job: training finished and logged accuracies, then the sweep marked it failed
    write_run(sweep / "3", "resnet_se", 11_200_000, "sgd", 10.0, 128, 0.10, 0.99, 50.0,
              status="failed", objective={"name": "val/acc_best", "value": None},
              error="non-finite result: train/loss=nan")

    out, plot = tmp_path / "report" / "compare.md", tmp_path / "report" / "compare.png"
    assert compare.main([str(single), str(sweep), "--out", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    rows = _rows(printed)
    assert len(rows) == 5
    crashed_row, diverged_row = rows["sweep/2"], rows["sweep/3"]
    assert crashed_row[1] == "simple_cnn" and crashed_row[3] == "SGD" and crashed_row[4] == "0.5"
    assert crashed_row[8:10] == ["failed", "failed"] and crashed_row[10] == "-"
    assert diverged_row[8:10] == ["failed", "failed"] and diverged_row[10] == "50s"
    # failed runs sort after every run with an accuracy
    labels = [line.strip("|").split("|")[0].strip() for line in printed.splitlines() if line.startswith("|")][2:]
    assert labels[:2] == ["sweep/0", "a"] and set(labels[3:]) == {"sweep/2", "sweep/3"}
    # each failure's first error line under the table, in the printed and the written report
    assert "- sweep/2 failed: DataError: no CIFAR-10 data in /data" in printed
    assert "- sweep/3 failed: non-finite result: train/loss=nan" in printed
    assert "second line" not in printed
    text = out.read_text()
    assert "5 runs (2 failed)" in text
    assert "- sweep/2 failed: DataError" in text
    assert plot.read_bytes()[:8] == PNG

    # the plot leaves failed runs out (the diverged one would be its best point)
    plotted = []

    def scatter(self, x, y, *args, **kwargs):
        plotted.append((x[0], y[0]))

    from matplotlib.axes import Axes

    monkeypatch.setattr(Axes, "scatter", scatter)
    compare.plot_runs(compare.collect([sweep]), tmp_path / "p.png")
    assert plotted and all(y < 99 for _, y in plotted)


def test_sorting_by_other_columns_keeps_failed_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "s" / "0", "simple_cnn", 1000, "sgd", 0.1, 64, 0.5, 0.5, 10.0)
    write_run(tmp_path / "s" / "1", "resnet_se", 2000, "sgd", 0.1, 64, 0.9, 0.9, 20.0,
              status="failed", error="boom")
    found = compare.collect([tmp_path / "s"])
    assert [r.model for r in compare.sort_runs(found, "test_acc")] == ["simple_cnn", "resnet_se"]
    assert [r.model for r in compare.sort_runs(found, "params")] == ["resnet_se", "simple_cnn"]
    table = compare.markdown_table(found)
    assert _rows(table)["s/1"][8:10] == ["failed", "failed"]
    assert table.rstrip().endswith("- s/1 failed: boom")


# ----------------------------------------------------------------------------- elapsed training time
def test_module_checkpoints_carry_elapsed_training_time(monkeypatch) -> None:
    from functools import partial
    from types import SimpleNamespace

    import torch
    from torch import nn

    import cifar_lab.module as module_mod

    def make() -> module_mod.ClassifierModule:
        net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
        return module_mod.ClassifierModule(net, partial(torch.optim.SGD, lr=0.1), memory_format="contiguous")

    clock = [100.0]
    monkeypatch.setattr(module_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    first = make()
    first.on_fit_start()
    clock[0] += 42.5  # training for 42.5 s, then a checkpoint
    checkpoint: dict = {}
    first.on_save_checkpoint(checkpoint)
    assert checkpoint["elapsed_s"] == 42.5

    # resuming (outside a Trainer here) restores it; the next segment adds its own time
    second = make()
    second.on_load_checkpoint(checkpoint)
    assert second.elapsed_s == 42.5
    second.on_fit_start()
    clock[0] += 10.0
    later: dict = {}
    second.on_save_checkpoint(later)
    assert later["elapsed_s"] == 52.5 and second.training_elapsed_s() == 52.5

    # resuming inside a fitting Trainer restores too; loading the best checkpoint to test does not
    fitting = make()
    fitting._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    fitting.on_load_checkpoint(later)
    assert fitting.elapsed_s == 52.5
    fitting._trainer = SimpleNamespace(state=SimpleNamespace(fn="test"))
    fitting.on_load_checkpoint(checkpoint)
    assert fitting.elapsed_s == 52.5

    # a checkpoint saved before elapsed time was recorded counts as none
    old = make()
    old.on_load_checkpoint({})
    assert old.elapsed_s == 0.0


# ----------------------------------------------------------------------------- statistics over seeds
def write_seed_run(run_dir: Path, seed: int, test_acc: float, lr: float = 0.05, wall: float = 100.0) -> Path:
    """A run as training writes it: the seed in metrics.json and in the resolved config (data.seed too)."""
    write_run(run_dir, "resnet_se", 4_993_166, "sgd", lr, 128, test_acc + 0.01, test_acc, wall, seed=seed)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config.update(seed=seed, paths={"output_dir": str(run_dir)})
    config["data"].update(seed=seed, source={"seed": 0})
    config["logger"] = {"tensorboard": {"save_dir": str(run_dir)}, "mlflow": {"run_name": run_dir.name}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_runs_differing_only_by_seed_get_mean_std_and_interval(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "multiruns" / "seeds"
    for i, acc in enumerate((0.90, 0.92, 0.94)):
        write_seed_run(sweep / str(i), seed=i, test_acc=acc, wall=100.0 + 10 * i)
    write_seed_run(sweep / "3", seed=3, test_acc=0.50, lr=0.5)  # another learning rate: its own config

    groups = compare.seed_stats.group_by_seed(compare.collect([sweep]))
    assert len(groups) == 1
    group = groups[0]
    assert sorted(group.values) == [0, 1, 2] and group.runs == ["seeds/0", "seeds/1", "seeds/2"]
    acc = group.stats["test/acc"]
    # by hand: mean 0.92, sample std 0.02, t(0.975, 2) = 4.303 -> half width 4.303 * 0.02 / sqrt(3) = 0.049687
    assert acc["n"] == 3
    assert acc["mean"] == pytest.approx(0.92) and acc["std"] == pytest.approx(0.02)
    assert acc["low"] == pytest.approx(0.92 - 0.049687, abs=1e-6)
    assert acc["high"] == pytest.approx(0.92 + 0.049687, abs=1e-6)
    assert group.stats["wall_time_s"]["mean"] == pytest.approx(110.0)

    assert compare.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "## Over seeds" in out and "resnet_se (3 seeds): seeds 0, 1, 2" in out
    assert "| test/acc | 3 | 92.00% | 2.00% | 87.03% - 96.97% |" in out


def test_no_seed_table_without_repeated_seeds(runs: tuple[Path, Path], capsys) -> None:
    single, sweep = runs
    assert compare.main([str(single.parent.parent)]) == 0
    assert "Over seeds" not in capsys.readouterr().out


def test_t_quantiles() -> None:
    assert compare.seed_stats.t_quantile(1) == 12.706 and compare.seed_stats.t_quantile(30) == 2.042
    assert compare.seed_stats.t_quantile(60) == pytest.approx(2.000, abs=1e-3)
    assert compare.seed_stats.t_quantile(1000) == pytest.approx(1.962, abs=1e-3)


# ----------------------------------------------------------------------------- data column, skipped directories
def test_the_data_column_shows_the_source_and_split_sizes(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "runs" / "smoke", "speedrun_net", 1000, "muon_sgd", 0.2, 64, None, 0.4, 60.0,
              data={"source": "synthetic", "splits": {"train": 400, "val": 0, "test": 200}})
    write_run(tmp_path / "runs" / "cifar", "speedrun_net", 1000, "muon_sgd", 0.2, 1024, None, 0.9, 900.0,
              data={"source": "imagefolder", "splits": {"train": 50000, "val": "test", "test": 10000}})
    # an older run without the record: the config's generated sizes (validation on the test set)
    old = write_run(tmp_path / "runs" / "old", "simple_cnn", 1000, "sgd", 0.1, 64, 0.5, 0.5, 10.0)
    (old / "config.yaml").write_text(yaml.safe_dump({"data": {"val_size": 0, "source": {
        "train_size": 300, "test_size": 100}}}))
    summary = json.loads((old / "metrics.json").read_text())
    summary["choices"]["data"] = "synthetic"
    (old / "metrics.json").write_text(json.dumps(summary))
    assert compare.main([str(tmp_path / "runs")]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["runs/smoke"][-1] == "synthetic 400/0/200"
    assert rows["runs/cifar"][-1] == "imagefolder 50000/test/10000"
    assert rows["runs/old"][-1] == "synthetic 300/test/100"


@pytest.mark.slow
def test_directories_without_metrics_are_named_with_the_reason(runs: tuple[Path, Path], tmp_path: Path,
                                                               capsys) -> None:
    stopped = tmp_path / "runs" / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / ".hydra").mkdir()
    refused = tmp_path / "runs" / "refused"
    refused.mkdir()
    (refused / "config.yaml").write_text("{}")
    (refused / "error.txt").write_text("Error: data.root=/nope: no CIFAR-10 here\n")
    running = tmp_path / "runs" / "running"
    (running / ".hydra").mkdir(parents=True)
    from cifar_lab.runs.directory import RunDirLock

    code = ("import signal, sys; from pathlib import Path; from cifar_lab.runs.directory import RunDirLock; "
            "RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); signal.pause()")
    lock_proc = subprocess.Popen([sys.executable, "-c", code, str(running)], stdout=subprocess.PIPE, text=True)
    try:
        assert lock_proc.stdout.readline().strip() == "locked"
        found = compare.collect([tmp_path / "runs"])
    finally:
        lock_proc.kill()
        lock_proc.wait()
    assert [r.run for r in found] == ["runs/a"]
    err = capsys.readouterr().err
    assert "skipped 3 directories without metrics.json:" in err
    assert f"  {stopped}: stopped before the end (checkpoints, no metrics.json); resume it with " \
           f"python train.py hydra.run.dir={stopped} ckpt_path=last" in err
    assert f"  {refused}: stopped with an error: Error: data.root=/nope: no CIFAR-10 here" in err
    assert f"  {running}: still running (its lock is held)" in err
    # a sweep directory above its jobs is not a run: nothing skipped there
    compare.collect([runs[1]])
    assert "skipped" not in capsys.readouterr().err


def test_skipped_directories_are_runs_not_their_parts_or_other_jobs(tmp_path: Path, capsys) -> None:
    """A run's .hydra folder is not a run of its own; a predict or export job's folder is named as not a run."""
    run = tmp_path / "logs" / "train" / "runs" / "stopped"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}")
    (run / "checkpoints").mkdir()
    job = tmp_path / "logs" / "predict" / "runs" / "job"
    job.mkdir(parents=True)
    from cifar_lab.runs.unfinished import skipped_dirs

    found = skipped_dirs([run, job])
    assert set(found) == {run, job}
    assert "stopped before the end" in found[run] and "not a run directory" in found[job]
