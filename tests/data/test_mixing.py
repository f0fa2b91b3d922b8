"""Mixup / CutMix batch mixing."""

from __future__ import annotations

import pytest
import torch

from cifar_lab.data.mixing import BatchMixer, dominant_label, one_hot_targets, sample_beta

K = 10


def _data(b: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g)
    y = torch.randint(0, K, (b,), generator=g)
    return x, y


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perm_and_lam(mixer: BatchMixer, x, seed: int):
    """Replays the mixer's draws for a single-alpha, prob=1 batch: lam, then the permutation."""
    g = _gen(seed)
    alpha = mixer.cutmix_alpha if mixer.cutmix_alpha is not None else mixer.mixup_alpha
    lam = sample_beta(alpha, g)
    perm = torch.randperm(x.shape[0], generator=g)
    return lam, perm, g


def test_mixup_is_convex_combination_with_matching_targets():
    x, y = _data()
    mixer = BatchMixer(K, mixup_alpha=1.0)
    xm, ys = mixer(x, y, epoch=0, generator=_gen(1))
    lam, perm, _ = _perm_and_lam(mixer, x, 1)
    assert mixer.last == {"mixed": True, "kind": "mixup", "lam": lam}
    assert 0.0 <= lam <= 1.0
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
        lam_drawn, perm, g = _perm_and_lam(mixer, x, seed)
        top, bottom, left, right = BatchMixer.cutmix_box(32, 32, lam_drawn, g)
        pasted = torch.zeros(32, 32, dtype=torch.bool)
        pasted[top:bottom, left:right] = True
        lam = mixer.last["lam"]
        assert mixer.last["kind"] == "cutmix"
        assert lam == pytest.approx(1.0 - pasted.float().mean().item())
        # pixels inside the box come from the partner, the rest from the image itself
        assert torch.equal(xm[:, :, pasted], x[perm][:, :, pasted])
        assert torch.equal(xm[:, :, ~pasted], x[:, :, ~pasted])
        # also measured directly on the output (images differ from their partners everywhere)
        own = (xm == x).all(dim=1).float().mean(dim=(1, 2))
        moved = perm != torch.arange(32)
        torch.testing.assert_close(own[moved], torch.full((int(moved.sum()),), lam))
        torch.testing.assert_close(ys.sum(1), torch.ones(32))
        ref = lam * one_hot_targets(y, K) + (1 - lam) * one_hot_targets(y[perm], K)
        torch.testing.assert_close(ys, ref)


def test_switch_between_mixup_and_cutmix():
    x, y = _data(8)
    kinds = set()
    mixer = BatchMixer(K, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    g = _gen(2)
    for _ in range(40):
        mixer(x, y, epoch=0, generator=g)
        kinds.add(mixer.last["kind"])
    assert kinds == {"mixup", "cutmix"}
    only_cut = BatchMixer(K, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
    only_cut(x, y, epoch=0, generator=g)
    assert only_cut.last["kind"] == "cutmix"


def test_no_mixing_from_stop_epoch_on():
    x, y = _data()
    mixer = BatchMixer(K, mixup_alpha=1.0, stop_epoch=5)
    xm, ys = mixer(x, y, epoch=4, generator=_gen(0))
    assert mixer.last["mixed"]
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


def test_batch_mode_mixes_about_prob_of_batches():
    x, y = _data(4)
    mixer = BatchMixer(K, mixup_alpha=1.0, prob=0.3)
    g = _gen(3)
    mixed = 0
    for _ in range(400):
        mixer(x, y, epoch=0, generator=g)
        mixed += mixer.last["mixed"]
    assert 0.2 < mixed / 400 < 0.4


def test_epoch_mode_constant_within_epoch_and_reproducible():
    x, y = _data(8)
    mixer = BatchMixer(K, mixup_alpha=1.0, prob=0.5, mode="epoch", seed=7)
    decisions = []
    for epoch in range(30):
        flags = set()
        g = _gen(epoch)
        for _ in range(5):
            mixer(x, y, epoch=epoch, generator=g)
            flags.add(mixer.last["mixed"])
        assert len(flags) == 1
        decisions.append(flags.pop())
    assert 5 < sum(decisions) < 25
    # a new mixer (e.g. after resuming) takes the same decisions, whatever the generator
    again = BatchMixer(K, mixup_alpha=1.0, prob=0.5, mode="epoch", seed=7)
    for epoch in (3, 0, 17, 29):
        again(x, y, epoch=epoch, generator=_gen(1234))
        assert again.last["mixed"] == decisions[epoch]
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


def test_beta_sampling_matches_distribution():
    g = _gen(0)
    draws = torch.tensor([sample_beta(1.0, g) for _ in range(4000)])
    assert abs(draws.mean().item() - 0.5) < 0.02
    assert abs(draws.var().item() - 1 / 12) < 0.01  # Beta(1, 1) is uniform
    small = torch.tensor([sample_beta(0.2, g) for _ in range(2000)])
    assert ((small < 0.1) | (small > 0.9)).float().mean() > 0.5  # U-shaped


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
