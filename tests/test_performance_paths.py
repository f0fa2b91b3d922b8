"""The fast paths keep the semantics of the slow ones.

* the fused crop/flip (row windows) equals the general index-map gather in every layout;
* the default batched augmentation draws the same distribution of crops and flips as the
  per-image torchvision pipeline, and each output equals the reports' PIL pipeline
  (pad, crop, flip, ToTensor, Normalize) for the offsets and flip it drew;
* a real 2-process DDP run shards training samples disjointly and covers the split;
* bf16-mixed + channels_last (+ compile) trains end to end on the CPU;
* the per-device precision default and the CPU thread limiter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTH, compose_cfg
from conftest import random_images as _batch

import cifar_lab.data.augment as A
from cifar_lab.data.augment import (
    AlternatingFlip,
    BatchAugment,
    HorizontalFlip,
    Normalize,
    RandomCrop,
    cpu_threads,
)
from cifar_lab.data.datamodule import CIFARDataModule
from cifar_lab.data.sampling import TensorBatches
from cifar_lab.data.synthetic import SyntheticSource

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _gather_path(aug: BatchAugment, x: torch.Tensor, seed: int, indices=None) -> torch.Tensor:
    """The same augmentation with the fused window path switched off."""
    original = A._window_run
    A._window_run = lambda run: False
    try:
        return aug.augment(x, torch.Generator().manual_seed(seed), indices)
    finally:
        A._window_run = original


# ----------------------------------------------------------------------------- fused crop/flip


WINDOW_CASES = {
    "crop_flip": lambda: [RandomCrop(32, 4), HorizontalFlip(0.5)],
    "crop_only": lambda: [RandomCrop(32, 4)],
    "flip_only": lambda: [HorizontalFlip(0.5)],
    "two_flips": lambda: [RandomCrop(32, 2), HorizontalFlip(0.5), HorizontalFlip(0.7)],
    "asymmetric": lambda: [RandomCrop(32, (1, 2, 5, 3)), HorizontalFlip(0.5)],
    "smaller_crop": lambda: [RandomCrop(24, 4), HorizontalFlip(0.5)],
    "fill_per_channel": lambda: [RandomCrop(32, 3, fill=(10, 128, 250)), HorizontalFlip(0.5)],
    "crop_p": lambda: [RandomCrop(32, 4, p=0.5), HorizontalFlip(0.5)],
    "no_padding": lambda: [RandomCrop(28, 0), HorizontalFlip(0.5)],
}


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_window_path_equals_gather_path(case, dtype):
    ops = WINDOW_CASES[case]()
    # a non-square input where the crop size allows it (p < 1 needs size == input size)
    x = _batch(24, dtype=dtype) if case in ("smaller_crop", "crop_p") else _batch(24, dtype=dtype, h=32, w=30)
    aug = BatchAugment(ops, MEAN, STD)
    assert A._window_run([(op, {}, 0, 0) for op in aug.ops.values()])
    fast = aug.augment(x, torch.Generator().manual_seed(5))
    slow = _gather_path(aug, x, 5)
    assert fast.dtype == x.dtype and fast.shape == slow.shape
    assert torch.equal(fast, slow)


def test_window_path_with_alternating_flip_and_edge_sizes():
    aug = BatchAugment({"crop": RandomCrop(32, 4), "alt": AlternatingFlip(seed=1)}, MEAN, STD)
    for b in (1, 7):
        x = _batch(b)
        idx = torch.arange(100, 100 + b)
        for epoch in (0, 1):
            aug.set_epoch(epoch)
            fast = aug.augment(x, torch.Generator().manual_seed(3), idx)
            assert torch.equal(fast, _gather_path(aug, x, 3, idx))
    empty = _batch(1)[:0]
    assert BatchAugment([RandomCrop(32, 4), HorizontalFlip()], MEAN, STD).augment(empty).shape == (0, 3, 32, 32)


def test_runs_that_are_not_windows_still_match_sequential_ops():
    # reflect padding, or a crop after a flip, take the general gather
    ops = [HorizontalFlip(0.5), RandomCrop(32, 4, "reflect"), HorizontalFlip(0.5)]
    aug = BatchAugment(ops, MEAN, STD)
    assert not A._window_run([(op, {}, 0, 0) for op in aug.ops.values()])
    x = _batch(16)
    g = torch.Generator().manual_seed(9)
    ref = x
    for op in ops:
        ref = op(ref, g)
    assert torch.equal(aug.augment(x, torch.Generator().manual_seed(9)), ref)


def test_scratch_buffer_is_reused_without_leaking_between_batches():
    aug = BatchAugment([RandomCrop(32, 4), HorizontalFlip(0.5)], MEAN, STD)
    first, second = _batch(8, seed=1), _batch(8, seed=2)
    out1 = aug.augment(first, torch.Generator().manual_seed(0)).clone()
    aug.augment(second, torch.Generator().manual_seed(1))
    assert len(aug._scratch) == 1
    again = aug.augment(first, torch.Generator().manual_seed(0))
    assert torch.equal(again, out1)  # no content of `second` left in the padding


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_channels_last_normalize_matches_nchw_for_both_layouts(dtype):
    x = _batch(6, dtype=dtype)
    ref = Normalize(MEAN, STD)(x)
    norm = Normalize(MEAN, STD, channels_last=True)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out = norm(inp)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref)


def test_tensor_batches_index_select_equals_fancy_indexing():
    images = _batch(50)
    labels = torch.arange(50)
    idx = torch.tensor([3, 3, 49, 0, 17])
    x, y, i = TensorBatches(images, labels, with_indices=True)[idx]
    assert torch.equal(x, images[idx]) and torch.equal(y, labels[idx]) and torch.equal(i, idx)
    x2, y2 = TensorBatches(images, labels)[[1, 2]]  # other index types keep working
    assert torch.equal(x2, images[[1, 2]]) and torch.equal(y2, labels[[1, 2]])


def test_cpu_threads_limits_and_restores():
    before = torch.get_num_threads()
    with cpu_threads(torch.device("cpu"), 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(torch.device("cpu"), None):
        assert torch.get_num_threads() == before
    with cpu_threads(torch.device("meta"), 1):  # other devices: untouched
        assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- vs the per-image reference


def _coordinate_image() -> torch.Tensor:
    """uint8 (3, 32, 32): channel 0 = row + 1, channel 1 = column + 1, channel 2 = 200,
    so every output pixel names its source pixel (0 = padding)."""
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    cols = torch.arange(1, 33, dtype=torch.uint8).view(1, 32).expand(32, 32)
    return torch.stack([rows, cols, torch.full((32, 32), 200, dtype=torch.uint8)])


def _decode_offsets(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flipped) per image of crops-with-padding-4 (+ flips) of the coordinate image.

    ``out`` is (B, 3, 32, 32) in 0..255 units; top/left are offsets in the padded image.
    Pixels (16, 16) and (16, 17) always come from inside the image for offsets within 4.
    """
    src_row, src_col = out[:, 0].round().long() - 1, out[:, 1].round().long() - 1
    assert (src_row[:, 16, 16] >= 0).all() and (src_col[:, 16, 16:18] >= 0).all()
    top = src_row[:, 16, 16] - 16 + 4
    flipped = src_col[:, 16, 17] < src_col[:, 16, 16]
    left = torch.where(flipped, src_col[:, 16, 16] + 4 - (31 - 16), src_col[:, 16, 16] - 16 + 4)
    return top, left, flipped


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(-1, 1, 1)
    std = torch.tensor(STD).view(-1, 1, 1)
    return (x * std + mean) * 255


@pytest.mark.slow
def test_batched_default_augmentation_matches_per_image_distribution():
    n = 3240  # 20 draws per (top, left, flip) outcome on average
    image = _coordinate_image()
    aug = BatchAugment({"crop": RandomCrop(32, 4), "flip": HorizontalFlip(0.5)}, MEAN, STD, channels_last=True)
    batched = aug(image.expand(n, 3, 32, 32).contiguous(), generator=torch.Generator().manual_seed(0))
    batched_outcomes = _decode_offsets(_denormalize(batched))

    torch.manual_seed(0)  # the per-image path draws from the global RNG
    per_image = aug.to_torchvision()
    per_image_outcomes = _decode_offsets(_denormalize(torch.stack([per_image(image) for _ in range(n)])))

    def histogram(outcomes):
        top, left, flipped = outcomes
        assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
        flat = (top * 9 + left) * 2 + flipped.long()
        return np.bincount(flat.numpy(), minlength=162).astype(float)

    hb, hp = histogram(batched_outcomes), histogram(per_image_outcomes)
    assert hb.sum() == hp.sum() == n and (hb > 0).all() and (hp > 0).all()  # every offset and flip occurs
    # chi-square homogeneity of the two samples over the 162 outcomes (df = 161):
    # the 99.99% quantile is about 235; fixed seeds make this deterministic
    pooled = (hb + hp) / 2
    chi2 = float((((hb - pooled) ** 2 + (hp - pooled) ** 2) / pooled).sum())
    assert chi2 < 235, chi2
    for h in (hb, hp):  # flips at rate 1/2, offsets uniform
        flips = h.reshape(9, 9, 2)[..., 1].sum() / n
        assert abs(flips - 0.5) < 0.04
        per_top = h.reshape(9, 9, 2).sum(axis=(1, 2)) / n
        assert np.abs(per_top - 1 / 9).max() < 0.03


def test_batched_output_equals_reports_pil_pipeline_for_drawn_offsets():
    import PIL.Image
    from torchvision import transforms as T
    from torchvision.transforms import functional as TVF

    data = _batch(64, seed=4)
    coords = _coordinate_image().expand(64, 3, 32, 32)
    # two channels carry coordinates (to read back the draw), the third random content
    x = torch.cat([coords[:, :2], data[:, 2:]], dim=1).contiguous()
    aug = BatchAugment({"crop": RandomCrop(32, 4), "flip": HorizontalFlip(0.5)}, MEAN, STD, channels_last=True)
    out = aug(x, generator=torch.Generator().manual_seed(1))
    assert out.is_contiguous(memory_format=torch.channels_last)
    to_tensor_norm = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    flips = 0
    tops, lefts, flipped_all = _decode_offsets(_denormalize(out))
    for i in range(len(x)):
        top, left, flipped = int(tops[i]), int(lefts[i]), bool(flipped_all[i])
        flips += flipped
        pil = PIL.Image.fromarray(x[i].permute(1, 2, 0).numpy())
        ref = TVF.crop(TVF.pad(pil, 4), top, left, 32, 32)
        if flipped:
            ref = TVF.hflip(ref)
        torch.testing.assert_close(out[i], to_tensor_norm(ref), atol=1e-5, rtol=1e-5)
    assert 0 < flips < len(x)


# ----------------------------------------------------------------------------- DDP sharding


class _IndexRecordingDataModule(CIFARDataModule):
    """Records the dataset indices of the training batches this rank augments."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            seen = self.__dict__.setdefault("seen", [])
            seen.append((self.trainer.current_epoch, batch[2].cpu(), batch[1].cpu()))
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and getattr(self, "seen", None):
            epochs = torch.tensor([e for e, idx, _ in self.seen for _ in range(len(idx))])
            indices = torch.cat([idx for _, idx, _ in self.seen])
            labels = torch.cat([lab for _, _, lab in self.seen])
            path = Path(self.out_dir) / f"rank{self.trainer.global_rank}.pt"
            torch.save({"epoch": epochs, "indices": indices, "labels": labels,
                        "split_labels": self.splits["train"][1]}, path)


def _tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))


@pytest.mark.slow
def test_two_process_ddp_ranks_see_disjoint_samples_covering_the_split(tmp_path):
    import lightning as L
    from functools import partial

    from cifar_lab.module import ClassifierModule

    dm = _IndexRecordingDataModule(
        SyntheticSource(num_classes=4, train_size=120, test_size=16, image_size=8, seed=3),
        num_classes=4, batch_size=16, val_size=20, seed=5,
        augment={"crop": RandomCrop(8, 1), "alt": AlternatingFlip(seed=0)},  # alternating flip carries indices
    )
    dm.out_dir = str(tmp_path)
    module = ClassifierModule(_tiny_net(), partial(torch.optim.SGD, lr=0.01), num_classes=4)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    n_train = len(ranks[0]["split_labels"])
    assert n_train == 100
    for epoch in (0, 1):
        shards = [r["indices"][r["epoch"] == epoch] for r in ranks]
        assert len(shards[0]) == len(shards[1]) == n_train // 2
        assert not set(shards[0].tolist()) & set(shards[1].tolist())  # disjoint
        assert sorted(torch.cat(shards).tolist()) == list(range(n_train))  # covering
    e0 = ranks[0]["indices"][ranks[0]["epoch"] == 0]
    e1 = ranks[0]["indices"][ranks[0]["epoch"] == 1]
    assert not torch.equal(e0, e1)  # reshuffled each epoch
    for r in ranks:  # labels travelled with their images
        assert torch.equal(r["labels"], r["split_labels"][r["indices"]])


# ----------------------------------------------------------------------------- precision, memory format, compile


def _train_fast(tmp_path: Path, extra: list[str]) -> dict:
    from cifar_lab.cli.train import train

    cfg = compose_cfg([*SYNTH, "logger=none", "debug=fast_dev_run", *extra], tmp_path)
    train(cfg)
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow
def test_bf16_mixed_channels_last_trains_on_cpu(tmp_path):
    metrics = _train_fast(tmp_path, ["trainer.precision=bf16-mixed", "module.memory_format=channels_last"])
    assert metrics["global_step"] == 1
    assert np.isfinite(metrics["metrics"]["train/loss"]) and np.isfinite(metrics["metrics"]["train/loss_step"])


@pytest.mark.slow
def test_bf16_mixed_channels_last_compile_trains_on_cpu(tmp_path):
    metrics = _train_fast(tmp_path, ["trainer.precision=bf16-mixed", "module.compile=true", "module.memory_format=channels_last"])
    assert metrics["global_step"] == 1
    assert all(np.isfinite(v) for v in metrics["metrics"].values())


