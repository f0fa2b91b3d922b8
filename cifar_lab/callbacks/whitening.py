"""Initialise a network's first convolution as a patch-whitening layer from training images."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch import Tensor, nn

from cifar_lab.models.whitening import init_whitening_

log = logging.getLogger(__name__)

__all__ = ["WhiteningInit", "training_images"]


def training_images(datamodule: L.LightningDataModule, num_images: int, seed: int = 0) -> Tensor:
    """A seeded random sample of training images, normalised as the network sees them (float).

    Uses the datamodule's in-memory training split (``splits["train"]``, uint8) and its
    ``normalize``; other datamodules are read through their training loader.
    """
    splits = getattr(datamodule, "splits", None)
    if splits and "train" in splits:
        images = splits["train"][0]
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(images), generator=g)[: min(num_images, len(images))]
        sample = images[pick.sort().values]
        normalize = getattr(datamodule, "normalize", None)
        return normalize(sample) if normalize is not None and sample.dtype == torch.uint8 else sample.float()
    batches, seen = [], 0
    for batch in datamodule.train_dataloader():
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        batches.append(x.float())
        seen += len(x)
        if seen >= num_images:
            break
    if not batches:
        raise RuntimeError("the training loader yielded no images to compute whitening statistics from")
    return torch.cat(batches)[:num_images]


class WhiteningInit(L.Callback):
    """At the start of fitting, set ``module`` (a ``nn.Conv2d`` inside the LightningModule) to
    the patch-whitening filters of ``num_images`` training images.

    It runs in ``setup("fit")``, i.e. before a checkpoint is restored, so resumed runs keep
    their trained weights. The conv's weight keeps its ``requires_grad`` (frozen in
    :class:`~cifar_lab.models.speedrun_net.SpeedrunNet`); its bias trains for the first
    ``bias_epochs`` epochs and is frozen afterwards (``null``: never frozen).

    Args:
        module: dotted path of the conv from the LightningModule, e.g. ``net.whiten``.
        num_images: images sampled (seeded) from the training split.
        eps: damping of weak directions (see :func:`patch_whitening_weights`).
        symmetric: filters and their negations (the conv needs ``2 C k k`` outputs).
        bias_epochs: epochs during which the conv's bias learns.
        seed: seed of the image sample.
    """

    def __init__(self, module: str = "net.whiten", num_images: int = 5000, eps: float = 5e-4,
                 symmetric: bool = True, bias_epochs: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.module = module
        self.num_images = int(num_images)
        self.eps = float(eps)
        self.symmetric = symmetric
        self.bias_epochs = bias_epochs
        self.seed = int(seed)

    def _conv(self, pl_module: L.LightningModule) -> nn.Conv2d:
        conv = pl_module.get_submodule(self.module)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"WhiteningInit.module={self.module!r} is a {type(conv).__name__}, not a nn.Conv2d")
        return conv

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        conv = self._conv(pl_module)
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("WhiteningInit needs the Trainer to be given a datamodule")
        images = training_images(datamodule, self.num_images, self.seed).to(conv.weight.device)
        init_whitening_(conv, images, eps=self.eps, symmetric=self.symmetric)
        log.info("whitening init of %s from %d training images (eps=%g)", self.module, len(images), self.eps)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bias_epochs is None:
            return
        bias = self._conv(pl_module).bias
        if bias is not None:
            bias.requires_grad_(trainer.current_epoch < self.bias_epochs)
