"""Architecture facts from the reports: parameter counts, scaling rules, spatial layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hydra.utils import instantiate
from cifar_lab.models.efficientnet import SCALING, EfficientNet, MBConv, round_channels
from cifar_lab.models.mobilenet_v2 import MobileNetV2
from cifar_lab.models.resnet_se import ResNetSE
from cifar_lab.models.squeezenet import SqueezeNet

from model_helpers import load_model_cfg


def n_trainable(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_resnet_se_parameter_count():
    assert n_trainable(instantiate(load_model_cfg("resnet_se"))) == 4_993_166


def test_resnet_se_options():
    base = ResNetSE()
    se_everywhere = ResNetSE(se_in_blocks=True)
    assert n_trainable(se_everywhere) > n_trainable(base)
    assert n_trainable(ResNetSE(se_stem=False)) == 4_993_166 - (64 * 4 + 4 + 4 * 64 + 64)
    assert n_trainable(ResNetSE(num_classes=100)) == 4_993_166 + 90 * 257
    with torch.no_grad():
        assert base.stages(base.stem(torch.randn(1, 3, 32, 32))).shape == (1, 256, 8, 8)


def test_round_channels():
    assert round_channels(32 * 1.1) == 32
    assert round_channels(16 * 1.8) == 32
    assert round_channels(1280 * 2.0) == 2560
    assert all(round_channels(c * w) % 8 == 0 for c in (16, 24, 40, 80, 112, 192, 320) for w, _, _ in SCALING.values())


def test_efficientnet_scaling_and_stems():
    b0 = EfficientNet(version="b0")
    assert sum(isinstance(m, MBConv) for m in b0.modules()) == 16
    b2 = EfficientNet(version="b2", stem="imagenet")
    assert sum(isinstance(m, MBConv) for m in b2.modules()) == 23  # ceil(1.2 * repeats) summed
    assert b2.classifier[0].p == 0.3 and b2.classifier[1].in_features == 1408
    x = torch.randn(1, 3, 32, 32)
    b0.eval(), b2.eval()
    with torch.no_grad():
        assert b0.head(b0.blocks(b0.stem(x))).shape[-1] == 4  # cifar stem: total stride 8
        assert b2.head(b2.blocks(b2.stem(x))).shape[-1] == 1  # imagenet stem: total stride 32
    drops = [m.drop_path.p for m in b0.modules() if isinstance(m, MBConv) and m.use_residual]
    assert drops == sorted(drops) and 0 < max(drops) < 0.2
    with pytest.raises(ValueError):
        EfficientNet(version="b9")


def test_mobilenet_v2_cifar_layout():
    net = MobileNetV2(width_mult=0.5)
    with torch.no_grad():
        assert net.features(torch.randn(1, 3, 32, 32)).shape[-1] == 4
    assert MobileNetV2(width_mult=0.5).features[0][0].out_channels == 16


def test_squeezenet_classifier():
    net = SqueezeNet(num_classes=10, dropout=0.5)
    assert net.net.classifier[0].p == 0.5
    assert net.net.classifier[1].out_channels == 10 and net.net.classifier[1].in_channels == 512
