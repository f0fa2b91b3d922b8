"""The generic torchvision wrapper: head replacement, stem adaptation, upsampling, offline errors."""

from __future__ import annotations
import urllib.error

import pytest
import torch
from torch import nn

from hydra.utils import instantiate
from cifar_lab.models.torchvision_net import TorchvisionNet

from model_helpers import load_model_cfg


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_from_scratch_archs(arch):
    net = instantiate(load_model_cfg("torchvision", arch=arch, num_classes=10))
    assert isinstance(net, TorchvisionNet)
    heads = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert heads[-1].out_features == 10
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()


def test_resnet_stem_adaptation():
    net = TorchvisionNet(arch="resnet18", adapt_stem=True)
    assert net.net.conv1.kernel_size == (3, 3) and net.net.conv1.stride == (1, 1)
    assert isinstance(net.net.maxpool, nn.Identity)
    plain = TorchvisionNet(arch="resnet18", adapt_stem=False)
    assert plain.net.conv1.kernel_size == (7, 7) and isinstance(plain.net.maxpool, nn.MaxPool2d)


def test_other_stems_and_conv_heads():
    net = TorchvisionNet(arch="mobilenet_v3_small", num_classes=7)
    assert net.net.features[0][0].stride == (1, 1)
    sq = TorchvisionNet(arch="squeezenet1_1", num_classes=7, adapt_stem=False)  # classifier is a conv
    assert sq.net.classifier[1].out_channels == 7
    assert sq(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_upsample_inside_forward():
    net = TorchvisionNet(arch="resnet18", adapt_stem=False, upsample=64)
    seen = []
    net.net.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert seen[0][-2:] == (64, 64)


def test_pretrained_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as info:
        TorchvisionNet(arch="resnet18", pretrained=True)
    msg = str(info.value)
    with pytest.raises(Exception, match="Could not fetch the pretrained weights") as via_config:
        instantiate(load_model_cfg("torchvision", arch="resnet18", pretrained=True))
    assert isinstance(via_config.value.__cause__, RuntimeError)  # hydra wraps the constructor's error
    assert "https://download.pytorch.org/models/resnet18-" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert "get_model('resnet18', weights='DEFAULT')" in msg
    assert "network is unreachable" in msg
