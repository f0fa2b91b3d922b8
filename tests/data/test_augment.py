"""Batched augmentation ops: shapes, identities, torchvision equivalence, randomness.

Ops delegated to kornia have their own checks against torchvision in test_kornia_ops.py.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cifar_lab.data.augment import (
    AlternatingFlip,
    BatchAugment,
    BatchOpTransform,
    ColorJitter,
    Cutout,
    HorizontalFlip,
    KorniaOp,
    KorniaRandomAutocontrast,
    KorniaRandomGrayscale,
    Normalize,
    RandomAutocontrast,
    RandomCrop,
    RandomErasing,
    RandomGrayscale,
    RandomRotation,
)
from conftest import MEAN, STD
from conftest import random_images as _batch
from conftest import seeded_generator as _gen


def _run(op, x, generator=None):
    if isinstance(op, AlternatingFlip):
        return op(x, generator, indices=torch.arange(x.shape[0]))
    return op(x, generator)


ALL_OPS = {
    "crop_constant": lambda p=1.0: RandomCrop(32, 4, "constant", fill=0, p=p),
    "crop_reflect": lambda p=1.0: RandomCrop(32, 4, "reflect", p=p),
    "crop_edge": lambda p=1.0: RandomCrop(32, 4, "edge", p=p),
    "flip": lambda p=0.5: HorizontalFlip(p),
    "jitter": lambda p=1.0: ColorJitter(0.4, 0.4, 0.4, 0.1, p=p),
    "jitter_batch_order": lambda p=1.0: ColorJitter(0.4, 0.4, 0.4, 0.1, p=p, order="batch"),
    "rotation": lambda p=1.0: RandomRotation(20, p=p),
    "grayscale": lambda p=0.5: RandomGrayscale(p),
    "autocontrast": lambda p=0.5: RandomAutocontrast(p),
    "cutout": lambda p=1.0: Cutout(8, p=p),
    "erasing": lambda p=0.5: RandomErasing(p=p),
    "kornia_grayscale": lambda p=0.5: KorniaRandomGrayscale(p),
    "kornia_autocontrast": lambda p=0.5: KorniaRandomAutocontrast(p),
}


# ----------------------------------------------------------------------------- shapes and identities


@pytest.mark.parametrize("name", sorted(ALL_OPS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_op_keeps_shape_and_dtype(name, dtype):
    x = _batch()
    if dtype.is_floating_point:
        x = x.to(dtype) / 255
    y = ALL_OPS[name]()(x, _gen())
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    if dtype.is_floating_point:
        assert y.min() >= 0 and y.max() <= 1


def test_alternating_flip_keeps_shape_and_dtype():
    for x in (_batch(), _batch().float() / 255):
        y = _run(AlternatingFlip(), x)
        assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("name", sorted(ALL_OPS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_p0_is_identity(name, dtype):
    x = _batch()
    if dtype.is_floating_point:
        x = x.to(dtype) / 255
    assert torch.equal(ALL_OPS[name](0.0)(x, _gen()), x)


def test_flip_p1_equals_torch_flip():
    x = _batch()
    assert torch.equal(HorizontalFlip(1.0)(x), torch.flip(x, dims=[-1]))
    xf = x.float()
    assert torch.equal(HorizontalFlip(1.0)(xf), torch.flip(xf, dims=[-1]))


def test_flip_fixed_params_equal_hflip():
    x = _batch(8)
    flip = torch.tensor([True, False, True, True, False, False, True, False])
    y = HorizontalFlip().apply(x, {"flip": flip})
    for i in range(8):
        ref = TF.horizontal_flip(x[i]) if flip[i] else x[i]
        assert torch.equal(y[i], ref)


# ----------------------------------------------------------------------------- crop


@pytest.mark.parametrize(
    "mode, fill",
    [("constant", 0), ("constant", 7), ("constant", (10, 20, 30)), ("reflect", 0), ("edge", 0), ("symmetric", 0)],
)
def test_crop_fixed_offsets_equal_torchvision_pad_crop(mode, fill):
    x = _batch(9)
    pad = 4
    offsets = torch.tensor([[t, l] for t, l in zip(range(9), reversed(range(9)))])
    op = RandomCrop(32, pad, mode, fill=fill)
    y = op.apply(x, {"top": offsets[:, 0], "left": offsets[:, 1]})
    tv_fill = list(fill) if isinstance(fill, tuple) else fill
    for i in range(9):
        padded = TF.pad(x[i], [pad], fill=tv_fill, padding_mode=mode)
        ref = TF.crop(padded, int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        assert torch.equal(y[i], ref), (mode, i)


def test_crop_asymmetric_padding_and_smaller_size_match_torchvision():
    x = _batch(5)
    padding = (1, 2, 3, 4)  # left, top, right, bottom
    op = RandomCrop((28, 30), padding, "reflect")
    params = op.sample_params(5, "cpu", _gen(3), height=32, width=32)
    y = op.apply(x, params)
    assert y.shape == (5, 3, 28, 30)
    for i in range(5):
        padded = TF.pad(x[i], list(padding), padding_mode="reflect")
        ref = TF.crop(padded, int(params["top"][i]), int(params["left"][i]), 28, 30)
        assert torch.equal(y[i], ref)


def test_crop_with_padding_shifts_content():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[0, :, 10, 12] = 255
    op = RandomCrop(32, 4)
    top, left = 1, 6  # shift by (pad - top, pad - left) = (+3, -2)
    y = op.apply(x, {"top": torch.tensor([top]), "left": torch.tensor([left])})
    assert y[0, 0, 10 + 4 - top, 12 + 4 - left] == 255
    assert int(y.sum()) == 3 * 255
    # zero offset corner: the padding appears on top/left
    y = op.apply(x.fill_(9), {"top": torch.tensor([0]), "left": torch.tensor([0])})
    assert (y[0, :, :4, :] == 0).all() and (y[0, :, :, :4] == 0).all() and (y[0, :, 4:, 4:] == 9).all()


def test_crop_offsets_roughly_uniform():
    op = RandomCrop(32, 4)
    params = op.sample_params(90_000, "cpu", _gen(1))
    for key in ("top", "left"):
        counts = torch.bincount(params[key], minlength=9)
        assert params[key].min() == 0 and params[key].max() == 8
        assert len(counts) == 9
        assert (counts - 10_000).abs().max() < 600  # ~6 standard deviations


def test_crop_p_fraction_leaves_images_unchanged():
    x = _batch(64)
    op = RandomCrop(32, 4, p=0.5)
    params = op.sample_params(64, "cpu", _gen(2))
    y = op.apply(x, params)
    centred = (params["top"] == 4) & (params["left"] == 4)
    for i in range(64):
        if centred[i]:
            assert torch.equal(y[i], x[i])
    assert 5 < int(centred.sum()) < 60


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_params_differ_across_images_and_are_reproducible(name):
    op = ALL_OPS[name]()
    p1 = op.sample_params(64, "cpu", _gen(5))
    p2 = op.sample_params(64, "cpu", _gen(5))
    p3 = op.sample_params(64, "cpu", _gen(6))
    for k in p1:
        assert torch.equal(p1[k], p2[k])
    assert any(not torch.equal(p1[k], p3[k]) for k in p1)
    # per-image randomness: some parameter takes more than one value within the batch
    assert any(torch.unique(v.flatten(1) if v.ndim > 1 else v, dim=0).shape[0] > 1 for v in p1.values())
    x = _batch(64)
    assert torch.equal(op(x, _gen(5)), op(x, _gen(5)))


def test_crop_and_flip_results_differ_per_image():
    x = _batch(1).expand(64, -1, -1, -1).contiguous()
    for op in (RandomCrop(32, 4), HorizontalFlip(0.5)):
        y = op(x, _gen(0))
        assert torch.unique(y.flatten(1), dim=0).shape[0] > 1


def test_flip_frequency_close_to_p():
    for p in (0.2, 0.5, 0.8):
        flip = HorizontalFlip(p).sample_params(100_000, "cpu", _gen(7))["flip"]
        assert abs(flip.float().mean().item() - p) < 0.01


def test_forward_equals_apply_of_sampled_params():
    x = _batch()
    for name, make in ALL_OPS.items():
        op = make()
        kwargs = {"height": 32, "width": 32} if isinstance(op, (RandomCrop, KorniaOp)) else {}
        params = op.sample_params(x.shape[0], x.device, _gen(4), **kwargs)
        assert torch.equal(op(x, _gen(4)), op.apply(x, params)), name


# ----------------------------------------------------------------------------- hand-written colour ops vs torchvision


def test_grayscale_and_autocontrast_match_torchvision():
    x = _batch(4)
    x[1] = 100  # flat image: autocontrast leaves it alone
    on = torch.ones(4, dtype=torch.bool)
    gray = RandomGrayscale().apply(x, {"apply": on})
    auto = RandomAutocontrast().apply(x, {"apply": on})
    for i in range(4):
        assert torch.equal(gray[i], TF.rgb_to_grayscale(x[i], num_output_channels=3))
        assert torch.equal(auto[i], TF.autocontrast(x[i]))
    xf = x.float() / 255
    auto_f = RandomAutocontrast().apply(xf, {"apply": on})
    torch.testing.assert_close(auto_f, torch.stack([TF.autocontrast(v) for v in xf]))


# ----------------------------------------------------------------------------- normalisation and pipeline


def test_normalize_matches_torchvision():
    x = _batch()
    ref = v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(x))
    out = BatchAugment({}, MEAN, STD)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Normalize(MEAN, STD)(x.float() / 255), ref, atol=1e-5, rtol=1e-5)
    cl = BatchAugment({}, MEAN, STD, channels_last=True)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)


def test_batch_augment_equals_sequential_ops():
    x = _batch(32)
    ops = {
        "crop": RandomCrop(32, 4, "reflect"),
        "flip": HorizontalFlip(0.5),
        "crop2": RandomCrop(32, 2, "constant", fill=5),
        "gray": RandomGrayscale(0.3),
        "crop3": RandomCrop(32, 3, "constant", fill=0),
        "flip2": HorizontalFlip(0.5),
        "none": None,
    }
    aug = BatchAugment(ops, MEAN, STD)
    assert list(aug.ops) == ["crop", "flip", "crop2", "gray", "crop3", "flip2"]
    out = aug(x, generator=_gen(11))
    g = _gen(11)
    ref = x
    for op in aug.ops.values():
        ref = op(ref, g)
    torch.testing.assert_close(out, Normalize(MEAN, STD)(ref))
    # sequence form
    seq = BatchAugment(list(aug.ops.values()), MEAN, STD)
    torch.testing.assert_close(seq(x, generator=_gen(11)), out)


def test_batch_augment_fuses_different_fills_correctly():
    x = _batch(16)
    ops = [RandomCrop(32, 4, fill=0), RandomCrop(32, 4, fill=255), HorizontalFlip(0.5)]
    aug = BatchAugment(ops, MEAN, STD)
    g = _gen(12)
    ref = x
    for op in ops:
        ref = op(ref, g)
    torch.testing.assert_close(aug.augment(x, _gen(12)), ref)


def test_batch_augment_set_epoch_and_indices():
    x = _batch(8)
    aug = BatchAugment({"crop": RandomCrop(32, 4), "alt": AlternatingFlip(seed=3)}, MEAN, STD)
    assert aug.requires_indices
    with pytest.raises(ValueError):
        aug(x)
    idx = torch.arange(8)
    aug.set_epoch(0)
    a = aug(x, _gen(0), indices=idx)
    aug.set_epoch(1)
    b = aug(x, _gen(0), indices=idx)
    assert not torch.equal(a, b)
    assert not BatchAugment({"crop": RandomCrop()}, MEAN, STD).requires_indices


def test_to_torchvision_round_trip_p0_p1():
    x = _batch(4)
    for p in (0.0, 1.0):
        ops = {
            "crop": RandomCrop(32, 0, p=p),  # no padding: crop is the identity either way
            "flip": HorizontalFlip(p),
            "gray": RandomGrayscale(p),
            "auto": RandomAutocontrast(p),
            "jitter": ColorJitter(brightness=(1.5, 1.5), p=p),
            "rot": RandomRotation((90, 90), p=p),
        }
        aug = BatchAugment(ops, MEAN, STD)
        batched = aug(x)
        per_image = aug.to_torchvision()
        assert isinstance(per_image, v2.Compose)
        for i in range(4):
            ref = per_image(x[i])
            assert (batched[i] - ref).abs().max() < 1e-4 + 1.01 / (255 * min(STD))
            # the op-level transforms on their own
        for name, op in ops.items():
            t = op.to_torchvision()
            single = torch.stack([t(x[i]) for i in range(4)])
            assert torch.equal(op(x), single), (name, p)


def test_to_torchvision_crop_and_erasing_p0_and_pil_input():
    import PIL.Image

    x = _batch(2)
    for op in (RandomCrop(32, 4, p=0.0), RandomErasing(p=0.0), Cutout(8, p=0.0)):
        t = op.to_torchvision()
        assert torch.equal(t(x[0]), x[0])
    # Cutout has no torchvision counterpart: wrapped, also for PIL input
    t = Cutout(8, p=1.0).to_torchvision()
    assert isinstance(t, BatchOpTransform)
    img = PIL.Image.fromarray(x[0].permute(1, 2, 0).numpy())
    out = t(img)
    assert isinstance(out, PIL.Image.Image) and out.size == (32, 32)
    # full per-image pipeline accepts PIL images
    aug = BatchAugment({"crop": RandomCrop(32, 4), "flip": HorizontalFlip()}, MEAN, STD)
    y = aug.to_torchvision()(img)
    assert y.shape == (3, 32, 32) and y.dtype == torch.float32
    # the wrapped op inside a v2 pipeline (tv_tensors.Image input)
    cut = BatchAugment({"cut": Cutout(64, p=1.0)}, MEAN, STD).to_torchvision()(x[0])
    torch.testing.assert_close(cut, v2.Normalize(MEAN, STD)(torch.zeros(3, 32, 32)))


def test_hydra_style_mapping_is_accepted():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "crop": {"_target_": "cifar_lab.data.augment.RandomCrop", "size": 32, "padding": [4, 4],
                     "padding_mode": "reflect"},
            "flip": {"_target_": "cifar_lab.data.augment.HorizontalFlip", "p": 0.5},
            "gray": None,
            "jitter": {"_target_": "cifar_lab.data.augment.ColorJitter", "brightness": [0.8, 1.2]},
        }
    )
    from hydra.utils import instantiate

    ops = instantiate(cfg)
    aug = BatchAugment(ops, MEAN, STD)
    assert list(aug.ops) == ["crop", "flip", "jitter"]
    assert aug(_batch()).shape == (16, 3, 32, 32)


# ----------------------------------------------------------------------------- alternating flip


def test_alternating_flip_each_image_flipped_in_exactly_one_of_two_epochs():
    n = 1000
    for num_samples in (None, n):
        op = AlternatingFlip(seed=1, num_samples=num_samples)
        idx = torch.randperm(n, generator=_gen(0))
        for epoch in (0, 1, 4):
            op.set_epoch(epoch)
            a = op.sample_params(n, "cpu", indices=idx)["flip"]
            op.set_epoch(epoch + 1)
            b = op.sample_params(n, "cpu", indices=idx)["flip"]
            assert torch.equal(a, ~b)
        op.set_epoch(0)
        base = op.sample_params(n, "cpu", indices=torch.arange(n))["flip"]
        if num_samples is None:
            assert 0.45 < base.float().mean() < 0.55
        else:
            assert int(base.sum()) == n // 2


def test_alternating_flip_is_per_image_and_seeded():
    x = _batch(1).expand(8, -1, -1, -1).contiguous()
    idx = torch.tensor([5, 17, 3, 99, 42, 7, 0, 1])
    op = AlternatingFlip(seed=0)
    y = op(x, indices=idx)
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(8)])
    assert torch.equal(flipped, op.sample_params(8, "cpu", indices=idx)["flip"])
    # same image index, same decision regardless of batch position
    y2 = op(x, indices=idx.flip(0))
    assert torch.equal(y2.flip(0), y)
    a = AlternatingFlip(seed=0).sample_params(500, "cpu", indices=torch.arange(500))["flip"]
    b = AlternatingFlip(seed=1).sample_params(500, "cpu", indices=torch.arange(500))["flip"]
    assert not torch.equal(a, b)
    with pytest.raises(ValueError):
        op(x)
