"""Mixup / CutMix batch mixing: semantics, draw distributions, and no device reads."""

from __future__ import annotations

import math

import pytest
import torch

from cifar_lab.data.mixing import BatchMixer, cutmix_box, dominant_label, one_hot_targets, sample_beta
from device_reads import DeviceReads

K = 10


def _data(b: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g)
    y = torch.randint(0, K, (b,), generator=g)
    return x, y


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _host_box(height: int, width: int, lam: float, cy: int, cx: int) -> torch.Tensor:
    """The box as the host computed it before the draws moved to the device (the reference)."""
    cut = math.sqrt(max(0.0, 1.0 - lam))
    ch, cw = int(height * cut), int(width * cut)
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    box = torch.zeros(height, width, dtype=torch.bool)
    box[top:bottom, left:right] = True
    return box


def test_mixup_is_convex_combination_with_matching_targets():
    x, y = _data()
    mixer = BatchMixer(K, mixup_alpha=1.0)
    xm, ys = mixer(x, y, epoch=0, generator=_gen(1))
    draws = mixer.draw(32, 32, 32, _gen(1))  # the same generator state: the same draws
    lam, perm = float(draws["lam"]), draws["perm"]
    assert bool(mixer.last["mixed"]) and not bool(mixer.last["cutmix"]) and float(mixer.last["lam"]) == lam
    assert 0.0 <= lam <= 1.0 and "box" not in draws
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    assert ys.shape == (32, K) and ys.dtype == torch.float32
    torch.testing.assert_close(ys.sum(1), torch.ones(32))
    ref = lam * torch.nn.functional.one_hot(y, K).float() + (1 - lam) * torch.nn.functional.one_hot(y[perm], K).float()
    torch.testing.assert_close(ys, ref)
    for i in range(32):
        if y[i] != y[perm[i]]:
            assert ys[i, y[i]] == pytest.approx(lam, abs=1e-6)
            assert ys[i, y[perm[i]]] == pytest.approx(1 - lam, abs=1e-6)


def test_cutmix_lambda_is_pasted_area_fraction():
    x, y = _data()
    mixer = BatchMixer(K, mixup_alpha=None, cutmix_alpha=1.0)
    for seed in range(10):
        xm, ys = mixer(x, y, epoch=0, generator=_gen(seed))
        draws = mixer.draw(32, 32, 32, _gen(seed))
        pasted, perm = draws["box"], draws["perm"]
        lam = float(mixer.last["lam"])
        assert bool(mixer.last["cutmix"])
        assert lam == pytest.approx(1.0 - pasted.float().mean().item())
        # pixels inside the box come from the partner, the rest from the image itself, exactly
        assert torch.equal(xm[:, :, pasted], x[perm][:, :, pasted])
        assert torch.equal(xm[:, :, ~pasted], x[:, :, ~pasted])
        # also measured directly on the output (images differ from their partners everywhere)
        own = (xm == x).all(dim=1).float().mean(dim=(1, 2))
        moved = perm != torch.arange(32)
        torch.testing.assert_close(own[moved], torch.full((int(moved.sum()),), lam))
        torch.testing.assert_close(ys.sum(1), torch.ones(32))
        ref = lam * one_hot_targets(y, K) + (1 - lam) * one_hot_targets(y[perm], K)
        torch.testing.assert_close(ys, ref)


@pytest.mark.parametrize("size", [(32, 32), (24, 17)])
def test_cutmix_box_equals_the_host_formula(size):
    height, width = size
    for lam in (0.0, 0.01, 0.3, 0.5, 0.77, 0.99, 1.0):
        for cy in range(0, height, 5):
            for cx in (0, 3, width // 2, width - 1):
                box = cutmix_box(height, width, torch.tensor(lam), torch.tensor(cy), torch.tensor(cx))
                assert torch.equal(box, _host_box(height, width, lam, cy, cx)), (lam, cy, cx)


def test_cutmix_box_is_centred_at_a_uniform_pixel():
    """The box is the host formula's at a centre drawn uniformly over the image, after lam and perm."""
    mixer = BatchMixer(K, mixup_alpha=None, cutmix_alpha=1.0)
    for seed in range(20):
        draws = mixer.draw(4, 24, 17, _gen(seed))
        ref = _gen(seed)
        lam = float(sample_beta(1.0, ref))
        assert torch.equal(torch.randperm(4, generator=ref), draws["perm"]) and lam == float(draws["lam"])
        cy, cx = int(torch.randint(0, 24, (), generator=ref)), int(torch.randint(0, 17, (), generator=ref))
        assert torch.equal(draws["box"], _host_box(24, 17, lam, cy, cx)), seed


def test_switch_between_mixup_and_cutmix():
    x, y = _data(8)
    mixer = BatchMixer(K, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    g = _gen(2)
    cutmix = []
    for _ in range(400):
        mixer(x, y, epoch=0, generator=g)
        cutmix.append(bool(mixer.last["cutmix"]))
    assert 0.4 < sum(cutmix) / 400 < 0.6
    only_cut = BatchMixer(K, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
    only_cut(x, y, epoch=0, generator=g)
    assert bool(only_cut.last["cutmix"])
    only_mix = BatchMixer(K, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.0)
    only_mix(x, y, epoch=0, generator=g)
    assert not bool(only_mix.last["cutmix"])


def test_the_switch_picks_the_alpha_of_the_kind():
    """With both alphas set, the lambda of a mixup batch is Beta(mixup_alpha) and of a CutMix draw
    Beta(cutmix_alpha): here mixup's is concentrated near 0.5, CutMix's near 0 and 1."""
    mixer = BatchMixer(K, mixup_alpha=50.0, cutmix_alpha=0.1, switch_prob=0.5)
    g = _gen(6)
    lam = {True: [], False: []}
    for _ in range(600):
        d = mixer.draw(4, 32, 32, g)
        lam[bool(d["cutmix"])].append(float(d["lam"]))
    mix, cut = torch.tensor(lam[False]), torch.tensor(lam[True])
    assert (mix - 0.5).abs().max() < 0.25
    assert ((cut < 0.05) | (cut > 0.95)).float().mean() > 0.6


def test_no_mixing_from_stop_epoch_on():
    x, y = _data()
    mixer = BatchMixer(K, mixup_alpha=1.0, stop_epoch=5)
    xm, ys = mixer(x, y, epoch=4, generator=_gen(0))
    assert bool(mixer.last["mixed"])
    for epoch in (5, 6, 100):
        xm, ys = mixer(x, y, epoch=epoch, generator=_gen(0))
        assert xm is x or torch.equal(xm, x)
        assert torch.equal(ys, one_hot_targets(y, K))
        assert not mixer.last["mixed"]
        assert torch.equal(dominant_label(ys), y)


def test_prob_zero_never_mixes_in_both_modes():
    x, y = _data()
    for mode in ("batch", "epoch"):
        mixer = BatchMixer(K, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0, mode=mode)
        g = _gen(0)
        for epoch in range(20):
            xm, ys = mixer(x, y, epoch=epoch, generator=g)
            assert torch.equal(xm, x)
            assert torch.equal(ys, one_hot_targets(y, K))
            torch.testing.assert_close(ys.sum(1), torch.ones(32))


def test_batch_mode_mixes_about_prob_of_batches_and_leaves_the_others_exact():
    x, y = _data(4)
    mixer = BatchMixer(K, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.3)
    g = _gen(3)
    mixed = 0
    for _ in range(400):
        xm, ys = mixer(x, y, epoch=0, generator=g)
        if bool(mixer.last["mixed"]):
            mixed += 1
        else:  # an unmixed batch of a mixing epoch: the images and one-hot labels, bit for bit
            assert torch.equal(xm, x) and torch.equal(ys, one_hot_targets(y, K))
            assert float(mixer.last["lam"]) == 1.0 and not bool(mixer.last["cutmix"])
    assert 0.2 < mixed / 400 < 0.4


def test_every_call_makes_the_same_draws_whatever_they_decide():
    """The generator's state after a call does not depend on the drawn values (mixed or not,
    mixup or CutMix): a resumed run's generator sits where the uninterrupted one's did."""
    mixer = BatchMixer(K, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5, switch_prob=0.5)
    x, y = _data(8)
    decisions = set()
    for seed in range(40):
        g, ref = _gen(seed), _gen(seed)
        mixer(x, y, epoch=0, generator=g)
        decisions.add((bool(mixer.last["mixed"]), bool(mixer.draw(8, 32, 32, _gen(seed))["cutmix"])))
        # the fixed sequence: two coins, the Beta draw, the permutation, the box centre
        torch.rand((), generator=ref), torch.rand((), generator=ref)
        sample_beta(1.0, ref)
        torch.randperm(8, generator=ref)
        torch.randint(0, 32, (), generator=ref), torch.randint(0, 32, (), generator=ref)
        assert torch.equal(g.get_state(), ref.get_state()), seed
    assert len(decisions) == 4  # every combination was seen


def test_epoch_mode_constant_within_epoch_and_reproducible():
    x, y = _data(8)
    mixer = BatchMixer(K, mixup_alpha=1.0, prob=0.5, mode="epoch", seed=7)
    decisions = []
    for epoch in range(30):
        flags = set()
        g = _gen(epoch)
        for _ in range(5):
            mixer(x, y, epoch=epoch, generator=g)
            flags.add(bool(mixer.last["mixed"]))
        assert len(flags) == 1
        decisions.append(flags.pop())
    assert 5 < sum(decisions) < 25
    # a new mixer (e.g. after resuming) takes the same decisions, whatever the generator
    again = BatchMixer(K, mixup_alpha=1.0, prob=0.5, mode="epoch", seed=7)
    for epoch in (3, 0, 17, 29):
        again(x, y, epoch=epoch, generator=_gen(1234))
        assert bool(again.last["mixed"]) == decisions[epoch]
        assert again.epoch_decision(epoch) == decisions[epoch]
    other = BatchMixer(K, mixup_alpha=1.0, prob=0.5, mode="epoch", seed=8)
    assert [other.epoch_decision(e) for e in range(30)] != decisions


def test_epoch_mode_prob_09_mixes_most_epochs():
    mixer = BatchMixer(K, mixup_alpha=1.0, prob=0.9, mode="epoch", stop_epoch=400)
    on = [mixer.active(e) for e in range(400)]
    assert 0.85 < sum(on) / 400 < 0.95
    assert not mixer.active(400)


def test_reproducible_with_same_generator_seed():
    x, y = _data()
    mixer = BatchMixer(K, mixup_alpha=0.4, cutmix_alpha=1.0)
    a = mixer(x, y, epoch=0, generator=_gen(5))
    b = mixer(x, y, epoch=0, generator=_gen(5))
    c = mixer(x, y, epoch=0, generator=_gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # without a generator the global RNG drives it
    torch.manual_seed(3)
    d = mixer(x, y, epoch=0)
    torch.manual_seed(3)
    e = mixer(x, y, epoch=0)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


@pytest.mark.parametrize("alpha", [1.0, 0.4, 0.2, 2.0])
def test_beta_sampling_matches_distribution(alpha):
    g = _gen(0)
    draws = torch.stack([sample_beta(alpha, g) for _ in range(4000)])
    assert draws.dtype == torch.float32 and draws.min() >= 0 and draws.max() <= 1
    assert abs(draws.mean().item() - 0.5) < 0.02
    assert abs(draws.var().item() - 1 / (4 * (2 * alpha + 1))) < 0.01  # Beta(a, a): 1 / (4 (2a + 1))
    if alpha < 1:  # U-shaped
        assert ((draws < 0.1) | (draws > 0.9)).float().mean() > 0.4
    # Beta(1, 1) is uniform: its deciles hold a tenth each
    if alpha == 1.0:
        counts = torch.histc(draws, bins=10, min=0, max=1)
        assert (counts - 400).abs().max() < 80


@pytest.mark.parametrize("settings", [
    dict(mixup_alpha=1.0),
    dict(mixup_alpha=None, cutmix_alpha=1.0),
    dict(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5, switch_prob=0.5),
    dict(mixup_alpha=1.0, prob=0.9, mode="epoch", seed=3),
])
def test_mixing_reads_nothing_back_from_the_device(settings):
    x, y = _data(16)
    mixer = BatchMixer(K, **settings)
    g = _gen(0)
    reads = DeviceReads()
    reads.recording = True
    with reads:
        for epoch in range(4):
            mixer(x, y, epoch=epoch, generator=g)
    assert reads.reads == []


def test_helpers_and_input_checks():
    y = torch.tensor([3, 0, 9])
    oh = one_hot_targets(y, K)
    assert oh.shape == (3, K) and torch.equal(dominant_label(oh), y)
    assert torch.equal(dominant_label(y), y)
    soft = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    assert torch.equal(dominant_label(soft), torch.tensor([0, 1]))
    mixer = BatchMixer(K)
    with pytest.raises(TypeError):
        mixer(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), epoch=0)
    with pytest.raises(ValueError):
        BatchMixer(K, mode="sometimes")
    disabled = BatchMixer(K, mixup_alpha=None, cutmix_alpha=None)
    x, yy = _data(4)
    xm, ys = disabled(x, yy, epoch=0)
    assert torch.equal(xm, x) and torch.equal(ys, one_hot_targets(yy, K))


def test_soft_targets_input_are_mixed_too():
    x, y = _data(16)
    soft = one_hot_targets(y, K) * 0.9 + 0.01
    xm, ys = BatchMixer(K)(x, soft, epoch=0, generator=_gen(0))
    torch.testing.assert_close(ys.sum(1), torch.ones(16))
