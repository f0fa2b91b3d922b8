"""The CIFAR LightningDataModule: uint8 tensors in memory, augmentation on the device."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cifar_lab.data.augment import BatchAugment
from cifar_lab.data.folds import fold_split
from cifar_lab.data.mixing import BatchMixer
from cifar_lab.data.sampling import PIPELINES, PerImageDataset, ShardedBatchSampler, TensorBatches
from cifar_lab.data.splits import DataError, ImageSplits

log = logging.getLogger(__name__)


def balanced_split(labels: Tensor, holdout: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (keep, holdout) where the holdout has ``holdout // num_classes`` of each class.

    The remainder of an uneven division goes to the lowest classes, one each.
    """
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        take = holdout // num_classes + (1 if c < holdout % num_classes else 0)
        if take > len(members):
            raise DataError(f"data.val_size={holdout} needs {take} images of class {c}, which has {len(members)}")
        held.append(members[torch.randperm(len(members), generator=g)[:take]])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return torch.nonzero(mask).flatten(), held_idx


def partition_rows_(x: Tensor, keep: Tensor, held: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """``(x[keep], x[held])`` as two views of ``x``'s own storage, rows reordered in place.

    ``x[keep]`` would copy nearly the whole training set and double the data path's peak
    memory. Only the held rows are copied aside; the kept rows move forward chunk by chunk,
    which is safe because ``keep`` is sorted, so ``keep[i] >= i``.
    """
    held_rows = x[held]
    for start in range(0, len(keep), chunk):
        rows = keep[start:start + chunk]
        x[start:start + len(rows)] = x[rows]
    x[len(keep):] = held_rows
    return x[: len(keep)], x[len(keep):]


class _ResumableBatchSampler(ShardedBatchSampler):
    """A training sampler that skips, once, the batches a resumed run already trained on.

    ``skip = (epoch, batches)``: the first pass over ``epoch`` starts at batch ``batches``;
    its length is unchanged (Lightning counts the skipped batches as done).
    """

    skip: tuple[int, int] | None = None

    def shard_indices(self) -> Tensor:
        shard = super().shard_indices()
        if self.skip is not None:
            epoch, batches = self.skip
            self.skip = None
            if epoch == self.epoch:
                shard = shard[batches * self.batch_size:]
        return shard


class ReadSplits:
    """The splits a datamodule has read (its classes and its train, val and test tensors), handed to the
    datamodule the run trains with so the data is read once (a plain class: Hydra keeps it as it is)."""

    def __init__(self, classes: list[str], splits: dict[str, tuple[Tensor, Tensor]]) -> None:
        self.classes, self.splits = classes, splits

    @property
    def train_images(self) -> int:
        return len(self.splits["train"][0])


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-style classification data from any source (archive, image folder, synthetic).

    ``setup`` loads each split once as a uint8 tensor. Training batches are gathered whole
    and augmented, normalised and optionally mixed in ``on_after_batch_transfer``, i.e. on
    the training device, with per-image random parameters. ``pipeline=per_image`` runs the
    same augmentation config through torchvision transforms in DataLoader workers instead.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        num_classes: int = 10,
        root: str | None = None,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        num_workers: int = 0,
        pipeline: str = "batched",
        augment: Mapping[str, Any] | Sequence[Any] | None = None,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
        mixing: BatchMixer | None = None,
        seed: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
        folds: int = 0,
        fold: int = 0,
        channels_last: bool = False,
        read: ReadSplits | None = None,
    ) -> None:
        super().__init__()
        if pipeline not in PIPELINES:
            raise ValueError(f"data.pipeline must be one of {PIPELINES}, got {pipeline!r}")
        self.source = source
        self.root = root  # what the source interpolates; kept for tools that inspect the data folder
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.pipeline = pipeline
        # batches leave in the network's layout (module.memory_format, given by cifar_lab.builders)
        self.channels_last = bool(channels_last)
        self.train_augment = BatchAugment(augment or {}, mean, std, channels_last=self.channels_last)
        self.eval_augment = BatchAugment({}, mean, std, channels_last=self.channels_last)
        self.mixer = mixing
        self.seed = seed
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.folds, self.fold = folds, fold  # k-fold cross-validation (folds=0: off, val_size applies)
        # ``read``: the same data's splits, read already by this config (settling a run): not read again
        self.classes: list[str] = list(read.classes) if read else []
        self.splits: dict[str, tuple[Tensor, Tensor]] = dict(read.splits) if read else {}
        self._aug_epoch: int | None = None
        self._generator: torch.Generator | None = None
        self._train_batches = 0  # training batches augmented in the current epoch
        self._resume: dict[str, Any] | None = None  # position loaded from a checkpoint
        self._announced = False

    # ----------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        """Download or extract on rank 0 only (Lightning calls this once per node)."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data: ImageSplits = self.source.load()
        if data.num_classes != self.num_classes:
            raise DataError(
                f"{self.source.describe()} has {data.num_classes} classes but data.num_classes={self.num_classes}; "
                f"set data.num_classes={data.num_classes}"
            )
        if not self.folds and (self.val_size < 0 or self.val_size >= len(data.train_x)):
            raise DataError(
                f"data.val_size={self.val_size} must lie in [0, {len(data.train_x) - 1}] "
                f"(the training set has {len(data.train_x)} images); 0 validates on the test set"
            )
        self.classes = data.classes
        if not self.folds and self.val_size == 0:
            # The reports validated on the test set; kept as an explicit option.
            train = (data.train_x, data.train_y)
            val = (data.test_x, data.test_y)
        else:
            keep, held = (fold_split(data.train_y, self.folds, self.fold, self.seed) if self.folds
                          else balanced_split(data.train_y, self.val_size, self.num_classes, self.seed))
            (train_x, val_x), (train_y, val_y) = (partition_rows_(t, keep, held) for t in (data.train_x, data.train_y))
            train, val = (train_x, train_y), (val_x, val_y)
        self.splits = {"train": train, "val": val, "test": (data.test_x, data.test_y)}

    def read_splits(self) -> ReadSplits:
        """What ``setup`` read, for a datamodule of the same data config (``read=``)."""
        if not self.splits:
            raise RuntimeError("the datamodule has read nothing yet: call setup() first")
        return ReadSplits(self.classes, self.splits)

    def _announce(self) -> None:
        """The data a run uses, said once, when it first asks for batches (not when a config check reads it)."""
        if not self._announced:
            self._announced = True
            sizes = (len(self.splits[split][0]) for split in ("train", "val", "test"))
            log.info("%s: %d train / %d val / %d test images", self.source.describe(), *sizes)

    # ------------------------------------------------------------- dataloaders
    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.splits:
            raise RuntimeError("call setup() before asking for dataloaders")
        self._announce()
        images, labels = self.splits[split]
        rank, world = self._rank_and_world()
        sampler = (_ResumableBatchSampler if train else ShardedBatchSampler)(
            len(images),
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last and train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            pad_to_even=train,
        )
        if train and self._resume:
            sampler.skip = (self._resume["epoch"], self._resume["batches"])
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                      persistent_workers=self.num_workers > 0)
        if train and self.pipeline == "per_image":
            dataset = PerImageDataset(images, labels, self.train_augment.to_torchvision())
            return DataLoader(dataset, batch_sampler=sampler, **common)
        with_indices = train and self.train_augment.requires_indices
        return DataLoader(TensorBatches(images, labels, with_indices), sampler=sampler, batch_size=None, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # ------------------------------------------------------- device-side work
    def _epoch_generator(self, device: torch.device, epoch: int) -> torch.Generator:
        """One generator per epoch and rank, seeded from (seed, epoch, rank): resumable."""
        if self._generator is None or self._aug_epoch != epoch or self._generator.device != device:
            rank, _ = self._rank_and_world()
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed((self.seed * 1_000_003 + epoch) * 1009 + rank)
            self._aug_epoch = epoch
            self._train_batches = 0
            self.train_augment.set_epoch(epoch)
            resume, self._resume = self._resume, None
            if resume and resume["epoch"] == epoch and resume.get("rank", 0) == rank:
                self._generator.set_state(resume["generator"])
                self._train_batches = resume["batches"]
        return self._generator

    # -------------------------------------------------------------- resuming
    def state_dict(self) -> dict[str, Any]:
        """Position in the current training epoch, saved with every checkpoint.

        A run resumed from a mid-epoch checkpoint then continues with the next batch of
        the same permutation and the same augmentation draws.
        """
        if self._generator is None or self._aug_epoch is None:
            return {}
        return {"epoch": self._aug_epoch, "batches": self._train_batches, "rank": self._rank_and_world()[0],
                "generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict else None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A batch of tensors already on the device (CPU training) is returned as it is: Lightning's
        # generic walk over the collection costs about 0.1 ms of every step for nothing.
        if isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        x, y, *rest = batch
        indices = rest[0] if rest else None
        training = self.trainer is not None and self.trainer.training
        if training:
            epoch = self.trainer.current_epoch
            generator = self._epoch_generator(x.device, epoch)
            self._train_batches += 1
            if x.dtype == torch.uint8:
                x = self.train_augment.to(x.device)(x, generator=generator, indices=indices)
            elif self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixer is not None:
                x, y = self.mixer(x, y, epoch=epoch, generator=generator)
        elif x.dtype == torch.uint8:
            x = self.eval_augment.to(x.device)(x)
        return x, y

    def normalize(self, images: Tensor) -> Tensor:
        """Evaluation preprocessing of uint8 images, for prediction outside a Trainer."""
        return self.eval_augment.to(images.device)(images)
