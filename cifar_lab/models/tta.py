"""Test-time augmentation of a network: the views, their averaged softmax, and a wrapper module.

Views: the identity; with ``flip`` the mirror image; with ``translate=t > 0`` shifts by ``t``
pixels left, right, up and down (edges filled by ``padding_mode``), each also mirrored when
``flip`` is on. ``flip=true, translate=2`` gives 10 views. ``shifts=[[dy, dx], ...]`` lists the
shifts explicitly instead, e.g. ``[[1, 1], [-1, -1]]`` for two diagonal moves: with ``flip``
that is 6 views. :class:`cifar_lab.callbacks.tta.TTACallback` applies them in a Lightning test.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PADDING_MODES = ("reflect", "replicate", "constant")
View = tuple[bool, int, int]  # (mirror, shift down, shift right)


def tta_views(flip: bool = True, translate: int = 0,
              shifts: Sequence[Sequence[int]] | None = None) -> list[View]:
    """The views as ``(mirror, dy, dx)``; the identity comes first.

    ``shifts`` (pairs ``(dy, dx)``) replaces the four moves by ``translate``.
    """
    if translate < 0:
        raise ValueError(f"tta translate must be >= 0, got {translate}")
    if shifts is not None:
        pairs = [tuple(int(v) for v in pair) for pair in shifts]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"tta shifts must be pairs (dy, dx), got {shifts}")
        shifts = [(0, 0)] + [pair for pair in pairs if pair != (0, 0)]
    else:
        shifts = [(0, 0)]
        if translate:
            t = int(translate)
            shifts += [(0, t), (0, -t), (t, 0), (-t, 0)]
    mirrors = (False, True) if flip else (False,)
    return [(m, dy, dx) for m in mirrors for dy, dx in shifts]


def apply_view(x: Tensor, view: View, padding_mode: str = "reflect") -> Tensor:
    """One view of a ``(B, C, H, W)`` float batch: optional mirror, then a shift by (dy, dx)."""
    mirror, dy, dx = view
    if mirror:
        x = x.flip(-1)
    if dy or dx:
        p = max(abs(dy), abs(dx))
        h, w = x.shape[-2:]
        padded = F.pad(x, (p, p, p, p), mode=padding_mode)
        # content moves by (dy, dx): output[i, j] = input[i - dy, j - dx]
        x = padded[..., p - dy: p - dy + h, p - dx: p - dx + w]
    return x


def tta_probs(fn: Callable[[Tensor], Tensor], x: Tensor, views: Sequence[View],
              padding_mode: str = "reflect") -> Tensor:
    """Softmax of ``fn`` averaged over ``views`` of ``x`` (float32, ``(B, num_classes)``)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"tta padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if not x.is_floating_point():
        raise TypeError("test-time augmentation expects normalised float images")
    total: Tensor | None = None
    for view in views:
        probs = fn(apply_view(x, view, padding_mode)).float().softmax(dim=1)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(views)


def probs_to_logits(probs: Tensor) -> Tensor:
    """Log-probabilities: logits whose softmax gives ``probs`` back."""
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class TestTimeAugmentation(nn.Module):
    """Wraps a network; ``forward`` returns log of the softmax averaged over the TTA views."""

    def __init__(self, net: nn.Module, flip: bool = True, translate: int = 0,
                 padding_mode: str = "reflect", shifts: Sequence[Sequence[int]] | None = None,
                 views: Sequence[View] | None = None) -> None:
        super().__init__()
        self.net = net
        self.views = list(views) if views is not None else tta_views(flip, translate, shifts)  # views: given as is
        self.padding_mode = padding_mode

    def forward(self, x: Tensor) -> Tensor:
        return probs_to_logits(tta_probs(self.net, x, self.views, self.padding_mode))
