"""compare groups the folds of a k-fold cross-validation: hand-made runs and a real synthetic sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cifar_lab.cli import compare
from conftest import SYNTH, run_cli


def write_fold_run(run_dir: Path, fold: int, val_best: float, folds: int = 3, seed: int = 0,
                   lr: float = 0.01) -> Path:
    """A run directory as a fold job of ``python train.py -m data.folds=K data.fold=...`` writes it."""
    run_dir.mkdir(parents=True)
    summary = {"model": "simple_cnn", "seed": seed, "metrics": {"val/acc_best": val_best}, "wall_time_s": 10.0}
    (run_dir / "metrics.json").write_text(json.dumps(summary))
    config = {"seed": seed, "paths": {"output_dir": str(run_dir)},
              "optimizer": {"_target_": "torch.optim.SGD", "lr": lr},
              "data": {"folds": folds, "fold": fold, "seed": seed, "val_size": 500},
              "logger": {"tensorboard": {"save_dir": str(run_dir)}}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_runs_differing_only_by_fold_are_one_group(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "cv"
    for i, acc in enumerate((0.60, 0.62, 0.64)):
        write_fold_run(sweep / str(i), fold=i, val_best=acc)
    write_fold_run(sweep / "3", fold=0, val_best=0.1, lr=0.5)  # another config: not in the group
    write_fold_run(sweep / "4", fold=1, val_best=0.2, seed=1)  # another seed cuts other folds
    write_fold_run(sweep / "5", fold=2, val_best=0.3, seed=1)

    runs = compare.collect([sweep])
    groups = compare.seed_stats.group_by_fold(runs)
    by_values = {tuple(g.values): g for g in groups}
    assert set(by_values) == {(0, 1, 2), (1, 2)}
    group = by_values[(0, 1, 2)]
    assert group.runs == ["cv/0", "cv/1", "cv/2"] and group.factor == "fold"
    acc = group.stats["val/acc_best"]
    # by hand: mean 0.62, sample std 0.02, t(0.975, 2) = 4.303 -> half width 4.303 * 0.02 / sqrt(3) = 0.049687
    assert (acc["n"], acc["mean"], acc["std"]) == (3, pytest.approx(0.62), pytest.approx(0.02))
    assert (acc["low"], acc["high"]) == (pytest.approx(0.570313, abs=1e-6), pytest.approx(0.669687, abs=1e-6))
    # over seeds, a fold is compared with the same fold of another seed, never with another fold
    seed_groups = compare.seed_stats.group_by_seed(runs)
    assert sorted(g.runs for g in seed_groups) == [["cv/1", "cv/4"], ["cv/2", "cv/5"]]

    assert compare.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "## Over folds" in out and "simple_cnn (3 folds): folds 0, 1, 2" in out
    assert "| val/acc_best | 3 | 62.00% | 2.00% | 57.03% - 66.97% |" in out


def test_runs_without_folds_are_never_fold_groups(tmp_path: Path) -> None:
    for i in range(2):
        run = write_fold_run(tmp_path / str(i), fold=i, val_best=0.5)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"]["folds"] = 0
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert compare.seed_stats.group_by_fold(compare.collect([tmp_path])) == []


@pytest.mark.slow
def test_a_three_fold_sweep_is_grouped(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    fast = [o for o in SYNTH if not o.startswith("callbacks.")]
    proc = run_cli(["-m", *fast, "callbacks=none", "debug=fast_dev_run", "logger=none", "data.folds=3",
                    "data.fold=0,1,2", f"hydra.sweep.dir={sweep}",
                    "hydra.callbacks.sweep_report.print_best_config=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation fold 2 of 3" in proc.stdout
    groups = compare.seed_stats.group_by_fold(compare.collect([sweep]))
    assert len(groups) == 1 and sorted(groups[0].values) == [0, 1, 2]
    assert groups[0].stats["val/acc"]["n"] == 3
    out = run_cli([str(sweep)], tmp_path, script="cifar_lab.compare")
    assert out.returncode == 0 and "## Over folds" in out.stdout
