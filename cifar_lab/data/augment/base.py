"""Shared pieces of the batched ops: random draws, fill values, the op base classes.

Conventions shared by all ops
-----------------------------
* ``forward(x, generator=None)`` takes a ``uint8`` batch (values 0..255) or a floating
  batch (values in [0, 1], torchvision's convention for float images) and returns a batch
  of the same dtype. Fill values are given in the input's own value range (``0..255`` for
  ``uint8``), as in torchvision.
* ``forward(x, generator)`` is exactly ``apply(x, sample_params(B, x.device, generator))``.
  ``sample_params`` returns a ``dict`` of per-image tensors, so tests (or callers) can fix
  parameters and call ``apply`` directly.
* Random numbers come from ``generator`` when given, else from the global RNG of the
  batch's device.
* ``p`` is the per-image probability that an op is applied; ``p=0`` is the identity.
* ``to_torchvision()`` returns the per-image ``torchvision.transforms.v2`` transform with
  the same semantics, so one config drives both the batched and the per-image path.
* Ops that depend on the epoch implement ``set_epoch(epoch)``.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

Params = dict[str, Tensor]


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


def _uniform(bounds: tuple[float, float], batch_size: int, device: torch.device, generator) -> Tensor:
    """Per-image float32 values uniform in ``[bounds[0], bounds[1]]``."""
    lo, hi = bounds
    return _rand((batch_size,), device, generator).mul_(hi - lo).add_(lo)


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


def _to_float(x: Tensor) -> Tensor:
    return x if x.dtype.is_floating_point else x.to(torch.float32)


def to_unit(x: Tensor) -> Tensor:
    """Float in [0, 1] (``uint8`` / 255, float batches as they are): the colour ops' working range."""
    return x if x.dtype.is_floating_point else x.to(torch.float32).div_(_max_value(x.dtype))


def from_unit(y: Tensor, like: Tensor) -> Tensor:
    """Back to ``like``'s dtype: ``uint8`` rounded, floats clamped to [0, 1]; never in place on ``like``."""
    if like.dtype.is_floating_point:
        return y.clamp(0.0, 1.0).to(like.dtype)
    bound = _max_value(like.dtype)
    return y.mul(bound).round_().clamp_(0, bound).to(like.dtype)


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
        raise NotImplementedError  # interface: every concrete op defines it

    def apply(self, x: Tensor, params: Params) -> Tensor:
        raise NotImplementedError  # interface: every concrete op defines it

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x)
        return self.apply(x, self.sample_params(x.shape[0], x.device, generator))

    def to_torchvision(self) -> v2.Transform:
        raise NotImplementedError  # interface: every concrete op defines its per-image equivalent


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


class InUnitRange(v2.Transform):
    """Runs a torchvision transform on the [0, 1] float image and converts back with rounding,
    as the batched colour ops do (torchvision's ``uint8`` colour ops would truncate)."""

    def __init__(self, transform: v2.Transform) -> None:
        super().__init__()
        self.inner = transform

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        import PIL.Image

        from torchvision import tv_tensors

        if isinstance(inpt, PIL.Image.Image):
            out = self.transform(TF.pil_to_tensor(inpt), params)
            return TF.to_pil_image(out, mode=inpt.mode)
        if not isinstance(inpt, Tensor) or inpt.ndim != 3:
            return inpt
        image = inpt.as_subclass(Tensor)
        out = self.inner(image) if image.dtype.is_floating_point else from_unit(self.inner(to_unit(image)), image)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    def extra_repr(self) -> str:
        return repr(self.inner)
