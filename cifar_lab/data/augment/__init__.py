"""Batched data augmentation that runs on the training device.

The training split lives in memory as one ``uint8`` tensor ``(N, 3, H, W)``. The
datamodule gathers a ``uint8`` batch, moves it to the device and calls a
:class:`BatchAugment` on it in ``on_after_batch_transfer``. Every op works on a whole
batch ``(B, C, H, W)`` with tensor ops (no PIL; Python loops at most over the groups of
images that drew the same operation), while drawing ONE random parameter set PER IMAGE.
Conventions shared by all ops: :mod:`.base`.

Where each op lives
-------------------
* :mod:`.indexing`: ``RandomCrop``, ``HorizontalFlip``, ``AlternatingFlip``, pure
  re-indexings executed as one ``uint8`` gather (or row copies) per run of such ops: the
  measured fast path, hand-written.
* :mod:`.normalize`: ``Normalize`` (``uint8`` -> normalised float32).
* :mod:`.handwritten`: ``RandomGrayscale``, ``RandomAutocontrast``, kept hand-written
  because kornia's versions measured more than 1.5x slower (docs/benchmarks.md), and
  ``ColorJitter``, because kornia's reads values back to the host on every call.
* :mod:`.kornia_ops`: ``RandomRotation``, ``Cutout``, ``RandomErasing`` (and kornia's
  grayscale/autocontrast/colour jitter) delegated to ``kornia.augmentation``, drawn from
  the datamodule's generator.
* :mod:`.policies`: ``RandAugment``, ``TrivialAugment``, ``AutoAugment`` (kornia's).
* :mod:`.resize`: ``ProgressiveResize``, smaller images in the early epochs (torchvision's resize).

Configs name ops as ``cifar_lab.data.augment.<Op>`` (conf/augment/).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from cifar_lab.data.augment.base import BatchOp, BatchOpTransform, Params, _check_batch, cpu_threads
from cifar_lab.data.augment.handwritten import ColorJitter, RandomAutocontrast, RandomGrayscale
from cifar_lab.data.augment.indexing import (
    AlternatingFlip,
    HorizontalFlip,
    RandomCrop,
    _compose_maps,
    _crop_flip_windows,
    _gather_maps,
    _IndexOp,
    _window_run,
)
from cifar_lab.data.augment.kornia_ops import (
    Cutout,
    KorniaColorJitter,
    KorniaOp,
    KorniaRandomAutocontrast,
    KorniaRandomGrayscale,
    RandomErasing,
    RandomRotation,
)
from cifar_lab.data.augment.normalize import Normalize
from cifar_lab.data.augment.policies import AutoAugment, RandAugment, TrivialAugment
from cifar_lab.data.augment.resize import ProgressiveResize

__all__ = [
    "cpu_threads",
    "BatchOp",
    "KorniaOp",
    "RandomCrop",
    "HorizontalFlip",
    "AlternatingFlip",
    "ColorJitter",
    "KorniaColorJitter",
    "RandomRotation",
    "RandomGrayscale",
    "RandomAutocontrast",
    "KorniaRandomGrayscale",
    "KorniaRandomAutocontrast",
    "Cutout",
    "RandomErasing",
    "RandAugment",
    "TrivialAugment",
    "AutoAugment",
    "ProgressiveResize",
    "Normalize",
    "BatchAugment",
    "BatchOpTransform",
]


# ----------------------------------------------------------------------------- fused crop/flip runs


# Defined here, not in indexing.py: it looks up ``_window_run`` in this package's namespace,
# where the fast-path tests switch the row-window path off to compare it with the gather.


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


# ----------------------------------------------------------------------------- pipeline


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

