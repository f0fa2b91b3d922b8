"""Ops delegated to ``kornia.augmentation``: per-image parameters, drawn and applied on the device.

kornia draws its random numbers from the global RNG. To make the draws reproducible from
the ``generator`` the datamodule passes (and whose state a checkpoint saves for an exact
mid-epoch resume), an op either draws kornia's parameters itself from ``generator`` on the
device (:class:`RandomRotation`: nothing is read back to the host), or draws ONE seed from
``generator`` and runs kornia's sampling under :func:`seeded_rng`: the global RNGs of the CPU
and of the batch's device are forked, seeded with that seed, and restored afterwards, so the
same generator state gives the same output, and the global RNG (dropout, weight init) is left
untouched. Reading that seed is a host synchronisation on an accelerator. Without a
generator, kornia draws from the global RNG as usual.

kornia works on float images in [0, 1]: ``uint8`` batches are converted to ``float32 / 255``
and back with rounding (torchvision's own ``uint8`` colour ops truncate instead, so results
may differ from them by one level). Float batches are passed through as they are.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import kornia.augmentation as K
import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from cifar_lab.data.augment.base import (
    BatchOp,
    BatchOpTransform,
    InUnitRange,
    Params,
    _bernoulli,
    _check_batch,
    _fill_list,
    _fill_tensor,
    _max_value,
    _maybe_random_apply,
    _tv_fill,
    _uniform,
    from_unit,
    to_unit,
)
from cifar_lab.data.augment.handwritten import JITTER_COMPONENTS, JITTER_NEUTRAL, _check_order, _jitter_ranges

__all__ = [
    "seeded_rng",
    "to_unit",
    "from_unit",
    "KorniaOp",
    "KorniaColorJitter",
    "RandomRotation",
    "Cutout",
    "RandomErasing",
    "KorniaRandomGrayscale",
    "KorniaRandomAutocontrast",
]


# ----------------------------------------------------------------------------- seeding


def draw_seed(generator: torch.Generator | None) -> int | None:
    """One seed for kornia's draws from ``generator`` (None without a generator).

    Reading it back is a host synchronisation when ``generator`` lives on an accelerator.
    """
    if generator is None:
        return None
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device | str) -> Iterator[None]:
    """Runs the body with the global RNGs of the CPU and of ``device`` seeded with ``seed``,
    and restores both afterwards. ``seed=None`` only isolates: the body's draws continue the
    current states, which are restored afterwards all the same."""
    device = torch.device(device)
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is None:
        forked, device_type = [], "cuda"  # fork_rng: no accelerator state to keep
    else:
        index = device.index if device.index is not None else getattr(backend, "current_device", lambda: 0)()
        forked, device_type = [index], device.type
    with torch.random.fork_rng(devices=forked, device_type=device_type):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            if backend is not None and hasattr(backend, "device"):
                with backend.device(forked[0]):
                    backend.manual_seed(seed)  # this device only, not every accelerator
            elif backend is not None:
                backend.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- per-image runs


def _slice_params(params: Params, index: Tensor, batch_size: int) -> Params:
    """The per-image entries of ``params`` for the images ``index`` (other entries as they are)."""
    out: Params = {}
    for key, value in params.items():
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch_size and key != "forward_input_shape":
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- base


class KorniaOp(BatchOp):
    """A batched op computed by a ``kornia.augmentation`` module (``self.kornia``).

    ``sample_params(batch_size, device, generator, height=32, width=32, channels=3)`` returns
    kornia's own parameter dict (``batch_prob`` is the per-image "applied" flag);
    ``apply(x, params)`` runs kornia with those parameters on ``x`` converted to [0, 1].
    """

    kornia: K.AugmentationBase2D

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = float(p)

    def sample_params(self, batch_size, device, generator=None, *, height: int = 32, width: int = 32,
                      channels: int = 3) -> Params:
        with seeded_rng(draw_seed(generator), device):
            params = self.kornia.forward_parameters((batch_size, channels, height, width))
            return self._extra_params(dict(params), batch_size)

    def _extra_params(self, params: Params, batch_size: int) -> Params:
        """Draws of the op itself, made inside the seeded RNG after kornia's."""
        return params

    def _run(self, xf: Tensor, params: Params, value_scale: float) -> Tensor:
        """kornia on a [0, 1] float batch; ``value_scale`` maps the input's value range
        (fill values) to [0, 1]."""
        return self.kornia(xf, params=dict(params))

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        if x.shape[0] == 0:
            return x.clone()
        with seeded_rng(None, x.device):  # kornia must not advance the global RNG
            return from_unit(self._run(to_unit(x), params, 1.0 / _max_value(x.dtype)), x)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        B, C, H, W = x.shape
        return self.apply(x, self.sample_params(B, x.device, generator, height=H, width=W, channels=C))

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ----------------------------------------------------------------------------- colour


class KorniaColorJitter(KorniaOp):
    # kornia: 0.4-1.0x the time of the first hand-written op (docs/benchmarks.md), but it reads values back to the
    # host on every call: the default ColorJitter is the hand-written one (see its comment)
    """Per-image colour jitter (``kornia.augmentation.ColorJitter``, torchvision's semantics).

    Each image gets its own factors, uniform in the ranges below: brightness
    ``[max(0, 1 - b), 1 + b]`` (or a given ``(min, max)``), likewise contrast and saturation;
    hue ``[-h, h]`` with ``h <= 0.5``. A zero disables a component.

    ``order="image"`` (default, torchvision's behaviour) gives every image its own random
    order of the adjustments: kornia runs once per distinct order in the batch (at most 24
    with all four enabled, 6 with three), grouped on the host.
    ``order="batch"`` uses one order for the whole batch (factors stay per image): one run.

    Params: kornia's ``brightness_factor``, ``contrast_factor``, ``saturation_factor``,
    ``hue_factor`` (float (B,)), ``batch_prob`` (applied, (B,)) and ``order`` (int64 (B, 4):
    per image a permutation of 0..3 = brightness, contrast, saturation, hue).
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
        super().__init__(p)
        self.order = _check_order(order)
        self.brightness, self.contrast, self.saturation, self.hue = _jitter_ranges(brightness, contrast, saturation,
                                                                                   hue)
        ranges = {name: bounds or (neutral, neutral) for name, bounds, neutral in
                  zip(JITTER_COMPONENTS, (self.brightness, self.contrast, self.saturation, self.hue), JITTER_NEUTRAL)}
        self.kornia = K.ColorJitter(**ranges, p=self.p)

    def _extra_params(self, params: Params, batch_size: int) -> Params:
        if self.order == "image":
            params["order"] = torch.rand(batch_size, 4).argsort(dim=1)
        else:
            params["order"] = params["order"].view(1, 4).expand(batch_size, 4)
        return params

    def _run(self, xf: Tensor, params: Params, value_scale: float) -> Tensor:
        if xf.shape[1] != 3:
            raise ValueError("KorniaColorJitter expects RGB images")
        B = xf.shape[0]
        order = params["order"].to("cpu")
        if (order == order[0]).all():
            return self.kornia(xf, params={**params, "order": order[0]})
        # one kornia run per distinct order of the enabled adjustments (kornia skips the
        # others), each on the images that drew it: at most n! runs for n enabled
        enabled = [i for i, r in enumerate((self.brightness, self.contrast, self.saturation, self.hue)) if r]
        relative = order.argsort(dim=1)[:, enabled].argsort(dim=1)  # order among the enabled ones
        key = (relative * len(enabled) ** torch.arange(len(enabled))).sum(dim=1)
        out = torch.empty_like(xf)
        for k in key.unique().tolist():
            index = torch.nonzero(key == k).flatten()
            sub = _slice_params(params, index, B)
            sub["order"] = order[index[0]]
            index = index.to(xf.device)
            out[index] = self.kornia(xf[index], params=sub)
        return out

    def to_torchvision(self) -> v2.Transform:
        t = v2.ColorJitter(brightness=self.brightness, contrast=self.contrast, saturation=self.saturation,
                           hue=self.hue)
        return _maybe_random_apply(InUnitRange(t), self.p)

    def extra_repr(self) -> str:
        return (f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"hue={self.hue}, p={self.p}, order={self.order!r}")


class KorniaRandomGrayscale(KorniaOp):
    """``kornia.augmentation.RandomGrayscale`` with probability ``p`` per image. The default
    ``RandomGrayscale`` is the hand-written one (faster, see its comment)."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__(p)
        self.kornia = K.RandomGrayscale(p=self.p)

    def to_torchvision(self) -> v2.Transform:
        return v2.RandomGrayscale(p=self.p)


class KorniaRandomAutocontrast(KorniaOp):
    """``kornia.augmentation.RandomAutoContrast`` with probability ``p`` per image. The default
    ``RandomAutocontrast`` is the hand-written one (faster, see its comment)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        self.kornia = K.RandomAutoContrast(p=self.p)

    def to_torchvision(self) -> v2.Transform:
        return v2.RandomAutocontrast(p=self.p)


# ----------------------------------------------------------------------------- geometry


class RandomRotation(KorniaOp):
    # kornia: 0.9-1.1x the time of the former hand-written op (docs/benchmarks.md)
    """Rotates each image by an angle uniform in ``degrees`` (counter-clockwise positive,
    about the image centre, same size) with ``kornia.augmentation.RandomRotation``; the
    area outside the rotated image gets ``fill``, blended as torchvision ``rotate`` does.

    Args:
        degrees: ``d`` for ``[-d, d]`` or ``(min, max)``.
        p: probability per image.
        interpolation: "nearest" (torchvision's default) or "bilinear".
        fill: value of the area outside the rotated image (input value range).

    Params: kornia's ``degrees`` (float (B,)) and ``batch_prob`` (applied, (B,)).
    """

    def __init__(
        self,
        degrees: float | Sequence[float] = 15.0,
        p: float = 1.0,
        interpolation: str = "nearest",
        fill: float | Sequence[float] = 0,
    ) -> None:
        super().__init__(p)
        if isinstance(degrees, numbers.Number):
            if degrees < 0:
                raise ValueError("degrees must be non-negative")
            self.degrees = (-float(degrees), float(degrees))
        else:
            lo, hi = (float(v) for v in degrees)
            self.degrees = (lo, hi)
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        self.interpolation = interpolation
        self.fill = fill if isinstance(fill, numbers.Number) else tuple(fill)
        self.kornia = K.RandomRotation(self.degrees, resample=interpolation, align_corners=False, p=self.p)

    def sample_params(self, batch_size, device, generator=None, *, height: int = 32, width: int = 32,
                      channels: int = 3) -> Params:
        # kornia's own draws, but from ``generator`` on the device: seeding kornia would read a seed back
        return {"degrees": _uniform(self.degrees, batch_size, device, generator),
                "batch_prob": _bernoulli(self.p, batch_size, device, generator).to(torch.float32),
                "forward_input_shape": torch.tensor([batch_size, channels, height, width])}

    def _run(self, xf: Tensor, params: Params, value_scale: float) -> Tensor:
        fill = _fill_list(self.fill)
        # torchvision blends bilinear borders with the in-image weight (a rotated channel of
        # ones) for any fill; for nearest, a zero fill is already kornia's zero padding
        if self.interpolation == "nearest" and not any(fill):
            return self.kornia(xf, params=dict(params))
        C = xf.shape[1]
        ones = torch.ones_like(xf[:, :1])
        out = self.kornia(torch.cat([xf, ones], dim=1), params=dict(params))
        out, mask = out[:, :C], out[:, C:]
        fill_t = torch.tensor(fill, dtype=out.dtype, device=out.device).view(1, -1, 1, 1) * value_scale
        if self.interpolation == "nearest":
            return torch.where(mask < 0.5, fill_t.expand_as(out), out)
        return out.mul_(mask).add_(fill_t * (1.0 - mask))

    def to_torchvision(self) -> v2.Transform:
        interp = v2.InterpolationMode.NEAREST if self.interpolation == "nearest" else v2.InterpolationMode.BILINEAR
        t = v2.RandomRotation(degrees=self.degrees, interpolation=interp, fill=_tv_fill(self.fill))
        return _maybe_random_apply(t, self.p)

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, p={self.p}, interpolation={self.interpolation!r}"


# ----------------------------------------------------------------------------- erasing


class _ErasingOp(KorniaOp):
    """Erases a kornia ``RandomErasing`` box per image with a (per-channel) fill value.

    kornia draws the box and computes its mask on a one-channel image of ones; the
    input itself is filled in its own dtype (no float round trip).
    """

    fill_value: Any = 0

    def _mask(self, params: Params, x: Tensor) -> Tensor:
        """(B, 1, H, W) bool, True inside each image's erased box."""
        ones = torch.ones_like(x[:, :1], dtype=torch.float32)
        return self.kornia(ones, params=dict(params)) == 0

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        if x.shape[0] == 0:
            return x.clone()
        with seeded_rng(None, x.device):
            mask = self._mask(params, x)
        return torch.where(mask, _fill_tensor(self.fill_value, x), x)


class Cutout(_ErasingOp):
    # kornia, though 2.4-2.7x slower than the former hand-written op (1.6 vs 0.6 ms, batch 128): no recipe uses it
    """Cutout: a ``size x size`` square, centred at a uniform random pixel and clipped at the
    borders, is set to ``fill`` (per image, probability ``p``).

    kornia's ``RandomErasing`` places a whole ``size x size`` box uniformly inside the image
    padded by ``size // 2`` (top/left) and ``size - 1 - size // 2`` (bottom/right), i.e. at
    every centre pixel of the image; the box's part inside the image is erased.

    Params: kornia's ``xs``, ``ys`` (box corner in the padded image), ``widths``,
    ``heights``, ``batch_prob``.
    """

    def __init__(self, size: int = 8, p: float = 1.0, fill: float | Sequence[float] = 0) -> None:
        super().__init__(p)
        if int(size) < 0:
            raise ValueError("size must be non-negative")
        self.size = int(size)
        self.fill = fill if isinstance(fill, numbers.Number) else tuple(fill)
        self.fill_value = self.fill
        self.erasers = nn.ModuleDict()  # one kornia eraser per padded image size

    def _padded(self, height: int, width: int) -> tuple[int, int]:
        return height + self.size - 1, width + self.size - 1

    def _eraser(self, height: int, width: int, device) -> K.RandomErasing:
        """kornia's eraser of a whole ``size x size`` box in the padded image."""
        ph, pw = self._padded(height, width)
        key = f"{ph}x{pw}"
        if key not in self.erasers:
            scale = self.size**2 / (ph * pw)
            self.erasers[key] = K.RandomErasing(scale=(scale, scale), ratio=(1.0, 1.0), value=0.0, p=self.p)
        return self.erasers[key].to(device)

    def sample_params(self, batch_size, device, generator=None, *, height: int = 32, width: int = 32,
                      channels: int = 3) -> Params:
        if self.size == 0:
            return {"batch_prob": torch.zeros(batch_size, device=device)}
        eraser = self._eraser(height, width, device)
        with seeded_rng(draw_seed(generator), device):
            return dict(eraser.forward_parameters((batch_size, 1, *self._padded(height, width))))

    def _mask(self, params: Params, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        if self.size == 0:
            return torch.zeros((B, 1, H, W), dtype=torch.bool, device=x.device)
        ph, pw = self._padded(H, W)
        ones = torch.ones((B, 1, ph, pw), device=x.device)
        top = left = self.size // 2
        erased = self._eraser(H, W, x.device)(ones, params=dict(params)) == 0
        return erased[:, :, top:top + H, left:left + W]

    def to_torchvision(self) -> v2.Transform:
        """No torchvision counterpart: wraps this op for single images."""
        return BatchOpTransform(self)

    def extra_repr(self) -> str:
        return f"size={self.size}, p={self.p}"


class RandomErasing(_ErasingOp):
    # kornia, though 1.9-2.0x slower than the former hand-written op (1.4 vs 0.7 ms, batch 128): no recipe uses it
    """Random erasing (``kornia.augmentation.RandomErasing``), per image with probability ``p``.

    kornia draws an area fraction in ``scale`` and an aspect ratio (height / width) in
    ``ratio`` (a fair coin picks ``[ratio[0], 1]`` or ``[1, ratio[1]]`` when the range
    straddles 1), rounds the box to whole pixels within the image and places it uniformly.
    torchvision instead retries up to 10 draws until a box fits (log-uniform ratio) and
    skips the image when none does. ``value`` is a number or one value per channel (input
    value range).

    Params: kornia's ``xs``, ``ys``, ``widths``, ``heights``, ``batch_prob``.
    """

    def __init__(
        self,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: float | Sequence[float] = 0,
        p: float = 0.5,
    ) -> None:
        super().__init__(p)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        if not (0 <= self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 <= min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if isinstance(value, str):
            raise ValueError("only numeric erasing values are supported")
        self.value = value if isinstance(value, numbers.Number) else tuple(value)
        self.fill_value = self.value
        self.kornia = K.RandomErasing(scale=self.scale, ratio=self.ratio, value=0.0, p=self.p)

    def sample_params(self, batch_size, device, generator=None, *, height: int = 32, width: int = 32,
                      channels: int = 3) -> Params:
        return super().sample_params(batch_size, device, generator, height=height, width=width, channels=1)

    def to_torchvision(self) -> v2.Transform:
        value = self.value if isinstance(self.value, numbers.Number) else list(self.value)
        return v2.RandomErasing(p=self.p, scale=self.scale, ratio=self.ratio, value=value)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, ratio={self.ratio}, p={self.p}"
