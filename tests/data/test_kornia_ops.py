"""Ops delegated to kornia: torchvision equivalence with fixed parameters, per-image draws,
seeding from the datamodule's generator, isolation of the global RNG. The hand-written colour
jitter, which shares kornia's parameters: tests/data/test_color_jitter.py."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cifar_lab.data.augment import (
    BatchAugment,
    ColorJitter,
    Cutout,
    HorizontalFlip,
    KorniaColorJitter,
    KorniaRandomAutocontrast,
    KorniaRandomGrayscale,
    Normalize,
    RandomCrop,
    RandomErasing,
    RandomRotation,
)
from cifar_lab.data.augment.kornia_ops import seeded_rng
from conftest import MEAN, STD
from device_reads import DeviceReads
from conftest import random_images as _batch
from conftest import seeded_generator as _gen


# op -> the kornia parameters that must differ between images of one batch
KORNIA_OPS = {
    "jitter": (lambda: ColorJitter(0.4, 0.4, 0.4, 0.1), ["brightness_factor", "hue_factor", "order"]),
    "jitter_batch_order": (lambda: ColorJitter(0.4, 0.4, 0.4, 0.1, order="batch"), ["saturation_factor"]),
    "kornia_jitter": (lambda: KorniaColorJitter(0.4, 0.4, 0.4, 0.1), ["brightness_factor", "hue_factor", "order"]),
    "kornia_jitter_batch_order": (lambda: KorniaColorJitter(0.4, 0.4, 0.4, 0.1, order="batch"),
                                  ["saturation_factor"]),
    "rotation": (lambda: RandomRotation(20), ["degrees"]),
    "rotation_p": (lambda: RandomRotation(20, p=0.5), ["degrees", "batch_prob"]),
    "cutout": (lambda: Cutout(8), ["xs", "ys"]),
    "erasing": (lambda: RandomErasing(p=1.0), ["xs", "ys", "widths", "heights"]),
    "kornia_grayscale": (lambda: KorniaRandomGrayscale(0.5), ["batch_prob"]),
    "kornia_autocontrast": (lambda: KorniaRandomAutocontrast(0.5), ["batch_prob"]),
}


def _rounded(t, x_uint8: torch.Tensor) -> torch.Tensor:
    """torchvision's transform ``t`` on the [0, 1] float image, rounded back to uint8."""
    return (t(x_uint8.float() / 255) * 255).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- randomness and seeding


@pytest.mark.parametrize("name", sorted(KORNIA_OPS))
def test_kornia_params_differ_per_image(name):
    make, keys = KORNIA_OPS[name]
    params = make().sample_params(64, "cpu", _gen(1))
    for key in keys:
        v = params[key]
        assert torch.unique(v.flatten(1) if v.ndim > 1 else v, dim=0).shape[0] > 1, key


@pytest.mark.parametrize("name", sorted(KORNIA_OPS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_kornia_ops_seeded_by_generator_not_global_rng(name, dtype):
    op = KORNIA_OPS[name][0]()
    x = _batch(32) // 2 + 50  # not the full 0..255 range, which autocontrast would leave alone
    x = x if dtype == torch.uint8 else x.to(dtype) / 255
    torch.manual_seed(0)
    a = op(x, _gen(3))
    state = torch.get_rng_state()
    torch.manual_seed(12345)  # another global state: same output
    b = op(x, _gen(3))
    torch.manual_seed(0)
    c = op(x, _gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # the op left the global RNG where it was
    # results differ per image: the same image repeated comes out in several versions
    same = x[:1].expand(32, -1, -1, -1).contiguous()
    assert torch.unique(op(same, _gen(5)).flatten(1), dim=0).shape[0] > 1


def test_one_seed_drawn_from_the_generator_per_call():
    g = _gen(7)
    KorniaColorJitter(0.4)(_batch(8), g)
    ref = _gen(7)
    torch.randint(0, 2**62, (1,), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_rotation_draws_kornia_parameters_from_the_generator(p):
    """No seed read back: the angles (then the per-image coin) come from the generator itself."""
    op = RandomRotation((-10, 30), p=p)
    params = op.sample_params(16, "cpu", _gen(7), height=24, width=20)
    ref = _gen(7)
    torch.testing.assert_close(params["degrees"], torch.rand(16, generator=ref) * 40 - 10)
    applied = torch.rand(16, generator=ref) < p if p < 1 else torch.ones(16, dtype=torch.bool)
    assert torch.equal(params["batch_prob"], applied.float())
    assert params["forward_input_shape"].tolist() == [16, 3, 24, 20]
    x = _batch(16, h=24, w=20)
    reads = DeviceReads()
    reads.recording = True
    with reads:
        op(x, _gen(7))
    assert reads.reads == []


def test_uint8_path_is_the_float_path_rounded():
    x = _batch(16)
    for make, _ in KORNIA_OPS.values():
        op = make()
        params = op.sample_params(16, "cpu", _gen(2))
        ref = (op.apply(x.float() / 255, params) * 255).round().to(torch.uint8)
        if isinstance(op, (Cutout, RandomErasing)):  # filled in the input's own dtype
            ref = op.apply(x, params)
        assert torch.equal(op.apply(x, params), ref), type(op).__name__


def test_seeded_rng_restores_and_seeds():
    before = torch.get_rng_state()
    with seeded_rng(5, "cpu"):
        a = torch.rand(3)
    with seeded_rng(5, "cpu"):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)
    with seeded_rng(None, "cpu"):
        torch.rand(10)
    assert torch.equal(torch.get_rng_state(), before)


def test_kornia_ops_in_batch_augment_equal_sequential_ops():
    x = _batch(32)
    ops = {"crop": RandomCrop(32, 4), "flip": HorizontalFlip(0.5), "jitter": ColorJitter(0.3, 0.3),
           "rot": RandomRotation(10), "crop2": RandomCrop(32, 2), "cut": Cutout(6)}
    aug = BatchAugment(ops, MEAN, STD)
    out = aug(x, generator=_gen(11))
    g = _gen(11)
    ref = x
    for op in aug.ops.values():
        ref = op(ref, g)
    torch.testing.assert_close(out, Normalize(MEAN, STD)(ref))
    assert torch.equal(aug(x, generator=_gen(11)), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kornia_op_on_gpu_is_seeded():
    x = _batch(32).cuda()
    for make, _ in KORNIA_OPS.values():
        op = make().cuda()
        g1, g2 = (torch.Generator(device="cuda").manual_seed(3) for _ in range(2))
        cuda_state = torch.cuda.get_rng_state()
        a, b = op(x, g1), op(x, g2)
        assert a.device == x.device and torch.equal(a, b)
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


# ----------------------------------------------------------------------------- rotation vs torchvision


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("fill", [0, (10, 20, 30)])
def test_rotation_fixed_angles_match_torchvision(interpolation, fill):
    x = _batch(5)
    angles = torch.tensor([90.0, -90.0, 30.0, -12.5, 180.0])
    op = RandomRotation(0, interpolation=interpolation, fill=fill)
    y = op.apply(x, {"degrees": angles, "batch_prob": torch.ones(5)})
    mode = TF.InterpolationMode.NEAREST if interpolation == "nearest" else TF.InterpolationMode.BILINEAR
    tv_fill = list(fill) if isinstance(fill, tuple) else fill
    for i in range(5):
        ref = TF.rotate(x[i], float(angles[i]), interpolation=mode, fill=tv_fill)
        assert (y[i].int() - ref.int()).abs().max() <= 1
        assert (y[i] != ref).float().mean() < 0.01
    # 90 degrees counter-clockwise on a square image is torch.rot90
    assert torch.equal(y[0], torch.rot90(x[0], 1, dims=(-2, -1)))
    # float input: fill in [0, 1]
    xf = x.float() / 255
    fill_f = fill / 255 if isinstance(fill, int) else tuple(v / 255 for v in fill)
    yf = RandomRotation(0, interpolation=interpolation, fill=fill_f).apply(
        xf, {"degrees": angles, "batch_prob": torch.ones(5)})
    for i in range(5):
        ref = TF.rotate(xf[i], float(angles[i]), interpolation=mode, fill=list(fill_f) if isinstance(fill_f, tuple)
                        else fill_f)
        torch.testing.assert_close(yf[i], ref, atol=1e-5, rtol=0)


def test_rotation_angles_uniform_in_range_and_p():
    op = RandomRotation((-10, 30), p=0.5)
    params = op.sample_params(20_000, "cpu", _gen(1))
    deg = params["degrees"]
    assert -10 <= deg.min() < -9 and 29 < deg.max() <= 30
    assert abs(params["batch_prob"].float().mean().item() - 0.5) < 0.02
    x = _batch(64)
    y = op.apply(x, params=op.sample_params(64, "cpu", _gen(2)))
    kept = (y == x).flatten(1).all(1)
    assert 10 < int(kept.sum()) < 54  # about half left as they are


# ----------------------------------------------------------------------------- erasing


def test_erasing_boxes_match_torchvision_erase():
    x = _batch(32)
    op = RandomErasing(p=1.0, value=(1, 2, 3))
    params = op.sample_params(32, "cpu", _gen(8), height=32, width=32)
    y = op.apply(x, params)
    top, left = params["ys"].long(), params["xs"].long()
    h, w = params["heights"].long(), params["widths"].long()
    applied = params["batch_prob"].bool()
    area = (h * w).float() / (32 * 32)
    assert ((area >= 0.015) & (area <= 0.36) | ~applied).all()
    assert ((top + h <= 32) & (left + w <= 32)).all()  # the box lies inside the image
    val = torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)
    for i in range(32):
        if not applied[i]:
            assert torch.equal(y[i], x[i])
            continue
        t, l = int(top[i]), int(left[i])
        ref = TF.erase(x[i], t, l, int(h[i]), int(w[i]), val.expand(3, int(h[i]), int(w[i])))
        assert torch.equal(y[i], ref)


def test_cutout_box_is_clipped_square():
    x = torch.full((512, 3, 32, 32), 200, dtype=torch.uint8)
    y = Cutout(8)(x, _gen(9))
    erased = (y == 0).all(dim=1)  # (B, H, W)
    sizes = erased.flatten(1).sum(1)
    assert sizes.max() == 64 and sizes.min() > 0
    assert (sizes < 64).any()  # some boxes clipped at the border
    assert ((y == 0) | (y == 200)).all()


def test_cutout_centres_cover_every_pixel_uniformly():
    op = Cutout(8)
    params = op.sample_params(90_000, "cpu", _gen(1))
    # the box's corner in the image padded by size // 2 is its centre pixel in the image
    for key in ("xs", "ys"):
        counts = torch.bincount(params[key].long(), minlength=32)
        assert len(counts) == 32 and params[key].min() == 0
        assert (counts - 90_000 / 32).abs().max() < 6 * (90_000 / 32) ** 0.5
    assert (params["widths"] == 8).all() and (params["heights"] == 8).all()
    # odd size, fill per channel, float input, size 0
    x = torch.full((64, 3, 32, 32), 0.5)
    y = Cutout(5, fill=(0.1, 0.2, 0.3))(x, _gen(2))
    assert (y[:, 0] != 0.5).flatten(1).sum(1).max() == 25
    assert torch.equal(Cutout(0)(x, _gen(3)), x)
