"""compare: finds metrics.json under run and sweep directories, tabulates and plots them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_lab.cli import compare
from conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, model: str, params: int, optimizer: str, lr: float, batch_size: int,
              val_best: float | None, test_acc: float | None, wall: float, epochs: int = 3) -> Path:
    run_dir.mkdir(parents=True)
    metrics = {"val/acc": val_best or 0.0}
    if val_best is not None:
        metrics["val/acc_best"] = val_best
    if test_acc is not None:
        metrics["test/acc"] = test_acc
    summary = {"run_dir": str(run_dir), "model": model, "choices": {"model": model, "optimizer": optimizer,
                                                                    "scheduler": "cosine"},
               "params": params, "epochs": epochs, "metrics": metrics, "wall_time_s": wall}
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
                      "best val acc", "test acc", "wall time"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # best test accuracy first; the run without a test accuracy last
    assert rows[0] == ["sweep/0", "resnet_se", "11.20M", "adamw", "0.001", "256", "cosine", "30", "90.00%",
                       "89.50%", "1h02m05s"]
    assert rows[1] == ["a", "simple_cnn", "2.12M", "sgd", "0.05", "128", "cosine", "3", "71.00%", "70.00%", "1m35s"]
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


def test_cli(runs: tuple[Path, Path], tmp_path: Path) -> None:
    single, sweep = runs
    proc = subprocess.run([sys.executable, "-m", "cifar_lab.compare", str(single), str(sweep), "--plot",
                           str(tmp_path / "c.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resnet_se" in proc.stdout and (tmp_path / "c.png").read_bytes()[:8] == PNG
