"""Batched data augmentation that runs on the training device.

The training split lives in memory as one ``uint8`` tensor ``(N, 3, H, W)``. The
datamodule gathers a ``uint8`` batch, moves it to the device and calls a
:class:`BatchAugment` on it in ``on_after_batch_transfer``. Every op here works on
a whole batch ``(B, C, H, W)`` with tensor ops only (no per-image Python, no PIL),
while drawing ONE random parameter set PER IMAGE.

Conventions shared by all ops
-----------------------------
* ``forward(x, generator=None)`` takes a ``uint8`` batch (values 0..255) or a
  floating batch (values in [0, 1], torchvision's convention for float images) and
  returns a batch of the same dtype. Fill values are given in the input's own value
  range (``0..255`` for ``uint8``), as in torchvision.
* ``forward(x, generator)`` is exactly ``apply(x, sample_params(B, x.device,
  generator))``. ``sample_params`` returns a ``dict`` of per-image tensors, so tests
  (or callers) can fix parameters and call ``apply`` directly.
* Random numbers come from ``generator`` when given (drawn on the generator's device
  and moved to the batch's device), else from the global RNG of the batch's device.
* ``p`` is the per-image probability that an op is applied; ``p=0`` is the identity.
* ``to_torchvision()`` returns the per-image ``torchvision.transforms.v2`` transform
  with the same semantics, so one config drives both the batched path and the
  per-image path.
* Ops that depend on the epoch implement ``set_epoch(epoch)``.

Speed
-----
Crop-with-padding and the flips are pure re-indexings of rows and columns. They
produce per-image row/column index maps and are executed with a single ``gather``
on the ``uint8`` batch (constant padding adds one 1-pixel pad). :class:`BatchAugment`
composes the maps of consecutive re-indexing ops, so ``RandomCrop`` followed by
``HorizontalFlip`` costs one gather in total. Values stay ``uint8`` until the
normalisation (a ``float32`` copy, then an in-place scale and shift).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "cpu_threads",
    "BatchOp",
    "RandomCrop",
    "HorizontalFlip",
    "AlternatingFlip",
    "ColorJitter",
    "RandomRotation",
    "RandomGrayscale",
    "RandomAutocontrast",
    "Cutout",
    "RandomErasing",
    "Normalize",
    "BatchAugment",
    "BatchOpTransform",
]

Params = dict[str, Tensor]


# ----------------------------------------------------------------------------- helpers


def _max_value(dtype: torch.dtype) -> float:
    return 1.0 if dtype.is_floating_point else float(torch.iinfo(dtype).max)


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None):
    """Limits torch's intra-op threads while batch ops run on the CPU.

    Batch-sized tensor ops gain little from several threads, and when the cores are
    shared (DataLoader workers, other processes) a thread that waits for a descheduled
    peer at every op's barrier makes them tens of times slower. ``None`` leaves the
    setting alone; non-CPU devices are unaffected.
    """
    previous = torch.get_num_threads()
    if threads is None or device.type != "cpu" or previous <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_batch(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}")


def _rand(shape: Sequence[int], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) float32 samples on ``device``, from ``generator`` if given."""
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def _randint(high: int | Tensor, shape: Sequence[int], device: torch.device, generator) -> Tensor:
    """Integers uniform in ``[0, high)`` (``high`` may be a per-image tensor)."""
    u = _rand(shape, device, generator)
    if isinstance(high, Tensor):
        high = high.to(device=device, dtype=torch.float32)
    # float32 has 24 bits of mantissa: exact enough for image-sized ranges.
    return (u * high).floor_().to(torch.int64).clamp_(min=0)


def _uniform(low: float, high: float, shape: Sequence[int], device, generator) -> Tensor:
    return _rand(shape, device, generator).mul_(high - low).add_(low)


def _bernoulli(p: float, batch_size: int, device, generator) -> Tensor:
    """Per-image boolean mask that is True with probability ``p`` (exactly all/none for 1/0)."""
    if p >= 1.0:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    if p <= 0.0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return _rand((batch_size,), device, generator) < p


def _bcast(v: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1)."""
    return v.view(-1, 1, 1, 1)


def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, numbers.Number):
        return int(v), int(v)
    v = list(v)
    if len(v) == 1:
        return int(v[0]), int(v[0])
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return int(v[0]), int(v[1])


def _fill_list(fill: Any) -> list[float]:
    if isinstance(fill, numbers.Number):
        return [float(fill)]
    return [float(f) for f in fill]


def _fill_tensor(fill: Any, x: Tensor) -> Tensor:
    """Fill value(s) as a tensor broadcastable to ``x`` (per channel or scalar)."""
    vals = _fill_list(fill)
    t = torch.tensor(vals, dtype=torch.float32, device=x.device)
    if not x.dtype.is_floating_point:
        t = t.round().clamp_(0, _max_value(x.dtype))
    return t.to(x.dtype).view(1, -1, 1, 1)


def _tv_fill(fill: Any) -> Any:
    vals = _fill_list(fill)
    return vals[0] if len(vals) == 1 else vals


def _maybe_random_apply(t: v2.Transform, p: float) -> v2.Transform:
    if p >= 1.0:
        return t
    return v2.RandomApply([t], p=p)


def _map_coords(idx: Tensor, n: int, mode: str) -> Tensor:
    """Map (possibly out-of-range) coordinates into ``[0, n)`` following a padding mode.

    ``constant`` marks outside coordinates with -1 (filled later); ``edge`` clamps;
    ``reflect`` mirrors without repeating the border pixel (numpy/torchvision
    "reflect"); ``symmetric`` mirrors with repetition.
    """
    if mode == "constant":
        return torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, -1))
    if mode == "edge":
        return idx.clamp(0, n - 1)
    if mode == "reflect":
        if n == 1:
            return torch.zeros_like(idx)
        period = 2 * (n - 1)
        m = torch.remainder(idx, period)
        return torch.where(m < n, m, period - m)
    if mode == "symmetric":
        period = 2 * n
        m = torch.remainder(idx, period)
        return torch.where(m < n, m, period - 1 - m)
    raise ValueError(f"unknown padding_mode {mode!r}")


def _gather_maps(x: Tensor, rows: Tensor, cols: Tensor, fill: Any = None) -> Tensor:
    """``out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]]`` as one gather.

    An index of -1 means "fill value" (``fill`` must then be given).
    """
    B, C, H, W = x.shape
    Ho, Wo = rows.shape[1], cols.shape[1]
    if fill is not None:
        vals = _fill_list(fill)
        if len(vals) == 1:
            xp = F.pad(x, (1, 1, 1, 1), mode="constant", value=vals[0])
        else:
            xp = F.pad(x, (1, 1, 1, 1), mode="constant", value=0.0)
            f = _fill_tensor(fill, x)
            xp[:, :, 0, :] = f[..., 0]
            xp[:, :, -1, :] = f[..., 0]
            xp[:, :, :, 0] = f[..., 0]
            xp[:, :, :, -1] = f[..., 0]
        rows = rows + 1
        cols = cols + 1
        H, W = H + 2, W + 2
    else:
        xp = x
    lin = (rows.unsqueeze(2) * W + cols.unsqueeze(1)).reshape(B, 1, Ho * Wo)
    out = xp.reshape(B, C, H * W).gather(2, lin.expand(B, C, Ho * Wo))
    return out.view(B, C, Ho, Wo)


def _compose_maps(first: Tensor, second: Tensor) -> Tensor:
    """Index map of "apply ``first`` then ``second``" (both (B, n), -1 = fill)."""
    composed = first.gather(1, second.clamp(min=0))
    return torch.where(second < 0, second, composed)


def _to_float(x: Tensor) -> Tensor:
    return x if x.dtype.is_floating_point else x.to(torch.float32)


def _from_float(y: Tensor, like: Tensor) -> Tensor:
    """Clamp to the valid range and cast back (truncating, as torchvision's blends)."""
    y = y.clamp_(0, _max_value(like.dtype))
    return y if like.dtype.is_floating_point else y.to(like.dtype)


def _grayscale(x: Tensor) -> Tensor:
    """Float luma (B, 1, H, W) with torchvision's weights, no rounding."""
    xf = _to_float(x)
    r, g, b = xf.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


# ----------------------------------------------------------------------------- base


class BatchOp(nn.Module):
    """Base class of the batched augmentation ops.

    Subclasses implement ``sample_params(batch_size, device, generator)`` (one
    parameter set per image, as tensors with a leading batch dimension),
    ``apply(x, params)`` (deterministic) and ``to_torchvision()``.
    """

    #: whether ``forward``/``sample_params`` need the ``indices`` keyword
    requires_indices: bool = False

    def sample_params(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> Params:
        raise NotImplementedError

    def apply(self, x: Tensor, params: Params) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        return self.apply(x, self.sample_params(x.shape[0], x.device, generator))

    def to_torchvision(self) -> v2.Transform:
        raise NotImplementedError


class _IndexOp(BatchOp):
    """An op that only re-indexes rows/columns per image (crop, flips).

    ``index_maps(params, height, width)`` returns ``rows (B, H_out)`` and
    ``cols (B, W_out)`` into the op's input (-1 = fill). ``fill`` is the fill value
    used by -1 entries, or None when the op never produces them.
    """

    fill: Any = None

    def index_maps(self, params: Params, height: int, width: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        rows, cols = self.index_maps(params, x.shape[2], x.shape[3])
        return _gather_maps(x, rows.to(x.device), cols.to(x.device), self.fill)


# ----------------------------------------------------------------------------- geometry


class RandomCrop(_IndexOp):
    """Random crop of a padded image, i.e. a random translate for ``size == H``.

    Equals torchvision's ``pad(img, padding, fill, padding_mode)`` followed by
    ``crop(top, left, size)``, with ``top``/``left`` uniform over all valid offsets
    of the padded image (``[0, 2 * padding]`` when ``size`` is the input size).

    Args:
        size: output size (int or (h, w)).
        padding: int, (left/right, top/bottom) or (left, top, right, bottom), as
            torchvision.
        padding_mode: "constant", "reflect", "edge" or "symmetric".
        fill: constant padding value (scalar or per channel, input value range).
        p: probability per image; an image not cropped keeps its content, which
            needs ``size`` equal to the input size (checked).

    Params: ``top``, ``left`` (int64 (B,)) offsets in the padded image.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 32,
        padding: int | Sequence[int] = 4,
        padding_mode: str = "constant",
        fill: float | Sequence[float] = 0,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        self.size = _pair(size, "size")
        if isinstance(padding, numbers.Number):
            pad = [int(padding)] * 4
        else:
            pad = [int(v) for v in padding]
            if len(pad) == 1:
                pad = pad * 4
            elif len(pad) == 2:
                pad = [pad[0], pad[1], pad[0], pad[1]]
            elif len(pad) != 4:
                raise ValueError(f"padding must have 1, 2 or 4 values, got {padding}")
        if min(pad) < 0:
            raise ValueError("padding must be non-negative")
        self.padding = tuple(pad)  # left, top, right, bottom
        if padding_mode not in ("constant", "reflect", "edge", "symmetric"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        self.padding_mode = padding_mode
        self.fill_value = fill if isinstance(fill, numbers.Number) else tuple(fill)
        self.p = float(p)

    @property
    def fill(self) -> Any:  # type: ignore[override]
        return self.fill_value if self.padding_mode == "constant" and any(self.padding) else None

    def _padded(self, height: int, width: int) -> tuple[int, int]:
        left, top, right, bottom = self.padding
        return height + top + bottom, width + left + right

    def sample_params(self, batch_size, device, generator=None, *, height: int | None = None,
                      width: int | None = None) -> Params:
        h, w = self.size
        height = h if height is None else height
        width = w if width is None else width
        ph, pw = self._padded(height, width)
        if ph < h or pw < w:
            raise ValueError(f"crop size {self.size} larger than padded input {(ph, pw)}")
        top = _randint(ph - h + 1, (batch_size,), device, generator)
        left = _randint(pw - w + 1, (batch_size,), device, generator)
        if self.p < 1.0:
            keep = ~_bernoulli(self.p, batch_size, device, generator)
            top = torch.where(keep, torch.full_like(top, self.padding[1]), top)
            left = torch.where(keep, torch.full_like(left, self.padding[0]), left)
        return {"top": top, "left": left}

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        params = self.sample_params(x.shape[0], x.device, generator, height=x.shape[2], width=x.shape[3])
        return self.apply(x, params)

    def index_maps(self, params: Params, height: int, width: int) -> tuple[Tensor, Tensor]:
        h, w = self.size
        if self.p < 1.0 and (h, w) != (height, width):
            raise ValueError("RandomCrop with p < 1 needs size equal to the input size")
        left_pad, top_pad = self.padding[0], self.padding[1]
        top, left = params["top"], params["left"]
        dev = top.device
        rows = top.unsqueeze(1) + torch.arange(h, device=dev) - top_pad
        cols = left.unsqueeze(1) + torch.arange(w, device=dev) - left_pad
        return _map_coords(rows, height, self.padding_mode), _map_coords(cols, width, self.padding_mode)

    def to_torchvision(self) -> v2.Transform:
        t = v2.RandomCrop(
            size=self.size,
            padding=list(self.padding),
            fill=_tv_fill(self.fill_value),
            padding_mode=self.padding_mode,
        )
        return _maybe_random_apply(t, self.p)

    def extra_repr(self) -> str:
        return f"size={self.size}, padding={self.padding}, padding_mode={self.padding_mode!r}, p={self.p}"


def _flip_cols(flip: Tensor, width: int) -> Tensor:
    ar = torch.arange(width, device=flip.device)
    return torch.where(flip.unsqueeze(1), ar.flip(0), ar)


def _identity_rows(batch_size: int, height: int, device) -> Tensor:
    return torch.arange(height, device=device).expand(batch_size, height)


class HorizontalFlip(_IndexOp):
    """Flips each image left-right with probability ``p`` (torchvision ``hflip``).

    Params: ``flip`` (bool (B,)).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def sample_params(self, batch_size, device, generator=None) -> Params:
        return {"flip": _bernoulli(self.p, batch_size, device, generator)}

    def index_maps(self, params: Params, height: int, width: int) -> tuple[Tensor, Tensor]:
        flip = params["flip"]
        return _identity_rows(flip.shape[0], height, flip.device), _flip_cols(flip, width)

    def to_torchvision(self) -> v2.Transform:
        return v2.RandomHorizontalFlip(p=self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


_HASH_MASK = (1 << 32) - 1


def _hash_bits(indices: Tensor, seed: int) -> Tensor:
    """A fair pseudo-random bit per integer index, fixed by ``seed`` (32-bit mixing
    done in int64 without overflow)."""
    h = (indices.to(torch.int64) + (seed * 0x9E3779B1 + 0x7F4A7C15)) & _HASH_MASK
    for mult in (0x45D9F3B, 0x2C1B3C6D, 0x297A2D39):
        h = h ^ (h >> 16)
        h = (h * mult) & _HASH_MASK
    h = h ^ (h >> 16)
    return (h & 1).to(torch.bool)


class AlternatingFlip(_IndexOp):
    """Horizontal flip that alternates per image across epochs.

    In epoch 0 a pseudo-random half of the images is flipped (decided by ``seed``);
    each later epoch flips exactly the complement of the previous epoch, so every
    image is seen flipped in every other epoch: ``flip(i, e) = base(i) XOR (e % 2)``.

    Per-image identity: the op needs the *dataset index* of every image in the
    batch, passed as ``forward(x, indices=idx)`` (``int64 (B,)``, any device).
    :class:`BatchAugment` forwards its own ``indices`` argument to ops whose
    ``requires_indices`` is True, so the datamodule must carry the sample indices
    with the training batch and call ``augment(x, indices=idx)``. Calling without
    indices raises an error (a batch position is no stable identity under shuffling).

    ``base(i)``: with ``num_samples`` given, a permutation of ``range(num_samples)``
    drawn from ``torch.Generator().manual_seed(seed)`` flips exactly
    ``num_samples // 2`` images (those whose rank is below half); without it, a fixed
    integer hash of ``(i, seed)`` flips each image with probability 1/2.

    The epoch comes from ``set_epoch(epoch)`` (the datamodule calls it every epoch).
    Params: ``flip`` (bool (B,)); the draw is deterministic (``generator`` unused).
    """

    requires_indices = True

    def __init__(self, seed: int = 0, num_samples: int | None = None) -> None:
        super().__init__()
        self.seed = int(seed)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.epoch = 0
        self._base: Tensor | None = None
        if self.num_samples is not None:
            g = torch.Generator().manual_seed(self.seed)
            rank = torch.empty(self.num_samples, dtype=torch.int64)
            rank[torch.randperm(self.num_samples, generator=g)] = torch.arange(self.num_samples)
            self._base = rank < (self.num_samples // 2)
        self._base_cache: dict[torch.device, Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def base_flip(self, indices: Tensor) -> Tensor:
        """Epoch-0 flip decision for the given dataset indices."""
        indices = indices.to(torch.int64)
        if self._base is None:
            return _hash_bits(indices, self.seed)
        base = self._base_cache.get(indices.device)
        if base is None:
            base = self._base.to(indices.device)
            self._base_cache[indices.device] = base
        # range check on the host only (on an accelerator it would force a synchronisation)
        if indices.device.type == "cpu" and indices.numel() and (
            int(indices.min()) < 0 or int(indices.max()) >= self.num_samples
        ):
            raise IndexError(f"indices out of range for num_samples={self.num_samples}")
        return base[indices]

    def sample_params(self, batch_size, device, generator=None, *, indices: Tensor | None = None) -> Params:
        if indices is None:
            raise ValueError(
                "AlternatingFlip needs the dataset index of each image: call it as "
                "op(x, indices=idx) / BatchAugment(...)(x, indices=idx)"
            )
        indices = torch.as_tensor(indices).to(device)
        if indices.shape != (batch_size,):
            raise ValueError(f"indices must have shape ({batch_size},), got {tuple(indices.shape)}")
        flip = self.base_flip(indices)
        if self.epoch % 2 == 1:
            flip = ~flip
        return {"flip": flip}

    def forward(self, x: Tensor, generator: torch.Generator | None = None, indices: Tensor | None = None) -> Tensor:
        _check_batch(x)
        return self.apply(x, self.sample_params(x.shape[0], x.device, generator, indices=indices))

    def index_maps(self, params: Params, height: int, width: int) -> tuple[Tensor, Tensor]:
        flip = params["flip"]
        return _identity_rows(flip.shape[0], height, flip.device), _flip_cols(flip, width)

    def to_torchvision(self) -> v2.Transform:
        """Per-image transforms see no sample index: the closest per-image equivalent
        is a flip with probability 1/2 (same flip rate, no alternation)."""
        return v2.RandomHorizontalFlip(p=0.5)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, num_samples={self.num_samples}, epoch={self.epoch}"


class RandomRotation(BatchOp):
    """Rotates each image by an angle uniform in ``degrees`` (counter-clockwise
    positive, about the image centre, same size), as torchvision ``rotate``.

    Args:
        degrees: ``d`` for ``[-d, d]`` or ``(min, max)``.
        p: probability per image.
        interpolation: "nearest" (torchvision's default) or "bilinear".
        fill: value of the area outside the rotated image (input value range).

    Params: ``angle`` (float (B,), degrees), ``apply`` (bool (B,)).
    """

    def __init__(
        self,
        degrees: float | Sequence[float] = 15.0,
        p: float = 1.0,
        interpolation: str = "nearest",
        fill: float | Sequence[float] = 0,
    ) -> None:
        super().__init__()
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
        self.p = float(p)

    def sample_params(self, batch_size, device, generator=None) -> Params:
        angle = _uniform(self.degrees[0], self.degrees[1], (batch_size,), device, generator)
        return {"angle": angle, "apply": _bernoulli(self.p, batch_size, device, generator)}

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        B, C, H, W = x.shape
        apply = params["apply"].to(x.device)
        angle = torch.where(apply, params["angle"].to(x.device), torch.zeros((), device=x.device))
        rad = angle.to(torch.float32) * (math.pi / 180.0)
        cos, sin = rad.cos(), rad.sin()
        # Output pixel -> input pixel (centred pixel coordinates, y down):
        # a counter-clockwise rotation on screen maps output (u, v) to input
        # (cos*u - sin*v, sin*u + cos*v); rescaled to grid_sample's normalised axes.
        theta = torch.zeros(B, 2, 3, device=x.device)
        theta[:, 0, 0] = cos
        theta[:, 0, 1] = -sin * (H / W)
        theta[:, 1, 0] = sin * (W / H)
        theta[:, 1, 1] = cos
        xf = x.to(torch.float32)
        fill_vals = _fill_list(self.fill)
        # torchvision blends bilinear borders with the in-image weight (mask) for any fill;
        # for nearest, a zero fill is already what grid_sample's zero padding gives.
        need_mask = self.interpolation == "bilinear" or any(v != 0.0 for v in fill_vals)
        if need_mask:
            xf = torch.cat([xf, torch.ones(B, 1, H, W, device=x.device)], dim=1)
        grid = F.affine_grid(theta, [B, xf.shape[1], H, W], align_corners=False)
        out = F.grid_sample(xf, grid, mode=self.interpolation, padding_mode="zeros", align_corners=False)
        if need_mask:
            out, mask = out[:, :C], out[:, C:]
            fill = torch.tensor(fill_vals, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
            if self.interpolation == "nearest":
                out = torch.where(mask < 0.5, fill.expand_as(out), out)
            else:
                out = out.sub(fill).mul_(mask).add_(fill)
        if not x.dtype.is_floating_point:
            out = out.round_().clamp_(0, _max_value(x.dtype)).to(x.dtype)
        else:
            out = out.to(x.dtype)
        return torch.where(_bcast(apply), out, x)

    def to_torchvision(self) -> v2.Transform:
        interp = v2.InterpolationMode.NEAREST if self.interpolation == "nearest" else v2.InterpolationMode.BILINEAR
        t = v2.RandomRotation(degrees=self.degrees, interpolation=interp, fill=_tv_fill(self.fill))
        return _maybe_random_apply(t, self.p)

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, p={self.p}, interpolation={self.interpolation!r}"


# ----------------------------------------------------------------------------- colour


def _adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _from_float(_to_float(x).mul(_bcast(factor)), x)


def _adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    gray = _grayscale(x)
    if not x.dtype.is_floating_point:
        gray = gray.floor_()
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    f = _bcast(factor)
    return _from_float(_to_float(x).mul(f).addcmul_(mean, 1.0 - f), x)


def _adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    gray = _grayscale(x)
    if not x.dtype.is_floating_point:
        gray = gray.floor_()
    f = _bcast(factor)
    return _from_float(_to_float(x).mul(f).addcmul_(gray, 1.0 - f), x)


def _rgb_to_hsv(img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3, H, W) RGB in [0, 1] -> hue, saturation, value, each (B, H, W) in [0, 1]."""
    r, g, b = img.unbind(dim=1)
    maxc = img.amax(dim=1)
    delta = maxc - img.amin(dim=1)
    # grey pixels (delta == 0) have r == g == b, so the red branch gives hue 0 there
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        maxc == r,
        (g - b) / safe_delta,
        torch.where(maxc == g, (b - r) / safe_delta + 2.0, (r - g) / safe_delta + 4.0),
    )
    h = torch.remainder(h * (1.0 / 6.0), 1.0)
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    return h, s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Inverse of :func:`_rgb_to_hsv` -> (B, 3, H, W), via the piecewise-linear form
    ``c_n = v - v * s * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6``."""
    h6 = h * 6.0
    vs = v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        out.append(v - vs * w)
    return torch.stack(out, dim=1)


def _adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    xf = x.to(torch.float32) * (1.0 / 255.0) if not x.dtype.is_floating_point else x
    h, sat, val = _rgb_to_hsv(xf)
    h = torch.remainder(h + factor.view(-1, 1, 1).to(h.dtype), 1.0)
    rgb = _hsv_to_rgb(h, sat, val)
    if x.dtype.is_floating_point:
        return rgb.to(x.dtype)
    # torchvision's float -> uint8 conversion: multiply by (256 - 1e-3) and truncate
    return rgb.mul_(256.0 - 1e-3).clamp_(0, 255).to(x.dtype)


_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")
_JITTER_FNS = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
_JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)


class ColorJitter(BatchOp):
    """Per-image colour jitter with torchvision's semantics.

    Each image gets its own factors, uniform in the ranges below, and its own random
    order of the enabled adjustments (as torchvision's ``ColorJitter``):
    brightness ``[max(0, 1 - b), 1 + b]`` (or a given ``(min, max)``), likewise
    contrast and saturation; hue ``[-h, h]`` with ``h <= 0.5``. A zero disables a
    component.

    ``order="image"`` (default, torchvision's behaviour) draws the order per image and
    costs ``n**2`` batch passes for ``n`` enabled components (no host
    synchronisation); ``order="batch"`` draws one order per batch (factors stay per
    image) and costs ``n`` passes.

    Params: ``brightness``, ``contrast``, ``saturation``, ``hue`` (float (B,)),
    ``order`` (int64 (B, 4): a permutation of 0..3 = the adjustment indices in
    application order; disabled components are skipped), ``apply`` (bool (B,)).
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
        if order not in ("image", "batch"):
            raise ValueError(f"order must be 'image' or 'batch', got {order!r}")
        self.order = order
        self.brightness = self._range(brightness, "brightness", center=1.0, bound=(0.0, math.inf))
        self.contrast = self._range(contrast, "contrast", center=1.0, bound=(0.0, math.inf))
        self.saturation = self._range(saturation, "saturation", center=1.0, bound=(0.0, math.inf))
        self.hue = self._range(hue, "hue", center=0.0, bound=(-0.5, 0.5))
        self.p = float(p)

    @staticmethod
    def _range(value, name, center, bound) -> tuple[float, float] | None:
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

    @property
    def ranges(self) -> tuple:
        return (self.brightness, self.contrast, self.saturation, self.hue)

    def sample_params(self, batch_size, device, generator=None) -> Params:
        params: Params = {}
        for name, rng, ident in zip(_JITTER_NAMES, self.ranges, _JITTER_IDENTITY):
            if rng is None:
                params[name] = torch.full((batch_size,), ident, device=device)
            else:
                params[name] = _uniform(rng[0], rng[1], (batch_size,), device, generator)
        if self.order == "batch":
            params["order"] = _rand((1, 4), device, generator).argsort(dim=1).expand(batch_size, 4)
        else:
            params["order"] = _rand((batch_size, 4), device, generator).argsort(dim=1)
        params["apply"] = _bernoulli(self.p, batch_size, device, generator)
        return params

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        if x.shape[1] != 3:
            raise ValueError("ColorJitter expects RGB images")
        enabled = [i for i, rng in enumerate(self.ranges) if rng is not None]
        if not enabled:
            return x
        dev = x.device
        apply = params["apply"].to(dev)
        order = params["order"].to(dev)
        # position of each enabled component among the enabled ones, per image
        en = torch.tensor(enabled, device=dev)
        is_enabled = (order.unsqueeze(2) == en).any(dim=2)  # (B, 4)
        rank = torch.cumsum(is_enabled.to(torch.int64), dim=1) - 1
        if self.order == "batch":
            # one order for the whole batch: each enabled adjustment once
            out = x
            for comp in order[0].tolist():
                if comp not in enabled:
                    continue
                factor = params[_JITTER_NAMES[comp]].to(dev)
                factor = torch.where(apply, factor, torch.full_like(factor, _JITTER_IDENTITY[comp]))
                adjusted = _JITTER_FNS[comp](out, factor)
                out = torch.where(_bcast(apply), adjusted, out) if comp == 3 else adjusted
            return out
        out = x
        for slot in range(len(enabled)):
            at_slot = is_enabled & (rank == slot)  # (B, 4): exactly one True per image
            comp_at_slot = (order * at_slot).sum(dim=1)  # component index applied at this slot
            for comp in enabled:
                active = (comp_at_slot == comp) & apply
                factor = params[_JITTER_NAMES[comp]].to(dev)
                factor = torch.where(active, factor, torch.full_like(factor, _JITTER_IDENTITY[comp]))
                adjusted = _JITTER_FNS[comp](out, factor)
                if comp == 3:  # hue round trip is not bit-exact at factor 0
                    adjusted = torch.where(_bcast(active), adjusted, out)
                out = adjusted
        return out

    def to_torchvision(self) -> v2.Transform:
        t = v2.ColorJitter(
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
        )
        return _maybe_random_apply(t, self.p)

    def extra_repr(self) -> str:
        return (
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
            f"hue={self.hue}, p={self.p}, order={self.order!r}"
        )


class RandomGrayscale(BatchOp):
    """Converts each image to 3-channel grayscale with probability ``p``
    (torchvision ``rgb_to_grayscale`` weights and ``uint8`` truncation).

    Params: ``apply`` (bool (B,)).
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = float(p)

    def sample_params(self, batch_size, device, generator=None) -> Params:
        return {"apply": _bernoulli(self.p, batch_size, device, generator)}

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        if x.shape[1] != 3:
            return x
        gray = _grayscale(x).to(x.dtype).expand_as(x)
        return torch.where(_bcast(params["apply"].to(x.device)), gray, x)

    def to_torchvision(self) -> v2.Transform:
        return v2.RandomGrayscale(p=self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RandomAutocontrast(BatchOp):
    """Per-channel autocontrast (stretch min..max to the full range) with
    probability ``p`` per image, as torchvision ``autocontrast``.

    Params: ``apply`` (bool (B,)).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def sample_params(self, batch_size, device, generator=None) -> Params:
        return {"apply": _bernoulli(self.p, batch_size, device, generator)}

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

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ----------------------------------------------------------------------------- erasing


def _fill_boxes(x: Tensor, params: Params, value: Any) -> Tensor:
    """Sets ``x[b, :, top:bottom, left:right] = value`` per image (empty boxes allowed)."""
    B, C, H, W = x.shape
    dev = x.device
    top, bottom = params["top"].to(dev), params["bottom"].to(dev)
    left, right = params["left"].to(dev), params["right"].to(dev)
    apply = params["apply"].to(dev)
    r = torch.arange(H, device=dev)
    c = torch.arange(W, device=dev)
    in_rows = (r >= top.unsqueeze(1)) & (r < bottom.unsqueeze(1)) & apply.unsqueeze(1)  # (B, H)
    in_cols = (c >= left.unsqueeze(1)) & (c < right.unsqueeze(1))  # (B, W)
    mask = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)  # (B, 1, H, W)
    return torch.where(mask, _fill_tensor(value, x), x)


class Cutout(BatchOp):
    """Cutout: a ``size x size`` square, centred at a uniform random pixel and
    clipped at the borders, is set to ``fill`` (per image, probability ``p``).

    Params: ``top``, ``left``, ``bottom``, ``right`` (int64 (B,), exclusive ends),
    ``apply`` (bool (B,)).
    """

    def __init__(self, size: int = 8, p: float = 1.0, fill: float | Sequence[float] = 0) -> None:
        super().__init__()
        if int(size) < 0:
            raise ValueError("size must be non-negative")
        self.size = int(size)
        self.p = float(p)
        self.fill = fill if isinstance(fill, numbers.Number) else tuple(fill)

    def sample_params(self, batch_size, device, generator=None, *, height: int = 32, width: int = 32) -> Params:
        cy = _randint(height, (batch_size,), device, generator)
        cx = _randint(width, (batch_size,), device, generator)
        top = cy - self.size // 2
        left = cx - self.size // 2
        return {
            "top": top.clamp(0, height),
            "bottom": (top + self.size).clamp(0, height),
            "left": left.clamp(0, width),
            "right": (left + self.size).clamp(0, width),
            "apply": _bernoulli(self.p, batch_size, device, generator),
        }

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        params = self.sample_params(x.shape[0], x.device, generator, height=x.shape[2], width=x.shape[3])
        return self.apply(x, params)

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        return _fill_boxes(x, params, self.fill)

    def to_torchvision(self) -> v2.Transform:
        """No torchvision counterpart: wraps this op for single images."""
        return BatchOpTransform(self)

    def extra_repr(self) -> str:
        return f"size={self.size}, p={self.p}"


class RandomErasing(BatchOp):
    """Random erasing with torchvision's ``RandomErasing`` sampling, per image.

    Up to 10 attempts per image draw an area fraction in ``scale`` and a log-uniform
    aspect ratio in ``ratio``; the first attempt whose box fits is used, with a
    uniform position; when none fits the image is left unchanged. ``value`` is a
    number or one value per channel (input value range).

    Params: ``top``, ``left``, ``bottom``, ``right`` (int64 (B,)), ``apply`` (bool (B,)).
    """

    attempts = 10

    def __init__(
        self,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: float | Sequence[float] = 0,
        p: float = 0.5,
    ) -> None:
        super().__init__()
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        if not (0 <= self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 <= min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if isinstance(value, str):
            raise ValueError("only numeric erasing values are supported")
        self.value = value if isinstance(value, numbers.Number) else tuple(value)
        self.p = float(p)

    def sample_params(self, batch_size, device, generator=None, *, height: int = 32, width: int = 32) -> Params:
        n = self.attempts
        area = float(height * width)
        target = _uniform(self.scale[0], self.scale[1], (batch_size, n), device, generator) * area
        log_r = _uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), (batch_size, n), device, generator)
        aspect = log_r.exp()
        h = (target * aspect).sqrt().round().to(torch.int64)
        w = (target / aspect).sqrt().round().to(torch.int64)
        ok = (h < height) & (w < width)
        first = ok.to(torch.int64).argmax(dim=1, keepdim=True)  # first fitting attempt
        h = h.gather(1, first).squeeze(1)
        w = w.gather(1, first).squeeze(1)
        found = ok.any(dim=1)
        h = torch.where(found, h, torch.zeros_like(h))
        w = torch.where(found, w, torch.zeros_like(w))
        top = _randint(height - h + 1, (batch_size,), device, generator)
        left = _randint(width - w + 1, (batch_size,), device, generator)
        apply = _bernoulli(self.p, batch_size, device, generator) & found
        return {"top": top, "left": left, "bottom": top + h, "right": left + w, "apply": apply}

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        params = self.sample_params(x.shape[0], x.device, generator, height=x.shape[2], width=x.shape[3])
        return self.apply(x, params)

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_batch(x)
        return _fill_boxes(x, params, self.value)

    def to_torchvision(self) -> v2.Transform:
        value = self.value if isinstance(self.value, numbers.Number) else list(self.value)
        return v2.RandomErasing(p=self.p, scale=self.scale, ratio=self.ratio, value=value)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, ratio={self.ratio}, p={self.p}"


# ----------------------------------------------------------------------------- per-image adapter


class BatchOpTransform(v2.Transform):
    """Runs a batched op on single images inside a torchvision v2 pipeline.

    Accepts ``(C, H, W)`` tensors / ``tv_tensors.Image`` and PIL images (converted to
    a ``uint8`` tensor and back). Used by ops without a torchvision counterpart.
    """

    def __init__(self, op: BatchOp) -> None:
        super().__init__()
        self.op = op

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        import PIL.Image

        from torchvision import tv_tensors

        if isinstance(inpt, PIL.Image.Image):
            out = self.op(TF.pil_to_tensor(inpt).unsqueeze(0))[0]
            return TF.to_pil_image(out, mode=inpt.mode)
        if isinstance(inpt, Tensor) and inpt.ndim == 3:
            out = self.op(inpt.as_subclass(Tensor).unsqueeze(0))[0]
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
        return inpt

    def extra_repr(self) -> str:
        return repr(self.op)



# ----------------------------------------------------------------------------- fused crop/flip runs


def _is_flip(op: BatchOp) -> bool:
    return isinstance(op, (HorizontalFlip, AlternatingFlip))


def _window_run(run: Sequence[tuple[Any, Params, int, int]]) -> bool:
    """True for ``[RandomCrop(constant padding)] + flips`` (either part optional): runs that
    :func:`_crop_flip_windows` computes with row copies instead of an element gather."""
    if not run:
        return False
    first = run[0][0]
    rest = run[1:] if isinstance(first, RandomCrop) else run
    if isinstance(first, RandomCrop) and first.padding_mode != "constant":
        return False
    return all(_is_flip(op) for op, _, _, _ in rest)


def _filled(shape: Sequence[int], fill: Any, like: Tensor) -> Tensor:
    """A new tensor of ``shape`` (..., C, H, W) set to ``fill`` (scalar or per channel)."""
    vals = _fill_list(fill)
    if not like.dtype.is_floating_point:
        vals = [min(max(round(v), 0), _max_value(like.dtype)) for v in vals]
    out = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    if len(vals) == 1:
        return out.fill_(vals[0])
    for c, v in enumerate(vals):
        out[..., c, :, :].fill_(v)
    return out


def _crop_flip_windows(
    x: Tensor, run: Sequence[tuple[Any, Params, int, int]], scratch: dict | None = None
) -> Tensor:
    """A constant-padded crop followed by per-image horizontal flips, by row copies.

    The batch is written once into a padded buffer next to its mirror image; every output
    row is then a contiguous ``w``-element window of that buffer (in the mirror for flipped
    images, at the mirrored offset), copied with one ``index_select`` over a strided
    window view. On the CPU this is several times faster than the element-wise gather of
    :func:`_gather_maps` and gives the same result. ``scratch`` (a dict owned by the
    caller) keeps the padded buffer between calls, so its border is filled only once.
    """
    B, C, H, W = x.shape
    dev = x.device
    crop = run[0][0] if isinstance(run[0][0], RandomCrop) else None
    flip: Tensor | None = None
    for op, params, _, _ in run[1:] if crop is not None else run:
        f = params["flip"].to(dev)
        flip = f if flip is None else flip ^ f
    if crop is not None:
        h, w = crop.size
        if crop.p < 1.0 and (h, w) != (H, W):
            raise ValueError("RandomCrop with p < 1 needs size equal to the input size")
        pl, pt, pr, pb = crop.padding
        top, left = run[0][1]["top"].to(dev), run[0][1]["left"].to(dev)
        fill = crop.fill_value
    else:
        h, w = H, W
        pl = pt = pr = pb = 0
        top = left = torch.zeros(B, dtype=torch.int64, device=dev)
        fill = 0
    if B == 0:
        return x.new_empty((0, C, h, w))
    PH, PW = H + pt + pb, W + pl + pr
    copies = 1 if flip is None else 2
    if pl or pt or pr or pb:
        shape = (copies, B, C, PH, PW)
        key = (shape, x.dtype, dev, pt, pl, pr, tuple(_fill_list(fill)))
        buf = scratch.get(key) if scratch is not None else None
        if buf is None:
            buf = _filled(shape, fill, x)  # only the interior is written below
            if scratch is not None:
                if len(scratch) >= 4:
                    scratch.clear()
                scratch[key] = buf
        buf[0, :, :, pt : pt + H, pl : pl + W] = x
        if flip is not None:  # the mirror image of the padded batch
            buf[1, :, :, pt : pt + H, pr : pr + W] = x.flip(-1)
    elif flip is not None:
        buf = torch.stack([x, x.flip(-1)])
    else:
        buf = x.contiguous().unsqueeze(0)
    image = torch.arange(B, device=dev)
    if flip is not None:
        # flip(crop(img, top, left)) == crop(flip(img), top, PW - w - left)
        left = torch.where(flip, (PW - w) - left, left)
        image = image + flip.to(torch.int64) * B
    start = (
        (image.view(B, 1, 1) * C + torch.arange(C, device=dev).view(1, C, 1)) * (PH * PW)
        + (top.view(B, 1, 1) + torch.arange(h, device=dev).view(1, 1, h)) * PW
        + left.view(B, 1, 1)
    )
    flat = buf.view(-1)
    windows = flat.as_strided((flat.numel() - w + 1, w), (1, 1))
    return windows.index_select(0, start.view(-1)).view(B, C, h, w)


def _apply_index_run(
    x: Tensor, run: Sequence[tuple[Any, Params, int, int]], scratch: dict | None = None
) -> Tensor:
    """Applies consecutive re-indexing ops whose parameters are already drawn.

    On the CPU, a constant-padding crop followed by flips (the usual CIFAR recipe) uses
    :func:`_crop_flip_windows`; everything else composes the ops' index maps into one
    gather (split where two ops use different fill values).
    """
    if not run:
        return x
    if x.device.type == "cpu" and _window_run(run):
        return _crop_flip_windows(x, run, scratch)
    pending: list[Any] | None = None  # [rows, cols, fill]
    for op, params, height, width in run:
        rows, cols = op.index_maps(params, height, width)
        rows, cols = rows.to(x.device), cols.to(x.device)
        fill = op.fill
        if pending is not None and fill is not None and pending[2] is not None and pending[2] != fill:
            x = _gather_maps(x, pending[0], pending[1], pending[2])  # different fills cannot share a gather
            pending = None
        if pending is None:
            pending = [rows, cols, fill]
        else:
            pending = [
                _compose_maps(pending[0], rows),
                _compose_maps(pending[1], cols),
                pending[2] if pending[2] is not None else fill,
            ]
    return _gather_maps(x, pending[0], pending[1], pending[2])


# ----------------------------------------------------------------------------- normalisation / pipeline


class Normalize(nn.Module):
    """``uint8`` or [0, 1] float batch -> normalised float32 ``(x / 255 - mean) / std``.

    Same result as ``v2.ToDtype(torch.float32, scale=True)`` followed by
    ``v2.Normalize(mean, std)`` (float inputs are taken as already scaled to [0, 1]),
    computed as ``float(x) * (1 / (255 * std)) - mean / std``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        super().__init__()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        self.channels_last = bool(channels_last)
        self._consts: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _get_consts(self, device: torch.device, integer: bool) -> tuple[Tensor, Tensor]:
        key = (device, integer)
        if key not in self._consts:
            std = torch.tensor(self.std, dtype=torch.float64)
            mean = torch.tensor(self.mean, dtype=torch.float64)
            scale = 1.0 / (std * 255.0) if integer else 1.0 / std
            shift = mean / std
            self._consts[key] = (
                scale.to(torch.float32).view(1, -1, 1, 1).to(device),
                shift.to(torch.float32).view(1, -1, 1, 1).to(device),
            )
        return self._consts[key]

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x)
        if x.shape[1] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} channels, got {x.shape[1]}")
        scale, shift = self._get_consts(x.device, not x.dtype.is_floating_point)
        if self.channels_last and x.device.type == "cpu":
            return self._channels_last_cpu(x, scale, shift)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # a plain dtype copy then two in-place float ops beat one mixed-dtype multiply
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
        out.copy_(x)
        return out.mul_(scale).sub_(shift)

    def _channels_last_cpu(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """The channels_last result on the CPU, where converting and transposing in one
        copy (NCHW ``uint8`` -> NHWC ``float32``) is several times slower than either alone."""
        B, C, H, W = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # NHWC input: the per-channel constants tiled along a whole row (W * C values)
            # keep the multiply on long contiguous rows instead of 3-value pixels
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=torch.channels_last)
            out.copy_(x)
            key = (x.device, not x.dtype.is_floating_point, W)
            if key not in self._consts:
                self._consts[key] = (scale.view(1, C).repeat(1, W), shift.view(1, C).repeat(1, W))
            row_scale, row_shift = self._consts[key]
            out.permute(0, 2, 3, 1).view(B * H, W * C).mul_(row_scale).sub_(row_shift)
            return out
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        out.copy_(x)
        return out.mul_(scale).sub_(shift).contiguous(memory_format=torch.channels_last)

    def to_torchvision(self) -> v2.Transform:
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, channels_last={self.channels_last}"


class BatchAugment(nn.Module):
    """Applies augmentation ops in order, then normalises to float32.

    Args:
        ops: ordered mapping ``name -> op`` (``None`` entries are dropped, which is how a
            Hydra config switches an op off) or a sequence of ops. ``{}`` gives the
            eval path: normalisation only.
        mean, std: per-channel statistics in [0, 1] units.
        channels_last: return the batch in ``torch.channels_last`` memory format.
        cpu_threads: intra-op threads while a CPU batch is processed (see :func:`cpu_threads`;
            ``None`` keeps torch's setting).

    ``forward(x, generator=None, indices=None)``: ``x`` is a ``uint8`` (or [0, 1]
    float) batch; ``indices`` (dataset indices of the images) is forwarded to ops
    that need it (see :attr:`requires_indices`, e.g. :class:`AlternatingFlip`).
    Consecutive crop/flip ops are fused into one gather; the random parameters are
    drawn in op order, so the result equals applying the ops one by one with the
    same generator.
    """

    def __init__(
        self,
        ops: Mapping[str, BatchOp | None] | Sequence[BatchOp | None] | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        channels_last: bool = False,
        *,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__()
        self.cpu_threads = cpu_threads
        if ops is None:
            items: list[tuple[str, Any]] = []
        elif isinstance(ops, Mapping):
            items = [(str(k), v) for k, v in ops.items()]
        else:
            items = [(str(i), v) for i, v in enumerate(ops)]
        self.ops = nn.ModuleDict()
        for name, op in items:
            if op is None:
                continue
            if not isinstance(op, nn.Module):
                raise TypeError(f"augment op {name!r} is not an nn.Module: {type(op).__name__}")
            self.ops[name.replace(".", "_")] = op
        self.normalize = Normalize(mean, std, channels_last=channels_last)
        self._scratch: dict = {}  # reusable work buffers of the fused crop/flip

    @property
    def requires_indices(self) -> bool:
        """True when some op needs the dataset indices of the batch."""
        return any(getattr(op, "requires_indices", False) for op in self.ops.values())

    def set_epoch(self, epoch: int) -> None:
        for op in self.ops.values():
            if hasattr(op, "set_epoch"):
                op.set_epoch(epoch)

    def augment(
        self, x: Tensor, generator: torch.Generator | None = None, indices: Tensor | None = None
    ) -> Tensor:
        """The ops only (same dtype as ``x``, no normalisation)."""
        _check_batch(x)
        B = x.shape[0]
        H, W = x.shape[2], x.shape[3]
        run: list[tuple[_IndexOp, Params, int, int]] = []  # index ops drawn but not applied yet

        for op in self.ops.values():
            needs_idx = getattr(op, "requires_indices", False)
            if isinstance(op, _IndexOp):
                kwargs: dict[str, Any] = {"indices": indices} if needs_idx else {}
                if isinstance(op, RandomCrop):
                    kwargs.update(height=H, width=W)
                params = op.sample_params(B, x.device, generator, **kwargs)
                run.append((op, params, H, W))
                if isinstance(op, RandomCrop):
                    H, W = op.size
            else:
                x = _apply_index_run(x, run, self._scratch)
                run = []
                x = op(x, generator, indices=indices) if needs_idx else op(x, generator)
                H, W = x.shape[2], x.shape[3]
        return _apply_index_run(x, run, self._scratch)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, indices: Tensor | None = None
    ) -> Tensor:
        with cpu_threads(x.device, self.cpu_threads):
            return self.normalize(self.augment(x, generator, indices))

    def to_torchvision(self) -> v2.Compose:
        """Per-image pipeline: ``ToImage`` (PIL/array -> uint8 tensor), the ops'
        torchvision equivalents, ``ToDtype(float32, scale=True)``, ``Normalize``."""
        ops = [op.to_torchvision() for op in self.ops.values()]
        return v2.Compose(
            [
                v2.ToImage(),
                *ops,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.normalize.mean, self.normalize.std),
            ]
        )
