"""tags=[...] and notes="...": in metrics.json, the model card, TensorBoard's hparams, MLflow tags, compare --tag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cifar_lab.cli import compare
from cifar_lab.cli.train import train
from cifar_lab.config.schema import find_problems
from cifar_lab.runs.tags import has_tags, mlflow_tags, tags_of
from conftest import SYNTH, compose_cfg

TINY = [*SYNTH, "trainer.max_epochs=1", "data.source.train_size=200", "data.source.test_size=50",
        "data.val_size=50", "model.filters=[8,16]", "model.fc_units=32", "trainer.enable_progress_bar=false"]


def _tb_hparams(run_dir: Path) -> dict:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.string_value for k, v in start.hparams.items()}


@pytest.mark.slow
def test_tags_and_notes_reach_every_record(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    tagged, other = logs / "train" / "runs" / "tagged", logs / "train" / "runs" / "other"
    train(compose_cfg([*TINY, "logger=tensorboard_mlflow", f"paths.log_dir={logs}", "tags=[baseline,cv]",
                       "notes='first try, lr 0.01'"], tagged))
    train(compose_cfg([*TINY, "logger=none", "tags=[cv]"], other))

    summary = json.loads((tagged / "metrics.json").read_text())
    assert summary["tags"] == ["baseline", "cv"] and summary["notes"] == "first try, lr 0.01"
    card = (tagged / "MODEL_CARD.md").read_text()
    assert "- tags: `baseline`, `cv`" in card and "- notes: first try, lr 0.01" in card

    hparams = _tb_hparams(tagged)
    assert hparams["tags"] == "['baseline', 'cv']" and hparams["notes"] == "first try, lr 0.01"

    client = MlflowClient(f"sqlite:///{logs}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.data.tags["tags"] == "baseline,cv"
    assert run.data.tags["mlflow.note.content"] == "first try, lr 0.01"
    assert client.search_runs([run.info.experiment_id], "tags.tags LIKE '%baseline%'")[0].info.run_id == run.info.run_id

    runs = compare.collect([logs / "train" / "runs"])
    assert {r.run: r.tags for r in runs} == {"runs/tagged": ["baseline", "cv"], "runs/other": ["cv"]}
    assert [r.run for r in compare.filter_tags(runs, ["baseline"])] == ["runs/tagged"]
    assert sorted(r.run for r in compare.filter_tags(runs, ["cv"])) == ["runs/other", "runs/tagged"]
    assert compare.filter_tags(runs, []) == runs


def test_compare_tag_on_the_command_line(tmp_path: Path, capsys) -> None:
    for name, tags in (("a", ["x"]), ("b", ["x", "y"]), ("c", [])):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"model": name, "tags": tags, "metrics": {"test/acc": 0.5}}))
    assert compare.main([str(tmp_path), "--tag", "x", "--tag", "y"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "b"
    assert compare.main([str(tmp_path), "--tag", "nope"]) == 2
    assert "Error: no run is tagged nope among 3 runs" in capsys.readouterr().err


def test_tag_helpers_and_validation() -> None:
    assert tags_of({"tags": ["a", "b", "a"]}) == ["a", "b"] and tags_of({"tags": None}) == []
    assert mlflow_tags({"tags": [], "notes": None}) == {}
    assert has_tags(["a", "b"], ["b"]) and not has_tags(["a"], ["a", "b"])
    base = ["data=synthetic", "model=simple_cnn"]
    assert find_problems(compose_cfg([*base, "tags=[a,b]", "notes=hello"])) == []
    assert any(p.startswith("tags=") for p in find_problems(compose_cfg([*base, "tags=[1,2]"])))
    assert any(p.startswith("notes=") for p in find_problems(compose_cfg([*base, "notes=3"])))
