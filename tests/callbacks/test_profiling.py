"""debug=profiler and debug=profiler_torch write their reports into the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_lab.callbacks.profiling import top_operators
from cifar_lab.cli.train import train
from cifar_lab.config.trust import check_targets
from conftest import SYNTH, compose_cfg

TINY = [*SYNTH, "trainer.max_epochs=1", "data.source.train_size=400", "data.source.test_size=64",
        "data.val_size=64", "model.filters=[8,16]", "model.fc_units=32", "logger=none",
        "trainer.enable_progress_bar=false"]


def test_top_operators_are_sorted_by_self_time() -> None:
    a = torch.randn(256, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            a @ a
        torch.ones(3).add_(1)
    table = top_operators(prof.events(), 2, on_gpu=False)
    rows = [line.split()[0] for line in table.splitlines() if line.startswith(" ") and "aten::" in line]
    assert rows[0] == "aten::mm" and len(rows) == 2


@pytest.mark.slow
def test_simple_profiler_writes_its_report(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "debug=profiler"], tmp_path / "run")
    check_targets(cfg, "a saved config")  # a profiled run's checkpoint stays loadable
    train(cfg)
    report = (tmp_path / "run" / "profiler" / "fit-simple.txt").read_text()
    assert "run_training_batch" in report and "training_step" in report
    assert (tmp_path / "run" / "profiler" / "test-simple.txt").is_file()


@pytest.mark.slow
def test_torch_profiler_writes_a_trace_and_prints_top_operators(tmp_path: Path, capsys) -> None:
    cfg = compose_cfg([*TINY, "debug=profiler_torch"], tmp_path / "run")
    check_targets(cfg, "a saved config")
    train(cfg)
    folder = tmp_path / "run" / "profiler"
    traces = sorted(folder.glob("fit-torch*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]  # Chrome trace format (Perfetto UI reads it)
    names = {e.get("name", "") for e in events}
    assert any(n.endswith("training_step") for n in names) and any(n.startswith("aten::") for n in names)
    table = (folder / "fit-torch.txt").read_text()
    assert "Top 10 operators by self time (fit" in table
    out = capsys.readouterr().out
    assert "Top 10 operators by self time (fit, the profiled steps)" in out and "aten::" in out
