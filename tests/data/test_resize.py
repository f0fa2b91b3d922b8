"""Progressive resizing: the scheduled size per epoch, in the pipeline, and refused schedules."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cifar_lab.data.augment import BatchAugment, ProgressiveResize, RandomCrop

from conftest import random_images


def test_size_follows_the_schedule_and_keeps_dtype() -> None:
    op = ProgressiveResize([[1, 16], [3, 24], [5, None]])
    x = random_images(4)
    sizes = {}
    for epoch in range(7):
        op.set_epoch(epoch)
        y = op(x)
        assert y.dtype == torch.uint8 and y.shape[:2] == (4, 3)
        sizes[epoch] = y.shape[-1]
    assert sizes == {0: 32, 1: 16, 2: 16, 3: 24, 4: 24, 5: 32, 6: 32}
    op.set_epoch(3)
    assert torch.equal(op(x), TF.resize(x, [24, 24], antialias=True))  # antialiased bilinear
    op.set_epoch(6)
    assert op(x) is x  # full size: untouched


def test_in_a_pipeline_after_the_crop() -> None:
    op = ProgressiveResize([[0, 20]])
    pipeline = BatchAugment({"crop": RandomCrop(32, padding=2), "resize": op}, channels_last=True)
    pipeline.set_epoch(0)
    out = pipeline(random_images(8), torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 20, 20) and out.dtype == torch.float32


@pytest.mark.parametrize("schedule", [[[0, 0]], [[-1, 24]], [[2, 24], [1, 32]], [[0, 24, 3]]])
def test_bad_schedules_are_refused(schedule) -> None:
    with pytest.raises(ValueError, match="ProgressiveResize schedule"):
        ProgressiveResize(schedule)


def test_a_schedule_that_never_returns_to_full_size_is_refused_before_training(tmp_path) -> None:
    from cifar_lab.config.schema import find_problems

    from conftest import compose_cfg

    full = compose_cfg(["experiment=speedrun"], tmp_path).data.augment.resize.schedule[-1][0]  # first full-size epoch
    short = find_problems(compose_cfg(["experiment=speedrun", f"trainer.max_epochs={full}"], tmp_path))
    assert len(short) == 1 and short[0].startswith("data.augment.resize.schedule=")
    assert f"trainer.max_epochs={full}" in short[0] and "data.augment.resize=null" in short[0]
    assert find_problems(compose_cfg(["experiment=speedrun", f"trainer.max_epochs={full + 1}"], tmp_path)) == []
    assert find_problems(compose_cfg(["experiment=speedrun", "trainer.max_epochs=2",
                                      "data.augment.resize=null"], tmp_path)) == []
