"""Colour jitter: the hand-written on-device op (the default) and kornia's (KorniaColorJitter).

Both take kornia's parameter dict. The hand-written op is checked against torchvision's
per-image chain in each image's drawn order (its reference), for its parameter distributions,
and for reading nothing back from the device.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cifar_lab.data.augment import ColorJitter, KorniaColorJitter
from conftest import random_images as _batch
from conftest import seeded_generator as _gen
from device_reads import DeviceReads

JITTERS = [ColorJitter, KorniaColorJitter]
ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)  # the order's indices
FACTORS = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
SETTINGS = {  # (brightness, contrast, saturation, hue, p)
    "all": (0.4, 0.4, 0.4, 0.1, 1.0),
    "all_p": (0.4, 0.4, 0.4, 0.1, 0.6),
    "no_hue": (0.2, 0.2, 0.2, 0.0, 1.0),  # conv_block_net
    "squeezenet": (0.2, 0.2, 0.2, 0.1, 1.0),
    "brightness": (0.5, 0.0, 0.0, 0.0, 1.0),
    "contrast": (0.0, 0.5, 0.0, 0.0, 1.0),
    "saturation": (0.0, 0.0, 0.5, 0.0, 0.7),
    "hue": (0.0, 0.0, 0.0, 0.3, 1.0),
    "brightness_saturation_hue": ((0.1, 1.9), 0.0, (0.0, 2.0), 0.5, 1.0),
}


def _rounded(t, x_uint8: torch.Tensor) -> torch.Tensor:
    """torchvision's transform ``t`` on the [0, 1] float image, rounded back to uint8."""
    return (t(x_uint8.float() / 255) * 255).round().clamp(0, 255).to(torch.uint8)


def _torchvision_chain(op: ColorJitter, params: dict, i: int):
    """Image ``i``'s adjustments as torchvision applies them, in the image's own order."""
    def chain(v: torch.Tensor) -> torch.Tensor:
        if params["batch_prob"][i] < 0.5:
            return v
        for comp in params["order"][i].tolist():
            if op.ranges[comp] is not None:
                v = ADJUST[comp](v, float(params[FACTORS[comp]][i]))
        return v
    return chain


# ----------------------------------------------------------------------------- the hand-written op


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_jitter_equals_torchvision_per_image_in_each_images_order(name):
    *ranges, p = SETTINGS[name]
    op = ColorJitter(*ranges, p=p)
    x = _batch(48, seed=1)
    params = op.sample_params(48, "cpu", _gen(4))
    if op.order == "image" and sum(r is not None for r in op.ranges) > 1:
        assert torch.unique(params["order"], dim=0).shape[0] > 1
    xf = x.float() / 255
    y = op.apply(xf, params)
    ref = torch.stack([_torchvision_chain(op, params, i)(xf[i]) for i in range(48)])
    # the same formulas and luma weights as torchvision; hue goes through kornia's HSV (within 1e-5)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    # uint8: torchvision's float chain rounded once at the end (float rounding may flip a level)
    y8 = op.apply(x, params)
    rounded = torch.stack([_rounded(_torchvision_chain(op, params, i), x[i]) for i in range(48)])
    assert (y8.int() - rounded.int()).abs().max() <= 1
    assert (y8 != rounded).float().mean() < 1e-3


def test_images_left_out_are_unchanged_bit_for_bit():
    op = ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.5)
    x = _batch(64, seed=2)
    params = op.sample_params(64, "cpu", _gen(1))
    skipped = params["batch_prob"] < 0.5
    assert 10 < int(skipped.sum()) < 54
    assert torch.equal(op.apply(x, params)[skipped], x[skipped])
    xf = x.float() / 255
    assert torch.equal(op.apply(xf, params)[skipped], xf[skipped])
    # and a neutral factor leaves an image as it is: brightness 1 alone is the identity
    neutral = {**params, "brightness_factor": torch.ones(64)}
    assert torch.equal(ColorJitter(brightness=0.4).apply(x, neutral), x)


@pytest.mark.parametrize("order", ["image", "batch"])
def test_parameter_distributions(order):
    op = ColorJitter(brightness=0.2, contrast=(0.5, 1.5), saturation=0.0, hue=0.1, p=0.3, order=order)
    n = 24_000
    params = op.sample_params(n, "cpu", _gen(0))
    assert abs(params["batch_prob"].mean().item() - 0.3) < 0.02
    assert set(params["batch_prob"].unique().tolist()) == {0.0, 1.0}
    for key, (lo, hi) in (("brightness_factor", (0.8, 1.2)), ("contrast_factor", (0.5, 1.5)),
                          ("hue_factor", (-0.1, 0.1))):
        v = params[key]
        assert lo <= v.min() < lo + 0.001 and hi - 0.001 < v.max() <= hi, key
        counts = torch.histc(v, bins=10, min=lo, max=hi)  # uniform: a tenth in each bin
        assert (counts - n / 10).abs().max() < 5 * (n / 10) ** 0.5, key
    assert torch.equal(params["saturation_factor"], torch.ones(n))  # disabled: neutral
    orders = params["order"]
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand(n, 4))
    if order == "batch":
        assert (orders == orders[0]).all()
    else:  # each of the 24 permutations equally often
        codes = (orders * torch.tensor([64, 16, 4, 1])).sum(1)
        counts = torch.stack([(codes == sum(a * b for a, b in zip(perm, (64, 16, 4, 1)))).sum()
                              for perm in itertools.permutations(range(4))])
        assert (counts - n / 24).abs().max() < 5 * (n / 24) ** 0.5


def test_parameters_come_from_the_generator_in_a_fixed_order():
    op = ColorJitter(brightness=0.2, hue=0.1, p=0.5)
    params = op.sample_params(8, "cpu", _gen(3))
    ref = _gen(3)
    torch.testing.assert_close(params["brightness_factor"], torch.rand(8, generator=ref) * 0.4 + 0.8)
    torch.testing.assert_close(params["hue_factor"], torch.rand(8, generator=ref) * 0.2 - 0.1)
    assert torch.equal(params["order"], torch.rand(8, 4, generator=ref).argsort(dim=1))
    assert torch.equal(params["batch_prob"], (torch.rand(8, generator=ref) < 0.5).float())


@pytest.mark.parametrize("name", ["all_p", "no_hue", "squeezenet", "hue"])
def test_jitter_reads_nothing_back_from_the_device(name):
    *ranges, p = SETTINGS[name]
    for order in ("image", "batch"):
        op = ColorJitter(*ranges, p=p, order=order)
        x = _batch(32)
        reads = DeviceReads()
        reads.recording = True
        with reads:
            op(x, _gen(0))
            op(x.float() / 255, _gen(1))
        assert reads.reads == [], (order, reads.reads)


# ----------------------------------------------------------------------------- both ops


@pytest.mark.parametrize("jitter", JITTERS)
def test_color_adjustments_match_torchvision_with_fixed_factors(jitter):
    x = _batch(6)
    factors = torch.tensor([0.0, 0.5, 0.9, 1.0, 1.3, 1.8])
    hues = torch.tensor([-0.5, -0.2, 0.0, 0.05, 0.3, 0.5])
    ones, zeros = torch.ones(6), torch.zeros(6)
    identity = torch.arange(4).expand(6, 4)
    # kornia's grayscale weights (0.299, 0.587, 0.114) differ from torchvision's 0.2989 in
    # the red weight: its contrast (the image's mean gray) and saturation (blend with the gray
    # image) differ by up to 1e-4 of the range (0.03 of a uint8 level); the hand-written op uses
    # torchvision's weights. Brightness and hue stay within 1e-5 in both.
    float_atol = {"brightness": 1e-5, "contrast": 1.5e-4, "saturation": 1.5e-4, "hue": 1e-5}
    if jitter is ColorJitter:
        float_atol.update(contrast=1e-6, saturation=1e-6)
    for comp, fn in zip(float_atol, ADJUST):
        values = hues if comp == "hue" else factors
        op = jitter(**{comp: 0.5})
        params = {"brightness_factor": ones, "contrast_factor": ones, "saturation_factor": ones,
                  "hue_factor": zeros, f"{comp}_factor": values, "order": identity, "batch_prob": ones}
        for xx in (x, x.float() / 255):
            y = op.apply(xx, params)
            ref = torch.stack([fn(xx[i], float(values[i])) for i in range(6)])
            if xx.dtype == torch.uint8:
                # within one level of torchvision's uint8 path (which truncates) ...
                assert (y.int() - ref.int()).abs().max() <= 1, comp
                # ... and torchvision's float result rounded, as the batched op converts back
                rounded = torch.stack([_rounded(lambda v, i=i: fn(v, float(values[i])), xx[i]) for i in range(6)])
                assert (y.int() - rounded.int()).abs().max() <= 1, comp
                assert (y != rounded).float().mean() < 0.01, comp
            else:
                torch.testing.assert_close(y, ref, atol=float_atol[comp], rtol=0), comp


@pytest.mark.parametrize("jitter", JITTERS)
def test_color_jitter_order_is_per_image(jitter):
    x = _batch(2)
    op = jitter(brightness=0.5, saturation=0.5)
    b, s = torch.tensor([1.4, 1.4]), torch.tensor([0.3, 0.3])
    order = torch.tensor([[0, 2, 1, 3], [2, 0, 1, 3]])  # image 0: brightness first
    params = {"brightness_factor": b, "contrast_factor": torch.ones(2), "saturation_factor": s,
              "hue_factor": torch.zeros(2), "order": order, "batch_prob": torch.ones(2)}
    y = op.apply(x, params)
    # torchvision's chain on the float image, rounded once at the end as the batched op does
    # (its uint8 chain truncates after every step, up to 2 levels below)
    ref0 = _rounded(lambda v: TF.adjust_saturation(TF.adjust_brightness(v, 1.4), 0.3), x[0])
    ref1 = _rounded(lambda v: TF.adjust_brightness(TF.adjust_saturation(v, 0.3), 1.4), x[1])
    assert (y[0].int() - ref0.int()).abs().max() <= 1
    assert (y[1].int() - ref1.int()).abs().max() <= 1
    # the order matters for these factors: one shared order would not give both
    assert not torch.equal(op.apply(x, {**params, "order": order[:1].expand(2, 4)}), y)


@pytest.mark.parametrize("jitter", JITTERS)
def test_color_jitter_batch_order_equals_image_order_with_shared_order(jitter):
    x = _batch(16)
    op_img = jitter(0.4, 0.4, 0.4, 0.1, p=0.7)
    op_batch = jitter(0.4, 0.4, 0.4, 0.1, p=0.7, order="batch")
    params = op_batch.sample_params(16, "cpu", _gen(3))
    assert (params["order"] == params["order"][0]).all()
    assert torch.unique(params["brightness_factor"]).numel() > 1
    assert torch.equal(op_batch.apply(x, params), op_img.apply(x, params))
    # per-image orders: the image order draws several
    orders = op_img.sample_params(16, "cpu", _gen(3))["order"]
    assert torch.unique(orders, dim=0).shape[0] > 1
    assert sorted(orders[0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("jitter, hue", [(ColorJitter, 0.0), (ColorJitter, 0.1), (KorniaColorJitter, 0.0)])
def test_color_jitter_batch_runs_equal_image_by_image_runs(jitter, hue):
    # kornia's with hue off: orders that differ only in hue share a run
    op = jitter(0.4, 0.4, 0.4, hue, p=0.8)
    x = _batch(24)
    params = op.sample_params(24, "cpu", _gen(6))
    y = op.apply(x, params)
    for i in range(24):
        single = {k: v if k == "forward_input_shape" else v[i:i + 1] for k, v in params.items()}
        assert torch.equal(op.apply(x[i:i + 1], single), y[i:i + 1]), i


@pytest.mark.parametrize("jitter", JITTERS)
def test_color_jitter_probability_and_ranges(jitter):
    op = jitter(brightness=0.2, hue=0.1, p=0.3)
    assert op.brightness == (0.8, 1.2) and op.hue == (-0.1, 0.1) and op.contrast is None
    params = op.sample_params(20_000, "cpu", _gen(0))
    applied = params["batch_prob"].float().mean().item()
    assert abs(applied - 0.3) < 0.02
    assert 0.8 <= params["brightness_factor"].min() and params["brightness_factor"].max() <= 1.2
    with pytest.raises(ValueError):
        jitter(hue=0.7)
    with pytest.raises(ValueError):
        jitter(order="sometimes")
    with pytest.raises(ValueError):
        jitter(brightness=0.2, p=1.5)
