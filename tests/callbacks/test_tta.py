"""Test-time augmentation: the views, the averaging, and the callback that switches it on for test."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from cifar_lab.callbacks import TestTimeAugmentation, TTACallback
from cifar_lab.callbacks.tta import as_tested
from cifar_lab.config.schema import check_tta
from cifar_lab.errors import ConfigError
from cifar_lab.models.tta import apply_view, tta_probs, tta_views
from cifar_lab.module import ClassifierModule


def test_views() -> None:
    assert tta_views(flip=False, translate=0) == [(False, 0, 0)]
    assert tta_views(flip=True, translate=0) == [(False, 0, 0), (True, 0, 0)]
    views = tta_views(flip=True, translate=2)
    assert len(views) == 10 and views[0] == (False, 0, 0)
    assert {(dy, dx) for _, dy, dx in views} == {(0, 0), (0, 2), (0, -2), (2, 0), (-2, 0)}
    with pytest.raises(ValueError):
        tta_views(translate=-1)


def test_apply_view_moves_content() -> None:
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 1] = 1.0
    down = apply_view(x, (False, 1, 0), padding_mode="constant")
    assert down[0, 0, 3, 1] == 1.0 and down.sum() == 1.0
    left = apply_view(x, (False, 0, -1), padding_mode="constant")
    assert left[0, 0, 2, 0] == 1.0 and left.sum() == 1.0
    mirrored = apply_view(x, (True, 0, 0))
    assert mirrored[0, 0, 2, 3] == 1.0
    assert apply_view(x, (False, 2, 2), "reflect").shape == x.shape


def test_tta_average_equals_manual_average() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    views = tta_views(flip=True, translate=1)
    manual = torch.stack([net(apply_view(x, v)).softmax(1) for v in views]).mean(0)
    assert torch.allclose(tta_probs(net, x, views), manual, atol=1e-6)
    wrapped = TestTimeAugmentation(net, flip=True, translate=1)
    assert torch.allclose(wrapped(x).softmax(1), manual, atol=1e-6)


def test_the_network_as_tested_has_the_test_layers_views() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    layers = [TTACallback(flip=True, stages=("predict",)), TTACallback(shifts=[[1, 1]], padding_mode="replicate")]
    tested = as_tested(net, layers)  # the second applies in test: mirror and one diagonal shift, 4 views
    assert isinstance(tested, TestTimeAugmentation) and tested.views == layers[1].views and len(tested.views) == 4
    manual = tta_probs(net, x, layers[1].views, "replicate")
    assert torch.allclose(tested(x).softmax(1), manual, atol=1e-6)
    assert as_tested(net, layers[:1]) is net and as_tested(net, [TTACallback(enabled=False)]) is net


class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.linear(x.mean(dim=(2, 3)))


def test_callback_applies_only_to_test_and_restores_forward() -> None:
    net = CountingNet()
    module = ClassifierModule(net, optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=2)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, max_epochs=1,
                        num_sanity_val_steps=0,
                        callbacks=[TTACallback(flip=True, translate=1, padding_mode="replicate")])
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert net.calls == 4  # 2 train + 2 val batches, one view each
    net.calls = 0
    trainer.test(module, dataloaders=data, verbose=False)
    assert net.calls == 2 * 10  # 2 batches x 10 views
    assert "forward" not in module.__dict__  # the class's forward is back
    net.calls = 0
    module(torch.randn(1, 3, 6, 6))
    assert net.calls == 1


def test_callback_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="stages"):
        TTACallback(stages=("train",))
    with pytest.raises(ValueError, match="padding_mode"):
        TTACallback(padding_mode="wrap")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant", "circular", "edge"])
def test_the_config_check_accepts_exactly_the_padding_modes_the_callback_builds(mode: str) -> None:
    tta = {"enabled": True, "translate": 1, "padding_mode": mode}
    try:
        TTACallback(translate=1, padding_mode=mode)
    except ValueError:
        with pytest.raises(ConfigError, match=f"tta.padding_mode={mode}: must be one of reflect, replicate, constant"):
            check_tta(tta)
    else:
        check_tta(tta)
