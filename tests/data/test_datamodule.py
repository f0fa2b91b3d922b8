"""The CIFAR datamodule: splits, class balance, normalisation, sharding, per-image path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_lab.data.archive import CifarArchive
from cifar_lab.data.augment import HorizontalFlip, RandomCrop
from cifar_lab.data.datamodule import CIFARDataModule, balanced_split, partition_rows_
from cifar_lab.data.image_folder import ImageFolderSource
from cifar_lab.data.sampling import ShardedBatchSampler
from cifar_lab.data.splits import DataError
from cifar_lab.data.synthetic import SyntheticSource

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def make_dm(source, **kwargs) -> CIFARDataModule:
    defaults = dict(num_classes=10, batch_size=16, val_size=20, mean=MEAN, std=STD, seed=1)
    return CIFARDataModule(source, **{**defaults, **kwargs})


def test_archive_splits_shapes_and_balance(cifar_root: Path) -> None:
    dm = make_dm(CifarArchive(cifar_root, download=False))
    dm.prepare_data()
    dm.setup("fit")
    train_x, train_y = dm.splits["train"]
    val_x, val_y = dm.splits["val"]
    assert (len(train_x), len(val_x), len(dm.splits["test"][0])) == (80, 20, 30)
    assert train_x.dtype == torch.uint8 and val_y.dtype == torch.int64
    assert torch.bincount(val_y, minlength=10).tolist() == [2] * 10  # class-balanced
    # train and val are disjoint: together they are the original training set
    all_x = CifarArchive(cifar_root, download=False).load().train_x
    assert len(torch.unique(torch.cat([train_x, val_x]).flatten(1), dim=0)) == len(torch.unique(all_x.flatten(1), dim=0))


def test_val_split_is_seeded() -> None:
    labels = torch.arange(200) % 10
    assert torch.equal(balanced_split(labels, 30, 10, seed=5)[1], balanced_split(labels, 30, 10, seed=5)[1])
    assert not torch.equal(balanced_split(labels, 30, 10, seed=5)[1], balanced_split(labels, 30, 10, seed=6)[1])


def test_partition_in_place_matches_indexing_without_a_copy() -> None:
    labels = torch.arange(1000) % 10
    images = torch.randint(0, 256, (1000, 3, 4, 4), dtype=torch.uint8)
    keep, held = balanced_split(labels, 130, 10, seed=1)
    expected = (images[keep].clone(), images[held].clone())
    storage = images.untyped_storage().data_ptr()
    train, val = partition_rows_(images, keep, held, chunk=64)  # several chunks
    assert torch.equal(train, expected[0]) and torch.equal(val, expected[1])
    assert train.untyped_storage().data_ptr() == val.untyped_storage().data_ptr() == storage


def test_val_size_zero_validates_on_test(cifar_root: Path) -> None:
    dm = make_dm(CifarArchive(cifar_root, download=False), val_size=0)
    dm.setup("fit")
    assert len(dm.splits["train"][0]) == 100
    assert torch.equal(dm.splits["val"][0], dm.splits["test"][0])


def test_bad_val_size_and_class_count(cifar_root: Path) -> None:
    with pytest.raises(DataError, match="val_size=500"):
        make_dm(CifarArchive(cifar_root, download=False), val_size=500).setup("fit")
    with pytest.raises(DataError, match="data.num_classes=10"):
        make_dm(CifarArchive(cifar_root, download=False), num_classes=100).setup("fit")


def test_eval_batches_are_normalised_uint8_to_float(cifar_root: Path) -> None:
    dm = make_dm(CifarArchive(cifar_root, download=False))
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32) and y.shape == (16,)
    out, _ = dm.on_after_batch_transfer((x, y), 0)  # no trainer: evaluation path
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)


def test_image_folder_and_synthetic_modules(image_root: Path) -> None:
    dm = make_dm(ImageFolderSource(image_root), num_classes=3, val_size=3)
    dm.setup("fit")
    assert dm.classes == ["class0", "class1", "class2"]
    assert len(dm.splits["train"][0]) == 15
    syn = make_dm(SyntheticSource(num_classes=4, train_size=80, test_size=40), num_classes=4, val_size=8)
    syn.setup("fit")
    batches = list(syn.train_dataloader())
    assert sum(len(b[0]) for b in batches) == 72


def test_rank_shards_are_disjoint_and_cover_the_split() -> None:
    shards = [
        torch.cat(list(ShardedBatchSampler(103, 10, shuffle=True, seed=7, rank=r, world_size=2)))
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 52  # padded to equal length for DDP
    assert set(torch.cat(shards).tolist()) == set(range(103))
    eval_shards = [
        torch.cat(list(ShardedBatchSampler(103, 10, shuffle=False, rank=r, world_size=2, pad_to_even=False)))
        for r in range(2)
    ]
    assert sorted(torch.cat(eval_shards).tolist()) == list(range(103))  # evaluation counts each image once


def test_sampler_reshuffles_per_epoch_reproducibly() -> None:
    sampler = ShardedBatchSampler(50, 50, shuffle=True, seed=3)
    first = next(iter(sampler))
    sampler.set_epoch(1)
    second = next(iter(sampler))
    sampler.set_epoch(0)
    assert not torch.equal(first, second) and torch.equal(first, next(iter(sampler)))


def test_per_image_pipeline_matches_batched_semantics(cifar_root: Path) -> None:
    augment = {"flip": HorizontalFlip(p=1.0)}  # deterministic, so both paths must agree exactly
    batched = make_dm(CifarArchive(cifar_root, download=False), augment=augment)
    per_image = make_dm(CifarArchive(cifar_root, download=False), augment=augment, pipeline="per_image")
    for dm in (batched, per_image):
        dm.setup("fit")

    class FakeTrainer:
        training, current_epoch, global_rank, world_size = True, 0, 0, 1

    outs = []
    for dm in (batched, per_image):
        dm.trainer = FakeTrainer()
        x, y = next(iter(dm.train_dataloader()))
        outs.append(dm.on_after_batch_transfer((x, y), 0))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=0)
    assert torch.equal(outs[0][1], outs[1][1])


def test_training_batches_are_augmented_per_image(cifar_root: Path) -> None:
    dm = make_dm(CifarArchive(cifar_root, download=False), augment={"crop": RandomCrop(32, padding=4)})
    dm.setup("fit")

    class FakeTrainer:
        training, current_epoch, global_rank, world_size = True, 0, 0, 1

    dm.trainer = FakeTrainer()
    x, y = next(iter(dm.train_dataloader()))
    out, _ = dm.on_after_batch_transfer((x, y), 0)
    plain = dm.normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert not torch.allclose(out, plain)  # cropped


def test_alternating_flip_gets_dataset_indices(cifar_root: Path) -> None:
    from cifar_lab.data.augment import AlternatingFlip

    dm = make_dm(CifarArchive(cifar_root, download=False), augment={"flip": AlternatingFlip(seed=0)}, batch_size=80)
    dm.setup("fit")

    class FakeTrainer:
        training, current_epoch, global_rank, world_size = True, 0, 0, 1

    dm.trainer = FakeTrainer()
    flipped = []
    for epoch in (0, 1):
        FakeTrainer.current_epoch = epoch
        dm.train_dataloader().sampler.set_epoch(epoch)
        x, y, idx = next(iter(dm.train_dataloader()))
        out, _ = dm.on_after_batch_transfer((x, y, idx), 0)
        order = idx.argsort()
        flipped.append(torch.isclose(out[order], dm.normalize(x.flip(-1))[order]).flatten(1).all(1))
    # every image is flipped in exactly one of two consecutive epochs
    assert torch.equal(flipped[0], ~flipped[1])


def test_a_batch_already_on_the_device_is_passed_through_and_others_are_moved() -> None:
    dm = make_dm(SyntheticSource(num_classes=10, train_size=40, test_size=10))
    batch = (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    assert dm.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert [t.device.type for t in moved] == ["meta", "meta"]
    assert dm.transfer_batch_to_device([batch[0], "x"], torch.device("cpu"), 0) == [batch[0], "x"]
