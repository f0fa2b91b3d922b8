"""Compute accounting: FLOPs of a known network, training and test PFLOP of a run."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cifar_lab.callbacks.compute import TrainingCompute
from cifar_lab.callbacks.tta import TTACallback
from cifar_lab.models.flops import count_macs, forward_flops_per_image

from conftest import NetModule

# conv 3->4, 3x3, padding 1, on 8x8: 8*8 outputs x 4 filters x 27 multiply-adds;
# linear 256 -> 10: 2560 multiply-adds. No biases counted (FlopCounterMode counts products).
KNOWN_MACS_8PX = 8 * 8 * 4 * 27 + 4 * 8 * 8 * 10


class _Known(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def test_forward_flops_of_a_known_network_and_training_state_untouched() -> None:
    net = _Known().train()
    before = net.bn.running_mean.clone()
    assert count_macs(net, size=8) == KNOWN_MACS_8PX == 9472
    assert forward_flops_per_image(net, (3, 8, 8)) == 2 * KNOWN_MACS_8PX
    assert net.training and net.bn.training  # mode restored
    assert torch.equal(net.bn.running_mean, before)  # counted without touching BatchNorm statistics


def test_training_and_tta_test_pflop_equal_the_hand_computation() -> None:
    torch.manual_seed(0)
    # 22 images, batch 4: steps of 4,4,4,4,4,2 images; two epochs -> 44 images trained
    data = TensorDataset(torch.randn(22, 3, 8, 8), torch.randint(0, 10, (22,)))
    counter = TrainingCompute()
    tta = TTACallback(flip=True, shifts=[[1, 1], [-1, -1]], stages=["test"])  # 6 views
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[tta, counter])
    module = NetModule(_Known())
    trainer.fit(module, DataLoader(data, batch_size=4))
    trainer.test(module, DataLoader(data, batch_size=5), verbose=False)
    record = counter.record()
    hand_train = 44 * 3 * 2 * KNOWN_MACS_8PX  # images x (forward + backward) x FLOP per MAC x MACs
    assert counter.train_images == 44 and counter.train_flops == hand_train
    assert record["train_pflop"] == hand_train / 1e15
    assert record["train_forward_gflop_per_image"] == {"3x8x8": 2 * KNOWN_MACS_8PX / 1e9}
    hand_test = 22 * 6 * 2 * KNOWN_MACS_8PX  # every TTA view is a forward pass
    assert counter.test_images == 22 and counter.test_flops == hand_test


def test_training_compute_survives_a_resume() -> None:
    counter = TrainingCompute()
    counter.train_flops, counter.train_images, counter.train_forward = 600, 10, {"3x8x8": 20}
    restored = TrainingCompute()
    restored.load_state_dict(counter.state_dict())
    assert (restored.train_flops, restored.train_images, restored.train_forward) == (600, 10, {"3x8x8": 20})
