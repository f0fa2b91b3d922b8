"""After a resume, epoch times and ETAs count only the resumed process's time."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cifar_lab.callbacks.estimate import RunEstimate
from cifar_lab.callbacks.progress import EpochLines
from conftest import NetModule

BATCHES = 6


class StopAfterBatch(L.Callback):
    """Save a checkpoint after batch ``batch`` of epoch ``epoch`` (as Ctrl-C does), then stop the process."""

    def __init__(self, path: Path, epoch: int, batch: int) -> None:
        self.path, self.epoch, self.batch = path, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("stopped")


def _trainer(max_epochs: int, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(BATCHES * 4, 4, generator=g), torch.randint(0, 2, (BATCHES * 4,), generator=g))
    return DataLoader(data, batch_size=4)


def _net() -> NetModule:
    return NetModule(torch.nn.Linear(4, 2))


@pytest.mark.parametrize("stopped_at", [(0, 2), (1, 0), (1, BATCHES - 1)])
def test_a_resumed_epoch_counts_this_process_only(tmp_path: Path, stopped_at: tuple[int, int]) -> None:
    """Resumed mid-epoch (or after an epoch's last batch): Lightning starts no epoch, so no epoch start time."""
    checkpoint = tmp_path / "stopped.ckpt"
    with pytest.raises(RuntimeError, match="stopped"):
        _trainer(3, StopAfterBatch(checkpoint, *stopped_at)).fit(_net(), _loader())

    lines, estimate = io.StringIO(), io.StringIO()
    began = time.perf_counter()
    _trainer(3, EpochLines(stream=lines), RunEstimate(min_steps=1, stream=estimate)).fit(
        _net(), _loader(), ckpt_path=str(checkpoint))
    this_process = time.perf_counter() - began
    printed = lines.getvalue().splitlines()
    assert printed and all(line.startswith("epoch ") for line in printed)
    seconds = [float(s) for s in re.findall(r"  ([0-9.]+) s", lines.getvalue())]
    etas = re.findall(r"ETA (\S+(?: \S+)?)$", lines.getvalue(), re.M)
    # every time shown is a part of this process's run (an epoch start left unset showed the machine's uptime)
    assert seconds and all(s <= this_process + 0.05 for s in seconds), (printed, this_process)
    assert all("h" not in eta for eta in etas), printed
    assert "took" not in estimate.getvalue()  # no correction from a part of an epoch
    first_epoch, first_batch = stopped_at
    if first_batch < BATCHES - 1:
        assert f"{BATCHES - first_batch - 1}/{BATCHES} batches (resumed)" in printed[0]
