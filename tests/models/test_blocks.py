"""The shared multi-branch block and the other building blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from cifar_lab.models.attention_net import AttentionNet
from cifar_lab.models.blocks import BranchMixBlock, DropPath, ResidualPair, StackedConv2d
from cifar_lab.models.init import init_weights


def _explicit(block: BranchMixBlock, x: torch.Tensor) -> torch.Tensor:
    """The block computed branch by branch: separate convs, norms and activations, then the weighted sum."""
    m = x.mean(dim=(2, 3))
    logits = F.linear(m, block.gate.weight, block.gate.bias)
    w = {"softmax": logits.softmax(1), "sigmoid": logits.sigmoid(), "relu": logits.relu(), "identity": logits}[
        block.weighting
    ]
    conv, c = block.conv, block.out_channels
    out = 0
    for k in range(block.branches):
        weight, bias = conv.branch_parameters(k)
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding)
        if isinstance(block.branch_norm, nn.BatchNorm2d):
            bn = block.branch_norm
            sl = slice(k * c, (k + 1) * c)
            y = F.batch_norm(y, bn.running_mean[sl], bn.running_var[sl], bn.weight[sl], bn.bias[sl], False, 0.0, bn.eps)
        y = block.branch_act(y)
        out = out + w[:, k, None, None, None] * y
    if block.residual is not None:
        out = out + block.residual(x)
    return block.out_act(block.out_norm(out))


CASES = [
    dict(branches=5, weighting="sigmoid", out_act="relu"),  # pseudo-SE block
    dict(branches=5, weighting="softmax", branch_act="relu", residual="conv", out_norm=True, out_act="leaky_relu"),
    dict(branches=2, weighting="softmax", branch_norm=True, branch_act="relu", kernel_size=5, stride=2),
    dict(branches=3, weighting="identity", residual="auto"),
    dict(branches=1, weighting="relu", residual="auto", stride=2),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_block_equals_explicit_weighted_sum_of_branches(kwargs):
    block = BranchMixBlock(6, 8 if kwargs.get("residual") != "auto" or "stride" in kwargs else 6, **kwargs)
    # non-trivial norm statistics and affine parameters, evaluated with running stats
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    block.eval()
    x = torch.randn(3, 6, 12, 12)
    with torch.no_grad():
        assert_close(block(x), _explicit(block, x))


def test_block_matches_explicit_sum_in_train_mode_and_channels_last():
    block = BranchMixBlock(4, 5, branches=3, branch_norm=True, branch_act="relu")
    x = torch.randn(4, 4, 8, 8)
    y = block(x)  # train mode: batch statistics are per channel, hence per branch
    block.eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    assert_close(y, _explicit_batch_stats(block, x))
    block_cl = block.to(memory_format=torch.channels_last)
    assert_close(block_cl(x.contiguous(memory_format=torch.channels_last)), y)


def _explicit_batch_stats(block: BranchMixBlock, x: torch.Tensor) -> torch.Tensor:
    c, w = block.out_channels, block.branch_weights(x)
    out = 0
    for k in range(block.branches):
        weight, bias = block.conv.branch_parameters(k)
        y = F.conv2d(x, weight, bias, block.conv.stride, block.conv.padding)
        sl = slice(k * c, (k + 1) * c)
        bn = block.branch_norm
        y = F.batch_norm(y, None, None, bn.weight[sl], bn.bias[sl], True, 0.0, bn.eps)
        out = out + w[:, k, None, None, None] * F.relu(y)
    return out


def test_softmax_weights_sum_to_one():
    block = BranchMixBlock(7, 4, branches=5, weighting="softmax")
    w = block.branch_weights(torch.randn(6, 7, 9, 9))
    assert w.shape == (6, 5)
    assert (w >= 0).all()
    assert_close(w.sum(1), torch.ones(6))


def test_weights_depend_on_block_input():
    block = BranchMixBlock(3, 4, branches=2)
    a, b = block.branch_weights(torch.randn(2, 3, 8, 8)), block.branch_weights(torch.randn(2, 3, 8, 8) + 3)
    assert not torch.allclose(a, b)


def test_block_validates_options():
    with pytest.raises(ValueError):
        BranchMixBlock(3, 4, weighting="tanh2")
    with pytest.raises(ValueError):
        BranchMixBlock(3, 4, residual="identity")
    with pytest.raises(ValueError):
        BranchMixBlock(3, 4, residual="sum")


def test_residual_pair_skips():
    def make(i: int, o: int) -> BranchMixBlock:
        return BranchMixBlock(i, o, branches=2, branch_norm=True, branch_act="relu")

    proj = ResidualPair(make(4, 6), make(6, 6), 4, 6)
    ident = ResidualPair(make(6, 6), make(6, 6), 6, 6)
    assert isinstance(proj.skip, nn.Conv2d) and proj.skip.kernel_size == (1, 1)
    assert isinstance(ident.skip, nn.Identity)
    x = torch.randn(2, 4, 8, 8)
    proj.eval()
    with torch.no_grad():
        assert_close(proj(x), proj.second(proj.first(x)) + proj.skip(x))


def test_attention_net_layout():
    net = AttentionNet().eval()
    blocks = [m for m in net.modules() if isinstance(m, BranchMixBlock)]
    assert [(b.in_channels, b.out_channels, b.branches) for b in blocks] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 256, 2), (256, 384, 2), (384, 384, 2), (384, 384, 2)
    ]
    assert blocks[1].conv.kernel_size == (5, 5) and blocks[1].conv.stride == (2, 2)
    pairs = [m for m in net.modules() if isinstance(m, ResidualPair)]
    assert isinstance(pairs[0].skip, nn.Conv2d) and isinstance(pairs[1].skip, nn.Identity)
    with torch.no_grad():
        assert net.features(torch.randn(1, 3, 32, 32)).shape == (1, 256, 2, 2)


def test_xavier_init_is_per_branch():
    conv = StackedConv2d(16, 8, branches=4, kernel_size=3, padding=1)
    init_weights(conv, "xavier")
    # xavier_normal std for one branch: sqrt(2 / (fan_in + fan_out)), fan = channels * 9
    expected = (2.0 / ((16 + 8) * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.1
    assert torch.count_nonzero(conv.bias) == 0


def test_init_schemes_reject_unknown():
    with pytest.raises(ValueError):
        init_weights(nn.Linear(2, 2), "orthogonal")


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(2000, 3)
    y = dp(x)
    kept = y[:, 0] != 0
    assert 0.4 < kept.float().mean() < 0.6
    assert_close(y[kept], torch.full_like(y[kept], 2.0))
    dp.eval()
    assert torch.equal(dp(x), x)


def test_pooled_mlp_head_layout_and_parameter_names():
    from cifar_lab.models.blocks import PooledMLPHead

    with_dropout = PooledMLPHead(16, 8, 10, dropout=0.5)
    without = PooledMLPHead(16, 8, 10)
    # positions match the plain nn.Sequential heads older checkpoints were saved with
    assert list(with_dropout.state_dict()) == ["2.weight", "2.bias", "5.weight", "5.bias"]
    assert list(without.state_dict()) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    x = torch.randn(3, 16, 4, 4)
    assert with_dropout.eval()(x).shape == (3, 10)
    manual = without[4](without[3](without[2](x.mean(dim=(2, 3)))))
    torch.testing.assert_close(without(x), manual)
