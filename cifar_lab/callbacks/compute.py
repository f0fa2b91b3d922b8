"""The compute a run spends, counted from the network as built: training and test FLOPs.

* Training: for every training batch, ``3 x`` the forward FLOPs of the network on one image of
  the batch's shape (after augmentation, so progressive resizing counts at its real size),
  ``x`` the images in the batch, on every process. ``3``: forward and backward
  (:data:`cifar_lab.models.flops.TRAIN_STEP_FORWARDS`).
* Distillation (``module.distill.teacher``): one forward of the teacher per training image, added
  to the training FLOPs.
* Test: the forward FLOPs of the module's forward as the test calls it, so test-time
  augmentation counts all its views, ``x`` the test images.

FLOPs are ``torch.utils.flop_counter`` FLOPs (2 per multiply-add of the convolutions and matrix
products, :mod:`cifar_lab.models.flops`), counted once per image shape. The totals are saved in
checkpoints, so a resumed run reports the compute of all its segments; ``metrics.json`` holds
them under ``compute``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from cifar_lab.models.flops import TRAIN_STEP_FORWARDS, forward_flops, forward_flops_per_image

__all__ = ["TrainingCompute"]

PETA = 1e15


def _images(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _shape_key(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


class TrainingCompute(L.Callback):
    """Counts training and test FLOPs of a run; :meth:`record` is what ``metrics.json`` stores."""

    def __init__(self) -> None:
        super().__init__()
        self.train_flops = 0
        self.train_images = 0
        self.test_flops = 0
        self.test_images = 0
        # forward FLOPs of one image, per image shape "CxHxW"
        self.train_forward: dict[str, int] = {}
        self.test_forward: dict[str, int] = {}
        self.teacher_forward: dict[str, int] = {}  # a distillation teacher's, counted in train_flops

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        x = _images(batch)
        key = _shape_key(tuple(x.shape[1:]))
        if key not in self.train_forward:
            net = getattr(pl_module, "net", pl_module)
            self.train_forward[key] = forward_flops_per_image(net, tuple(x.shape[1:]), x.device)
        n = int(x.shape[0]) * trainer.world_size
        self.train_images += n
        self.train_flops += TRAIN_STEP_FORWARDS * self.train_forward[key] * n
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None:  # distillation: one forward of the teacher per image
            if key not in self.teacher_forward:
                self.teacher_forward[key] = forward_flops_per_image(teacher, tuple(x.shape[1:]), x.device)
            self.train_flops += self.teacher_forward[key] * n

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_flops = self.test_images = 0  # the last test of the run is the one reported

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x = _images(batch)
        key = _shape_key(tuple(x.shape[1:]))
        if key not in self.test_forward:
            # the module's forward as the test calls it (test-time augmentation included)
            self.test_forward[key] = forward_flops(pl_module, torch.zeros_like(x[:1]))
        n = int(x.shape[0]) * trainer.world_size
        self.test_images += n
        self.test_flops += self.test_forward[key] * n

    def record(self) -> dict[str, Any]:
        """The totals: PFLOP, images, and the forward GFLOP of one image per shape."""
        return {
            "train_pflop": self.train_flops / PETA,
            "train_images": self.train_images,
            "train_forward_gflop_per_image": {k: v / 1e9 for k, v in self.train_forward.items()},
            **({"teacher_forward_gflop_per_image": {k: v / 1e9 for k, v in self.teacher_forward.items()}}
               if self.teacher_forward else {}),
            "test_pflop": self.test_flops / PETA,
            "test_images": self.test_images,
            "test_forward_gflop_per_image": {k: v / 1e9 for k, v in self.test_forward.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_flops": self.train_flops, "train_images": self.train_images,
                "train_forward": dict(self.train_forward)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_flops = int(state_dict.get("train_flops", 0))
        self.train_images = int(state_dict.get("train_images", 0))
        self.train_forward = dict(state_dict.get("train_forward", {}))
