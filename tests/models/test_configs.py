"""Every model config holds constructor arguments only: ``instantiate(cfg.model)`` builds it, and it trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hydra.utils import instantiate

from model_helpers import MODEL_NAMES, load_model_cfg

EXPECTED = {
    "simple_cnn", "simple_cnn_bn", "pseudo_se_net", "conv_block_net", "attention_net",
    "resnet_se", "efficientnet", "mobilenet_v2", "squeezenet", "torchvision",
}


def test_all_expected_configs_exist():
    assert EXPECTED <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config_shape(name):
    cfg = load_model_cfg(name)
    assert "_target_" in cfg
    assert cfg.num_classes == 10  # interpolated from data.num_classes
    # constructor arguments only: how the network runs is the training module's business
    assert not {"channels_last", "compile", "compile_mode"} & set(cfg.keys())


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward(name, num_classes):
    net = instantiate(load_model_cfg(name, num_classes))
    assert isinstance(net, torch.nn.Module)
    net.train()
    x = torch.randn(2, 3, 32, 32)
    logits = net(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_instantiate_model_node_of_the_composed_config(name):
    """``hydra.utils.instantiate(cfg.model)`` on the whole composed config, as a user would call it."""
    from conftest import compose_cfg

    cfg = compose_cfg([f"model={name}", "data=synthetic", "data.num_classes=7"])
    net = instantiate(cfg.model)
    assert isinstance(net, torch.nn.Module)
    assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_plain_mappings_instantiate():
    plain = {"_target_": "cifar_lab.models.simple_cnn.SimpleCNN", "num_classes": 7, "filters": [8, 8, 8],
             "kernel_sizes": [3, 5, 7]}
    net = instantiate(plain)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("kernel_sizes", [[3, 3], [5, 3], [7, 1], [4, 2]])
def test_simple_cnn_any_kernel_and_filters(kernel_sizes):
    net = instantiate(load_model_cfg("simple_cnn", filters=[16, 48], kernel_sizes=kernel_sizes, fc_units=64))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_simple_cnn_layouts_match_report():
    vanilla = instantiate(load_model_cfg("simple_cnn"))
    assert vanilla.classifier[2].in_features == 64 * 8 * 8 and vanilla.classifier[2].out_features == 512
    bn = instantiate(load_model_cfg("simple_cnn_bn"))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == 2
    assert [m.p for m in bn.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    assert bn.classifier[2].out_features == 256


def _overfit(net: torch.nn.Module, steps: int, lr: float = 1e-3, n: int = 16) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 10
    # one fixed smooth colour pattern per class, plus pixel noise
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=32, mode="bilinear") + torch.randn(
        10, 3, 1, 1, generator=g
    )
    x = templates[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-3:])


# (config, overrides, steps, lr, required loss ratio last/first); dropout off so the loss reflects fitting.
CHEAP = [
    ("simple_cnn", {}, 30, 1e-3, 0.3),
    ("simple_cnn_bn", {"dropout": 0.0}, 30, 1e-3, 0.3),
    ("pseudo_se_net", {"channels": [8, 16, 16, 32]}, 60, 3e-3, 0.3),
    ("conv_block_net", {"channels": [8, 16, 16, 32], "pool_after": [1, 3], "head_hidden": 32}, 40, 3e-3, 0.3),
    ("mobilenet_v2", {"width_mult": 0.35, "dropout": 0.0}, 20, 1e-3, 0.3),
    # SqueezeNet's logits pass a ReLU on a 1x1 map at 32x32, so units die easily: the report's
    # small lr and a looser bound.
    ("squeezenet", {"dropout": 0.0}, 60, 1e-4, 0.7),
    ("torchvision", {"arch": "resnet18", "adapt_stem": False}, 8, 1e-3, 0.3),
]
# The full-size networks, on a batch of 8: attention_net and efficientnet by step 6 and resnet_se by step 10
# are at 0.01-0.1 of their first loss (5 initialisations each: 3x or more inside the bound; 30-40 steps on
# 16 images took 110 s of the suite, 12 steps about 25 s).
HEAVY = [
    ("attention_net", {"dropout": 0.0}, 6, 1e-3, 0.3),
    ("resnet_se", {}, 10, 1e-3, 0.3),
    ("efficientnet", {"dropout": 0.0, "stochastic_depth": 0.0}, 6, 1e-3, 0.3),
]
HEAVY_BATCH = 8


@pytest.mark.parametrize("name,overrides,steps,lr,ratio", CHEAP, ids=[c[0] for c in CHEAP])
def test_overfits_one_batch(name, overrides, steps, lr, ratio):
    first, last = _overfit(instantiate(load_model_cfg(name, **overrides)), steps, lr)
    assert last < ratio * first, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides,steps,lr,ratio", HEAVY, ids=[c[0] for c in HEAVY])
def test_heavy_models_overfit_one_batch(name, overrides, steps, lr, ratio):
    first, last = _overfit(instantiate(load_model_cfg(name, **overrides)), steps, lr, n=HEAVY_BATCH)
    assert last < ratio * first, (first, last)
