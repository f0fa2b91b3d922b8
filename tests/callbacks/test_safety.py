"""Run safety callbacks: a checkpoint written at an epoch's start resumes that epoch from its first batch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from cifar_lab.callbacks.safety import FitMetrics, LatestCheckpoint, ResumeRNG
from conftest import NetModule

BATCHES = 3


class Counting(NetModule):
    """Counts the training batches of each epoch, logs a metric per epoch."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))
        self.batches: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        self.batches[self.current_epoch] = self.batches.get(self.current_epoch, 0) + 1
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss


class StopAtEpochStart(L.Callback):
    """Raise at ``epoch``'s start, after the callbacks before it (LatestCheckpoint) have run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(BATCHES * 4, 4, generator=g), torch.randint(0, 2, (BATCHES * 4,), generator=g))
    return DataLoader(data, batch_size=4)


def _trainer(folder: Path, max_epochs: int, *extra: L.Callback) -> L.Trainer:
    # the ModelCheckpoint saves only every 10th epoch: last.ckpt comes from LatestCheckpoint at each epoch's start
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, every_n_epochs=10)
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=[checkpoint, LatestCheckpoint(folder), ResumeRNG(), FitMetrics(), *extra])


def _stale(checkpoint: dict) -> dict:
    """The counters as Lightning leaves them at an epoch's start: the finished epoch's, all batches done."""
    loop = checkpoint["loops"]["fit_loop"]
    loop["epoch_loop.batch_progress"]["current"] = {k: BATCHES for k in ("ready", "started", "processed", "completed")}
    loop["epoch_loop.batch_progress"]["is_last_batch"] = True
    return checkpoint


@pytest.mark.parametrize("written_by", ["this version", "an earlier version"])
def test_checkpoint_from_an_epoch_start_resumes_that_whole_epoch(tmp_path: Path, written_by: str) -> None:
    L.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="killed"):
        _trainer(tmp_path, 3, StopAtEpochStart(2)).fit(Counting(), _loader())
    last = tmp_path / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["loops"]["fit_loop"]["epoch_progress"]["total"]["ready"] == 3  # written at epoch 2's start
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 0
    assert saved[FitMetrics.KEY]["train/loss"] > 0
    if written_by == "an earlier version":
        torch.save(_stale(saved), last)

    module = Counting()
    trainer = _trainer(tmp_path, 3)
    trainer.fit(module, _loader(), ckpt_path=str(last))
    assert module.batches == {2: BATCHES}  # the epoch the kill interrupted, whole
    assert trainer.global_step == 3 * BATCHES
