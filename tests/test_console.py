"""What a run prints: a short header, one plain line per epoch when not on a terminal, no noise."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cifar_lab.callbacks.progress import format_duration
from conftest import SYNTH, run_cli

NOISE = ("deprecated", "DeprecationWarning", "💡 Tip", "already configured with model summary",
         "`weights_only` was not set", "Traceback")


@pytest.mark.slow
def test_a_tiny_run_prints_a_short_header_and_plain_epoch_lines(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*SYNTH, "trainer.max_epochs=2", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"],
                   tmp_path)  # output captured: not a terminal
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in out, (noise, out[-3000:])
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run directory : "))
    end = next(i for i, line in enumerate(lines) if line.startswith("full config   : "))
    assert end - start + 1 <= 25
    assert lines[start] == f"run directory : {run_dir}"
    assert any(line.startswith("model         : simple_cnn (") for line in lines[start:end])
    assert any(line.startswith("precision     : 32, memory format channels_last") for line in lines[start:end])
    assert "CONFIG" not in proc.stdout  # the full tree only with print_config=true
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2, epochs
    pattern = r"epoch (\d)/2  [\d.]+ s  train loss [\d.]+ acc [\d.]+  val loss [\d.]+ acc [\d.]+  ETA \S+"
    assert [re.fullmatch(pattern, line).group(1) for line in epochs] == ["1", "2"]
    assert epochs[-1].endswith("ETA 0s")
    # the run's expected time, said before the first epoch ended
    estimate = next(i for i, line in enumerate(lines) if line.startswith("time: about "))
    assert re.fullmatch(r"time: about .+? per epoch, .+? for 2 epochs with validation and the test "
                        r"\(measured on the first \d+ steps\)",
                        lines[estimate])
    assert estimate < lines.index(epochs[0])
    assert (run_dir / "config.yaml").is_file()  # the whole config is kept with the run


def test_durations_read_like_a_clock() -> None:
    assert [format_duration(s) for s in (0, 9.6, 75, 3599, 3600 * 5 + 61)] == ["0s", "10s", "1m 15s", "59m 59s",
                                                                                "5h 01m"]


def test_compact_bar_fits_80_columns(monkeypatch) -> None:
    from lightning.pytorch.callbacks import RichProgressBar
    from rich.console import Console
    from rich.progress import Progress

    from cifar_lab.callbacks.progress import CompactRichProgressBar

    bar = CompactRichProgressBar()
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, t, m: {"val/acc": 0.97, "v_num": 3})
    trainer = SimpleNamespace(logged_metrics={"train/loss_step": torch.tensor(0.0331)})
    metrics = bar.get_metrics(trainer, None)
    assert metrics == {"loss": pytest.approx(0.0331), "val_acc": 0.97}
    console = Console(width=80, record=True, force_terminal=True)
    progress = Progress(*bar.configure_columns(None), console=console, auto_refresh=False)
    progress.add_task("Epoch 12/29", total=391, completed=390)
    console.print(progress.get_renderable())
    line = console.export_text().splitlines()[0]
    # leaves room for "loss: 0.033 val_acc: 0.970" (27 characters) on the same 80-column line
    assert len(line.rstrip()) + 1 + len("loss: 0.033 val_acc: 0.970") <= 80, line


def test_compact_bar_reads_the_step_loss_once_per_logged_value(monkeypatch) -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    from cifar_lab.callbacks.progress import CompactRichProgressBar
    from device_reads import DeviceReads

    bar = CompactRichProgressBar()
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, t, m: {})
    trainer = SimpleNamespace(logged_metrics={"train/loss_step": torch.tensor(2.5)})
    reads = DeviceReads()
    reads.recording = True
    with reads:
        shown = [bar.get_metrics(trainer, None)["loss"] for _ in range(3)]  # refreshed after 3 batches
        trainer.logged_metrics["train/loss_step"] = torch.tensor(1.5)  # the next logging step
        shown += [bar.get_metrics(trainer, None)["loss"] for _ in range(2)]
    assert shown == [2.5, 2.5, 2.5, 1.5, 1.5]
    assert [name for name, _ in reads.reads] == ["__float__", "__float__"], reads.reads


def test_compact_model_summary_lists_layers_not_metrics(capsys) -> None:
    from cifar_lab.callbacks.progress import CompactModelSummary

    data = [(" ", ["0", "1"]), ("Name", ["net", "val_acc"]), ("Type", ["SimpleCNN", "MulticlassAccuracy"]),
            ("Params", ["2.1 M", "0"]), ("Mode", ["train", "train"]), ("FLOPs", ["0", "0"])]
    CompactModelSummary.summarize(data, 2_122_186, 2_122_186, 8.489, {"train": 2, "eval": 0}, 0)
    out = capsys.readouterr().out
    assert "SimpleCNN" in out and "MulticlassAccuracy" not in out and "FLOPs" not in out
    assert "Params: 2.1 M trainable, 0 frozen; 8.489 MB" in out
