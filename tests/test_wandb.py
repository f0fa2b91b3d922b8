"""logger=wandb: without an API key a run is recorded offline under its run directory; read it back."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest
from wandb.proto import wandb_internal_pb2

from cifar_lab.config.resolvers import _wandb_offline
from conftest import SYNTH, compose_cfg, run_cli

BLOCK, FILE_HEADER, RECORD_HEADER = 32768, 7, 7  # W&B's transaction log: LevelDB's log format


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of an offline run's ``run-<id>.wandb`` file (what ``wandb sync`` uploads)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending = FILE_HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        chunk = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start, middle/last continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_offline_unless_an_api_key_is_configured(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert _wandb_offline() is True
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert _wandb_offline() is False
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert _wandb_offline() is False
    monkeypatch.delenv("WANDB_API_KEY")
    cfg = compose_cfg(["data=synthetic", "model=simple_cnn", "logger=wandb", "tags=[t]"], tmp_path / "run")
    assert cfg.logger.wandb.offline is True and cfg.logger.wandb.save_dir == str((tmp_path / "run").resolve())
    assert list(cfg.logger.wandb.tags) == ["t"]


@pytest.mark.slow
def test_offline_run_holds_metrics_config_and_report_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
           "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}
    proc = run_cli([*SYNTH, "trainer.max_epochs=2", "logger=wandb", "tags=[baseline]", "notes=first",
                    f"hydra.run.dir={run_dir}"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    assert f"wandb sync {offline}" in proc.stdout + proc.stderr

    history, config, runs = defaultdict(list), {}, []
    for record in records(next(offline.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history[_key(item)].append(json.loads(item.value_json))
        elif kind == "config":
            config.update({_key(item): json.loads(item.value_json)
                           for item in record.config.update})
        elif kind == "run":
            runs.append(record.run)
    [run] = runs
    assert (run.display_name, run.project, run.run_group) == ("run", "cifar-lab", "train")
    assert list(run.tags) == ["baseline"] and run.notes == "first"
    # the metrics the other loggers get: one val/acc per epoch, the test metrics equal to metrics.json's
    assert len(history["val/acc"]) == 2
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert history["test/acc"][-1] == summary["metrics"]["test/acc"]
    assert "train/loss" in history and any(k.startswith("test_per_class/") for k in history)
    # the run config and the report files
    assert config["optimizer/lr"] == 0.001 and config["model/_target_"] == "cifar_lab.models.simple_cnn.SimpleCNN"
    files = {p.name for p in (offline / "files").iterdir()}
    assert {"confusion_matrix.png", "curves.png", "classification_report.txt", "metrics.json",
            "MODEL_CARD.md"} <= files
    assert (offline / "files" / "metrics.json").read_text() == (run_dir / "metrics.json").read_text()


@pytest.mark.slow
def test_each_sweep_job_gets_its_own_offline_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
           "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}
    fast = [o for o in SYNTH if not o.startswith("callbacks.")]
    proc = run_cli(["-m", *fast, "callbacks=none", "trainer.max_epochs=1", "data.source.train_size=300",
                    "data.val_size=60", "logger=wandb", "seed=0,1", f"hydra.sweep.dir={sweep}",
                    "hydra.callbacks.sweep_report.print_best_config=false"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        [offline] = (sweep / job / "wandb").glob("offline-run-*")
        log = list(records(next(offline.glob("run-*.wandb"))))
        names = [r.run.display_name for r in log if r.WhichOneof("record_type") == "run"]
        val = [r for r in log if r.WhichOneof("record_type") == "history"
               and any(_key(i) == "val/acc" for i in r.history.item)]
        assert names == [job] and len(val) == 1  # its own run, its own epoch
