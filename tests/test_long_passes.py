"""Long passes outside the training loop say how far they are: plain lines with the time left."""

from __future__ import annotations

import io

import pytest
import torch

from cifar_lab.console import PassProgress
from cifar_lab.deploy.robustness import check_max_images, corruption_accuracy, subset
from cifar_lab.errors import ConfigError


def test_progress_lines_count_and_say_what_is_left() -> None:
    stream = io.StringIO()
    progress = PassProgress("robustness", 4, "batches", every_s=0, stream=stream)
    for _ in range(4):
        progress.advance(1, "fog s2")
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"robustness: {i}/4 batches" for i in range(1, 5)]
    assert lines[0].endswith("left") and "about" in lines[0] and "(fog s2)" in lines[0]
    assert lines[-1].endswith("done in 0s")


def test_a_pass_shorter_than_the_interval_prints_nothing() -> None:
    stream = io.StringIO()
    progress = PassProgress("test", 3, every_s=60, stream=stream)
    for _ in range(3):
        progress.advance()
    assert stream.getvalue() == ""


def test_robustness_prints_progress_per_corruption_and_can_use_fewer_images(monkeypatch, capsys) -> None:
    monkeypatch.setenv("CIFAR_LAB_PROGRESS_S", "0")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    result = corruption_accuracy(net, lambda x: x.float() / 255, images, labels, ["fog", "contrast"], [1, 5],
                                 batch_size=8, clean_acc=0.5, max_images=16)
    lines = capsys.readouterr().out.splitlines()
    # 2 batches x 2 corruptions x 2 severities (the clean accuracy is the test pass's, not run again)
    assert len(lines) == 8 and lines[-1].startswith("robustness: 8/8 batches (contrast s5), done in")
    assert lines[0].startswith("robustness: 1/8 batches (fog s1), ")
    assert result["images"] == 16
    # the subset is seeded, in the images' order, and all images when max_images is null or larger
    picked, picked_labels = subset(images, labels, 16, seed=0)
    assert torch.equal(subset(images, labels, 16, seed=0)[0], picked) and len(picked) == 16
    assert not torch.equal(subset(images, labels, 16, seed=1)[0], picked)
    assert subset(images, labels, None)[0] is images and subset(images, labels, 99)[0] is images
    rows = [next(i for i in range(40) if torch.equal(images[i], image)) for image in picked]
    assert rows == sorted(rows) and torch.equal(labels[rows], picked_labels)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "all", True])
def test_max_images_must_be_a_count(bad) -> None:
    with pytest.raises(ConfigError, match="corruption.max_images must be a whole number >= 1"):
        check_max_images(bad)
