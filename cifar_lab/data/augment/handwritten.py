"""Colour ops kept hand-written rather than delegated to kornia.

Grayscale and autocontrast are single elementwise passes on the ``uint8`` batch, measured
faster than the kornia versions
(:class:`~cifar_lab.data.augment.kornia_ops.KorniaRandomGrayscale`,
:class:`~cifar_lab.data.augment.kornia_ops.KorniaRandomAutocontrast`), which convert to float
and back around kornia's per-call overhead (``benchmarks/kornia_vs_handwritten.py``,
docs/benchmarks.md). Colour jitter draws and applies per-image orders on the device, which
kornia's (:class:`~cifar_lab.data.augment.kornia_ops.KorniaColorJitter`) cannot do without
reading values back to the host (see :class:`ColorJitter`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from kornia.enhance import adjust_hue
from torch import Tensor
from torchvision.transforms import v2

from cifar_lab.data.augment.base import (
    BatchOp,
    InUnitRange,
    Params,
    _bcast,
    _bernoulli,
    _check_batch,
    _max_value,
    _maybe_random_apply,
    _rand,
    _to_float,
    _uniform,
    from_unit,
    to_unit,
)


def _grayscale(x: Tensor) -> Tensor:
    """Float luma (B, 1, H, W) with torchvision's weights, no rounding."""
    xf = _to_float(x)
    r, g, b = xf.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


class _PerImageCoinOp(BatchOp):
    """An op applied to each image with probability ``p``. Params: ``apply`` (bool (B,))."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def sample_params(self, batch_size, device, generator=None) -> Params:
        return {"apply": _bernoulli(self.p, batch_size, device, generator)}

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RandomGrayscale(_PerImageCoinOp):
    # hand-written: kornia's measured 2.1-2.2x slower (1.16 vs 0.55 ms, batch 128; 5.24 vs 2.34 ms, 512)
    """Converts each image to 3-channel grayscale with probability ``p``
    (torchvision ``rgb_to_grayscale`` weights and ``uint8`` truncation).
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__(p)

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        if x.shape[1] != 3:
            return x
        gray = _grayscale(x).to(x.dtype).expand_as(x)
        return torch.where(_bcast(params["apply"].to(x.device)), gray, x)

    def to_torchvision(self) -> v2.Transform:
        return v2.RandomGrayscale(p=self.p)


class RandomAutocontrast(_PerImageCoinOp):
    # hand-written: kornia's measured 2.7-3.1x slower (2.57 vs 0.83 ms, batch 128; 9.01 vs 3.28 ms, 512)
    """Per-channel autocontrast (stretch min..max to the full range) with
    probability ``p`` per image, as torchvision ``autocontrast``.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        bound = _max_value(x.dtype)
        xf = _to_float(x)
        lo = xf.amin(dim=(2, 3), keepdim=True)
        hi = xf.amax(dim=(2, 3), keepdim=True)
        flat = hi == lo
        inv_scale = torch.where(flat, torch.ones_like(hi), (hi - lo).mul_(1.0 / bound))
        lo = torch.where(flat, torch.zeros_like(lo), lo)
        out = (xf - lo).div_(inv_scale).clamp_(0, bound).to(x.dtype)
        return torch.where(_bcast(params["apply"].to(x.device)), out, x)

    def to_torchvision(self) -> v2.Transform:
        return v2.RandomAutocontrast(p=self.p)



# ----------------------------------------------------------------------------- colour jitter


def _jitter_range(value: Any, name: str, center: float, bound: tuple[float, float]) -> tuple[float, float] | None:
    """torchvision's range for a ColorJitter component; None when it is disabled."""
    if value is None:
        return None
    if isinstance(value, numbers.Number):
        if value < 0:
            raise ValueError(f"{name} must be non-negative")
        if value == 0:
            return None
        lo, hi = center - float(value), center + float(value)
        if name != "hue":
            lo = max(lo, 0.0)
    else:
        lo, hi = (float(v) for v in value)
    if not (bound[0] <= lo <= hi <= bound[1]):
        raise ValueError(f"{name} range {(lo, hi)} outside {bound}")
    if lo == hi == center:
        return None
    return lo, hi


JITTER_COMPONENTS = ("brightness", "contrast", "saturation", "hue")  # the indices of ``order``
JITTER_NEUTRAL = (1.0, 1.0, 1.0, 0.0)  # each component's factor that changes nothing
ORDERS = ("image", "batch")


def _jitter_ranges(brightness: Any, contrast: Any, saturation: Any, hue: Any) -> tuple:
    """The four components' ranges (None: disabled), checked as torchvision does."""
    return (_jitter_range(brightness, "brightness", 1.0, (0.0, math.inf)),
            _jitter_range(contrast, "contrast", 1.0, (0.0, math.inf)),
            _jitter_range(saturation, "saturation", 1.0, (0.0, math.inf)),
            _jitter_range(hue, "hue", 0.0, (-0.5, 0.5)))


def _check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


def _linear_step(x: Tensor, component: Tensor, factor: Tensor, active: Tensor, with_gray: bool,
                 with_mean: bool) -> Tensor:
    """One brightness, contrast or saturation step, chosen per image (``component`` 0, 1, 2; an
    inactive image is left exactly as it is), as torchvision's blends: ``clamp(f * x + (1 - f) * ref)``
    with ``ref`` 0 (brightness), the image's mean luma (contrast) or its luma (saturation)."""
    one = torch.ones_like(factor)
    scale = _bcast(torch.where(active, factor, one))
    if not (with_gray or with_mean):
        return x.mul(scale).clamp_(0.0, 1.0)
    gray = _grayscale(x)  # (B, 1, H, W): the blend target, built at a third of the image's size
    ref = gray.mul(_bcast(torch.where(active & (component == 2), one - factor, 0.0))) if with_gray else None
    if with_mean:
        mean = gray.mean(dim=(1, 2, 3), keepdim=True).mul_(
            _bcast(torch.where(active & (component == 1), one - factor, 0.0)))
        ref = mean if ref is None else ref.add_(mean)
    return torch.addcmul(ref, x, scale).clamp_(0.0, 1.0)


class ColorJitter(BatchOp):
    # hand-written: kornia's reads its parameters back to the host (order.tolist(), a bool per step) and takes one
    # order per batch, so per-image orders need a host-side grouping; KorniaColorJitter measured 40 reads a call at
    # 0.2/0.2/0.2/0 and 148 with hue 0.1 (batch 128), this op none, and 2.6-2.8x faster there (docs/benchmarks.md)
    """Per-image colour jitter with torchvision's semantics, drawn and applied on the device.

    Each image gets its own factors, uniform in the ranges below: brightness
    ``[max(0, 1 - b), 1 + b]`` (or a given ``(min, max)``), likewise contrast and saturation;
    hue ``[-h, h]`` in turns with ``h <= 0.5``. A zero disables a component. Brightness,
    contrast and saturation are torchvision's blends (luma weights 0.2989/0.587/0.114, clamped
    after each step); hue is kornia's HSV shift.

    ``order="image"`` (default, torchvision's behaviour) gives every image its own random order
    of the adjustments; ``order="batch"`` draws one order for the whole batch (factors stay per
    image). Either way the batch takes one pass per enabled brightness/contrast/saturation
    component, each choosing per image which component it applies, and with hue enabled one hue
    pass with those passes split around it (twice as many): no Python branch on drawn values.

    Params: ``brightness_factor``, ``contrast_factor``, ``saturation_factor``, ``hue_factor``
    (float (B,)), ``batch_prob`` (applied, float (B,) of 0/1) and ``order`` (int64 (B, 4): per
    image a permutation of 0..3 = brightness, contrast, saturation, hue).
    """

    def __init__(
        self,
        brightness: float | Sequence[float] = 0.0,
        contrast: float | Sequence[float] = 0.0,
        saturation: float | Sequence[float] = 0.0,
        hue: float | Sequence[float] = 0.0,
        p: float = 1.0,
        order: str = "image",
    ) -> None:
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = float(p)
        self.order = _check_order(order)
        self.brightness, self.contrast, self.saturation, self.hue = _jitter_ranges(brightness, contrast, saturation,
                                                                                   hue)
        # the enabled brightness/contrast/saturation components, a buffer so it moves with the op
        linear = [c for c in range(3) if self.ranges[c] is not None]
        self.register_buffer("linear", torch.tensor(linear, dtype=torch.int64), persistent=False)

    @property
    def ranges(self) -> tuple:
        return self.brightness, self.contrast, self.saturation, self.hue

    def sample_params(self, batch_size, device, generator=None, **_: Any) -> Params:
        params: Params = {}
        for name, bounds, neutral in zip(JITTER_COMPONENTS, self.ranges, JITTER_NEUTRAL):
            params[f"{name}_factor"] = (torch.full((batch_size,), neutral, device=device) if bounds is None
                                        else _uniform(bounds, batch_size, device, generator))
        orders = batch_size if self.order == "image" else 1
        params["order"] = _rand((orders, 4), device, generator).argsort(dim=1).expand(batch_size, 4)
        params["batch_prob"] = _bernoulli(self.p, batch_size, device, generator).to(torch.float32)
        return params

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        if x.shape[1] != 3:
            raise ValueError("ColorJitter expects RGB images")
        xf = to_unit(x).clamp(0.0, 1.0) if x.dtype.is_floating_point else to_unit(x)
        return from_unit(self._jitter(xf, params), x)

    def _jitter(self, xf: Tensor, params: Params) -> Tensor:
        dev, n = xf.device, len(self.linear)
        if not n and self.hue is None:
            return xf
        applied = params["batch_prob"].to(dev) > 0.5
        factors = torch.stack([params[f"{name}_factor"].to(dev, torch.float32) for name in JITTER_COMPONENTS], 1)
        position = params["order"].to(dev).argsort(dim=1)  # (B, 4): where each component comes
        at, rank = position[:, self.linear.to(dev)].sort(dim=1)
        sequence = self.linear.to(dev)[rank]  # (B, n): per image, its enabled linear components in order
        with_gray, with_mean = self.saturation is not None, self.contrast is not None

        def steps(x: Tensor, selected: Tensor) -> Tensor:
            for k in range(n):
                comp = sequence[:, k]
                x = _linear_step(x, comp, factors.gather(1, comp[:, None])[:, 0], applied & selected[:, k],
                                 with_gray, with_mean)
            return x

        if self.hue is None:
            return steps(xf, torch.ones_like(sequence, dtype=torch.bool))
        before_hue = at < position[:, 3:4]
        xf = steps(xf, before_hue)
        hued = adjust_hue(xf, factors[:, 3] * (2 * math.pi))  # kornia's factor is in radians
        xf = torch.where(_bcast(applied), hued, xf)  # a zero shift is not bit-exact through HSV
        return steps(xf, ~before_hue)

    def to_torchvision(self) -> v2.Transform:
        t = v2.ColorJitter(brightness=self.brightness, contrast=self.contrast, saturation=self.saturation,
                           hue=self.hue)
        return _maybe_random_apply(InUnitRange(t), self.p)

    def extra_repr(self) -> str:
        return (f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"hue={self.hue}, p={self.p}, order={self.order!r}")
