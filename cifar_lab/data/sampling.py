"""Whole-batch sampling from in-memory tensors, sharded across DDP ranks.

A regular DataLoader collates one sample at a time; for 32x32 images that Python loop
costs more than the augmentation. Here the sampler yields index tensors and the dataset
gathers a whole uint8 batch with one indexing op. The sampler shards by rank itself
(Lightning's automatic DistributedSampler is switched off in the trainer configs).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from cifar_lab.data.augment import cpu_threads

# batched: TensorBatches gathers a whole batch per index tensor; per_image: PerImageDataset, one image a time
PIPELINES = ("batched", "per_image")


class ShardedBatchSampler(Sampler[Tensor]):
    """Yields index batches; each rank gets its own shard, reshuffled every epoch.

    The permutation depends only on ``(seed, epoch)``, so every rank computes the same one
    and takes a disjoint slice, and a resumed run replays the same order.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_to_even: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # Training pads the permutation so every rank runs the same number of steps (DDP
        # needs that); evaluation leaves shards uneven so no sample is counted twice.
        self.pad_to_even = pad_to_even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_size(self) -> int:
        if self.pad_to_even:
            return math.ceil(self.num_samples / self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def shard_indices(self) -> Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        if self.pad_to_even and self.world_size > 1:
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            order = torch.cat([order, order[: total - self.num_samples]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Tensor]:
        shard = self.shard_indices()
        for start in range(0, len(shard), self.batch_size):
            batch = shard[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch


class TensorBatches(Dataset):
    """Indexed by a tensor of indices; returns the uint8 images and labels in one gather.

    With ``with_indices`` the dataset indices come along as a third element, for
    augmentations that need a stable per-image identity (alternating flips).
    """

    def __init__(self, images: Tensor, labels: Tensor, with_indices: bool = False) -> None:
        self.images = images
        self.labels = labels
        self.with_indices = with_indices

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Tensor) -> tuple[Tensor, ...]:
        if isinstance(index, Tensor) and index.dtype == torch.int64 and index.ndim == 1:
            # index_select copies whole rows; advanced indexing (images[index]) walks the
            # batch element by element and is far slower on the CPU for uint8 images
            with cpu_threads(self.images.device, 1):
                batch = (self.images.index_select(0, index), self.labels.index_select(0, index))
        else:
            batch = (self.images[index], self.labels[index])
        return (*batch, index) if self.with_indices else batch


class PerImageDataset(Dataset):
    """One image at a time through torchvision transforms, for transforms with no batched form."""

    def __init__(self, images: Tensor, labels: Tensor, transform) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[index]), self.labels[index]
