"""The training module owns how the network runs: memory format and compilation, in one place."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cifar_lab.checkpoints import check_resume_compatible
from cifar_lab.errors import CheckpointError
from cifar_lab.models.simple_cnn import SimpleCNN
from cifar_lab.module import ClassifierModule
from conftest import SYNTH, compose_cfg


def _module(**kwargs) -> ClassifierModule:
    net = SimpleCNN(num_classes=10, filters=[8, 16], kernel_sizes=[3, 3], fc_units=32)
    return ClassifierModule(net=net, optimizer=partial(torch.optim.SGD, lr=0.1), **kwargs)


@pytest.mark.slow
def test_compiled_module_holds_each_parameter_once() -> None:
    plain, compiled = _module(), _module(compile=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    weights = [k for k in compiled.state_dict() if k.startswith("net.")]
    assert weights and len(weights) == len(compiled.net.state_dict())
    assert len({id(p) for p in compiled.parameters()}) == len(list(compiled.parameters()))


@pytest.mark.parametrize("memory_format,layout", [("channels_last", torch.channels_last),
                                                  ("contiguous", torch.contiguous_format)])
def test_memory_format_applies_to_network_and_input(memory_format: str, layout: torch.memory_format) -> None:
    module = _module(memory_format=memory_format)
    conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=layout)
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_memory_format_is_refused() -> None:
    with pytest.raises(ValueError, match=r"module.memory_format must be one of .* \(auto is decided before"):
        _module(memory_format="nhwc")


def test_resume_allowed_when_only_runtime_options_change(tmp_path: Path) -> None:
    base = [*SYNTH, "model=simple_cnn"]
    saved = OmegaConf.to_container(compose_cfg(base, tmp_path), resolve=True)
    changed = compose_cfg([*base, "module.compile=true", "module.compile_mode=reduce-overhead",
                           "module.memory_format=contiguous"], tmp_path)
    assert check_resume_compatible(saved, changed, "run.ckpt") == []  # no refusal, no warning
    # a checkpoint from before these were module options (runtime keys inside the model config)
    saved["model"].update(channels_last=True, compile=False)
    assert check_resume_compatible(saved, changed, "run.ckpt") == []
    other = compose_cfg([*base, "model.fc_units=64"], tmp_path)
    with pytest.raises(CheckpointError, match="model.fc_units: 512 in the checkpoint, 64 now"):
        check_resume_compatible(saved, other, "run.ckpt")


@pytest.mark.parametrize("num_classes", [10, 3])
def test_epoch_totals_give_torchmetrics_figures(num_classes: int) -> None:
    """The training step's in-place sums: the weighted mean loss and the top-1/top-k accuracy that
    MeanMetric and MulticlassAccuracy give over the same batches (uneven sizes, bf16 logits with ties)."""
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from cifar_lab.module import EpochTotals

    k = min(5, num_classes)
    totals, mean = EpochTotals(k), MeanMetric()
    top1, topk = (MulticlassAccuracy(num_classes, top_k=t, average="micro") for t in (1, k))
    gen = torch.Generator().manual_seed(0)
    for size in (7, 32, 1):
        logits = torch.randn(size, num_classes, generator=gen).bfloat16().float()
        labels = torch.randint(0, num_classes, (size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        totals.update(loss, logits, labels)
        mean.update(loss, size)
        top1.update(logits, labels)
        topk.update(logits, labels)
    got = totals.values()
    assert got["loss"].item() == pytest.approx(mean.compute().item(), rel=1e-6)
    assert got["acc"].item() == pytest.approx(top1.compute().item(), abs=1e-7)
    assert got["acc_top5"].item() == pytest.approx(topk.compute().item(), abs=1e-7)
    totals.reset()
    assert totals.values()["acc"].item() == 0.0


def test_epoch_totals_reduce_over_ranks_gives_the_whole_epoch() -> None:
    """Two ranks' sums, reduced, read as one process that saw both ranks' batches."""
    from cifar_lab.module import EpochTotals

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 10, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in (16, 5)]
    ranks, whole = [EpochTotals(5), EpochTotals(5)], EpochTotals(5)
    for totals, (logits, labels) in zip(ranks, batches):
        loss = torch.nn.functional.cross_entropy(logits, labels)
        totals.update(loss, logits, labels)
        whole.update(loss, logits, labels)
    other = ranks[1].values(reduce=lambda totals: totals)  # what rank 1 contributes to the sum
    reduced = ranks[0].values(reduce=lambda totals: totals + torch.cat((ranks[1].sums, torch.tensor([5.0]))))
    assert other["acc"].item() == pytest.approx(ranks[1].values()["acc"].item())
    for name, value in whole.values().items():
        assert reduced[name].item() == pytest.approx(value.item(), rel=1e-6), name
    assert reduced["acc"].item() != pytest.approx(ranks[0].values()["acc"].item())


def test_the_evaluation_loss_is_the_mean_over_images_not_over_batches() -> None:
    """Uneven batches (DDP shards, a last short batch) weigh by their images, with no read from the device."""
    from cifar_lab.module import WeightedMean

    mean = WeightedMean()
    mean.update(torch.tensor(1.0), 16)
    mean.update(torch.tensor(4.0), 2)
    assert mean.compute().item() == pytest.approx((16 * 1.0 + 2 * 4.0) / 18)
