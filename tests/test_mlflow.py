"""logger=mlflow: a real run recorded in a local MLflow store, read back through the MLflow client."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient

from cifar_lab import builders
from cifar_lab.cli.train import train
from conftest import FIGURES, SYNTH, compose_cfg

TINY = [*SYNTH, *FIGURES, "logger=mlflow", "trainer.max_epochs=1", "data.source.train_size=200", "data.source.test_size=50",
        "data.val_size=50", "model.filters=[8,16]", "model.fc_units=32", "trainer.enable_progress_bar=false"]


def only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_training_run_is_recorded_in_the_local_store(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run_dir = logs / "train" / "runs" / "r1"
    cfg = compose_cfg([*TINY, f"paths.log_dir={logs}"], run_dir)
    # the default store: an SQLite file and an artifact folder under the logs root
    tracking_uri = f"sqlite:///{logs}/mlflow.db"
    assert cfg.logger.mlflow.tracking_uri == tracking_uri
    assert train(cfg) is not None

    client = MlflowClient(tracking_uri)
    run = only_run(client, "train")  # experiment = task_name
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_dir.name == "r1"
    assert run.data.tags["run_dir"] == str(run_dir)

    # metrics under the names the other loggers use, one val/acc per epoch
    metrics = run.data.metrics
    for name in ("val/acc", "val/loss", "test/acc", "test/loss", "test/ece", "train/loss"):
        assert name in metrics, sorted(metrics)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert len(steps) == 1  # one per epoch
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert any(name.startswith("test_per_class/f1/") for name in metrics)

    # the flattened run config as params
    params = run.data.params
    assert params["optimizer/lr"] == str(cfg.optimizer.lr)
    assert params["model/_target_"] == cfg.model._target_
    assert params["trainer/max_epochs"] == "1"
    assert params["seed"] == str(cfg.seed)

    # the report files as artifacts, stored under the logs root, identical to the run directory's
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "curves.png", "misclassified.png", "classification_report.txt"} <= artifacts
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(logs / "mlartifacts")
    local = client.download_artifacts(run.info.run_id, "confusion_matrix.png", str(tmp_path / "download"))
    assert Path(local).read_bytes() == (run_dir / "confusion_matrix.png").read_bytes()
    assert (run_dir / "metrics.json").is_file()  # the run directory is as with any other logger


@pytest.mark.slow
def test_tracking_uri_by_option(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/team.db"
    cfg = compose_cfg(["logger=mlflow", "task_name=lab", f"logger.mlflow.tracking_uri={uri}",
                       f"logger.mlflow.artifact_location={tmp_path}/team_artifacts"], tmp_path / "run")
    (logger,) = builders.build_loggers(cfg)
    assert isinstance(logger, MLFlowLogger)
    logger.log_hyperparams({"optimizer/lr": 0.5})
    logger.log_metrics({"val/acc": 0.25}, step=1)
    logger.finalize("success")

    run = only_run(MlflowClient(uri), "lab")
    assert run.info.run_id == logger.run_id
    assert run.data.metrics == {"val/acc": 0.25} and run.data.params == {"optimizer/lr": "0.5"}
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "team_artifacts")
