"""Colour ops kept hand-written: measured faster than their kornia counterparts.

Both are single elementwise passes on the ``uint8`` batch; the kornia versions
(:class:`~cifar_lab.data.augment.kornia_ops.KorniaRandomGrayscale`,
:class:`~cifar_lab.data.augment.kornia_ops.KorniaRandomAutocontrast`) convert to float and
back around kornia's per-call overhead (``benchmarks/kornia_vs_handwritten.py``,
docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from cifar_lab.data.augment.base import BatchOp, Params, _bcast, _bernoulli, _check_batch, _max_value, _to_float


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

