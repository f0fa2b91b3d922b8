"""evaluate, predict and export on the directory of one job of a sweep: an Optuna trial and a grid job.

The network comes from the checkpoint alone, with the job's own recorded choices, whatever sweep
made it (the trial's sampled filters, the grid job's model), as for any run directory.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SYNTH, run_cli

pytestmark = pytest.mark.slow  # two tiny sweeps, then three commands on a job of each

TINY = [*SYNTH, "data.source.train_size=300", "data.source.test_size=40", "data.val_size=40",  # >= the largest batch searched
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The directory of job 0 of an Optuna study (1 trial) and of a grid sweep (2 jobs)."""
    tmp = tmp_path_factory.mktemp("sweeps")
    grid = tmp / "grid"
    proc = run_cli(["-m", *[o for o in TINY if not o.startswith("model=")], "model=simple_cnn,simple_cnn_bn",
                    f"hydra.sweep.dir={grid}"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["hparams_search=optuna", *[o for o in TINY if not o.startswith("model=")],
                    "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=tiny"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial = tmp / "logs" / "optuna_simple_cnn" / "multiruns" / "tiny" / "0"
    for job in (grid / "1", trial):
        assert json.loads((job / "metrics.json").read_text()).get("status", "ok") == "ok"
    return {"grid": grid / "1", "optuna": trial}


def _inputs(tmp_path: Path) -> Path:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    return tmp_path / "images.npy"


KINDS = ["grid", "optuna"]


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_a_sweep_job(jobs: dict[str, Path], kind: str, tmp_path: Path) -> None:
    job = jobs[kind]
    proc = run_cli([f"ckpt_path={job}", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path, script="cifar_lab.evaluate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = json.loads((job / "metrics.json").read_text())["metrics"]["test/acc"]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["test/acc"]
    assert evaluated == pytest.approx(recorded, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_with_a_sweep_job(jobs: dict[str, Path], kind: str, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    proc = run_cli([f"ckpt_path={jobs[kind]}", f"input={_inputs(tmp_path)}", f"output={out}",
                    f"hydra.run.dir={tmp_path / 'predict'}"], tmp_path, script="cifar_lab.predict")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and {r["label"] for r in rows} <= {f"class_{i}" for i in range(10)}


@pytest.mark.parametrize("kind", KINDS)
def test_export_a_sweep_job(jobs: dict[str, Path], kind: str, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    proc = run_cli([f"ckpt_path={jobs[kind]}", "format=torchscript", f"output={out}",
                    f"hydra.run.dir={tmp_path / 'export'}"], tmp_path, script="cifar_lab.export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(Path(f"{out}.parity.json").read_text())["passed"]
