"""Optimizer and scheduler options: what they build, how often they step, gradient clipping."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cifar_lab import builders
from cifar_lab.module import ClassifierModule
from cifar_lab.optim.schedules import WarmupDecay, warmup_cosine
from conftest import compose_cfg

# A small simple CNN on 8x8 inputs keeps these Trainer runs to about a second.
SIZE = 8
TINY = ["data=synthetic", "model=simple_cnn", "model.filters=[4,8]", "model.fc_units=16", f"+model.input_size={SIZE}",
        "module.memory_format=contiguous", "trainer=cpu"]
BATCHES_PER_EPOCH = 4
EPOCHS = 3


def _loader(n: int = 2 * BATCHES_PER_EPOCH, batch: int = 2, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) * 3
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


class LrRecorder(L.Callback):
    """Learning rate of the first param group at the start of every training batch (the rate its step uses)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _trainer(callbacks: list, epochs: int = EPOCHS, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=callbacks, **kwargs)


def _fit_lrs(module: ClassifierModule, epochs: int = EPOCHS) -> list[float]:
    recorder = LrRecorder()
    _trainer([recorder], epochs).fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(4, seed=1))
    return recorder.lrs


def _module(overrides: list[str], tmp_path: Path) -> ClassifierModule:
    cfg = compose_cfg([*TINY, f"trainer.max_epochs={EPOCHS}", *overrides], tmp_path)
    return builders.build_module(cfg)


# ------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name,cls,expected", [
    ("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}),
    ("adam", torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}),
    ("adamw", torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.02}),
])
def test_optimizer_options(name: str, cls: type, expected: dict, tmp_path: Path) -> None:
    module = _module([f"optimizer={name}", "scheduler=none"], tmp_path)
    optimizer = module.configure_optimizers()
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    for key, value in expected.items():
        assert group[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_sgd_nesterov_override(tmp_path: Path) -> None:
    optimizer = _module(["optimizer=sgd", "optimizer.nesterov=true", "scheduler=none"], tmp_path).configure_optimizers()
    assert optimizer.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_no_decay_norm_and_bias_groups(name: str, tmp_path: Path) -> None:
    module = _module([f"optimizer={name}", "scheduler=none", "model=simple_cnn_bn", "model.filters=[4,8]",
                      "model.fc_units=16", "module.no_decay_norm_and_bias=true"], tmp_path)
    optimizer = module.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    wd = 5e-4 if name == "sgd" else 0.02
    assert decay["weight_decay"] == pytest.approx(wd) and no_decay["weight_decay"] == 0.0
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    for mod_name, mod in module.net.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            exempt = isinstance(mod, nn.BatchNorm2d) or pname == "bias"
            assert id(p) in (no_decay_ids if exempt else decay_ids), f"{mod_name}.{pname}"
    # conv and linear weights decay; BatchNorm scales/shifts and every bias do not
    assert len(decay["params"]) == 4
    # BatchNorm weight + bias of 4 and 8 channels, FC biases of 16 and 10 (convs have no bias with BN)
    assert sum(p.numel() for p in no_decay["params"]) == 2 * 4 + 2 * 8 + 16 + 10
    assert len(decay_ids | no_decay_ids) == len(list(module.net.parameters()))


def test_weight_decay_on_every_parameter_by_default(tmp_path: Path) -> None:
    optimizer = _module(["optimizer=sgd", "scheduler=none"], tmp_path).configure_optimizers()
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == pytest.approx(5e-4)


# ------------------------------------------------------------------------- schedulers
def _per_epoch(lrs: list[float]) -> list[float]:
    """One rate per epoch, checking it stayed constant within the epoch."""
    epochs = [lrs[i:i + BATCHES_PER_EPOCH] for i in range(0, len(lrs), BATCHES_PER_EPOCH)]
    for chunk in epochs:
        assert chunk == [chunk[0]] * len(chunk), f"rate changed within an epoch: {chunk}"
    return [chunk[0] for chunk in epochs]


@pytest.mark.parametrize("name,interval", [
    ("none", "epoch"), ("cosine", "epoch"), ("cosine_warmup", "step"), ("onecycle", "step"),
    ("plateau", "epoch"), ("step", "epoch"), ("multistep", "epoch"),
])
def test_scheduler_interval_in_config(name: str, interval: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"scheduler={name}"], tmp_path)
    assert cfg.scheduler.interval == interval
    assert cfg.scheduler.frequency == 1 and cfg.scheduler.monitor == "val/loss"


def test_constant_rate(tmp_path: Path) -> None:
    lrs = _fit_lrs(_module(["optimizer=sgd", "scheduler=none"], tmp_path))
    assert lrs == [0.1] * (EPOCHS * BATCHES_PER_EPOCH)


def test_cosine_steps_per_epoch(tmp_path: Path) -> None:
    module = _module(["optimizer=sgd", "scheduler=cosine"], tmp_path)  # T_max = max_epochs = 3
    per_epoch = _per_epoch(_fit_lrs(module))
    expected = [0.1 * (1 + math.cos(math.pi * e / EPOCHS)) / 2 for e in range(EPOCHS)]
    assert per_epoch == pytest.approx(expected)


def test_cosine_warmup_steps_per_batch(tmp_path: Path) -> None:
    module = _module(["optimizer=sgd", "scheduler=cosine_warmup", "scheduler.scheduler.warmup_epochs=1"], tmp_path)
    lrs = _fit_lrs(module)
    total, warmup = EPOCHS * BATCHES_PER_EPOCH, BATCHES_PER_EPOCH  # steps_per_epoch filled in: 4
    curve = WarmupDecay(total, warmup, start=0.01, shape="cosine")
    assert lrs == pytest.approx([0.1 * curve(t) for t in range(total)])
    assert lrs[0] == pytest.approx(0.001) and max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == warmup
    assert len(set(lrs)) == total  # a new rate every step


def test_onecycle_steps_per_batch_with_total_steps_filled(tmp_path: Path) -> None:
    module = _module(["optimizer=sgd", "scheduler=onecycle"], tmp_path)
    lrs = _fit_lrs(module)
    total = EPOCHS * BATCHES_PER_EPOCH
    reference_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=0.1, total_steps=total)
    expected = []
    for _ in range(total):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(0.1 / 25) and 0.09 < max(lrs) <= 0.1


def test_plateau_steps_on_val_loss_per_epoch(tmp_path: Path) -> None:
    # threshold 10 (relative): no epoch ever counts as an improvement, so with patience 0
    # the rate halves after every validation.
    module = _module(["optimizer=sgd", "scheduler=plateau", "scheduler.scheduler.factor=0.5",
                      "scheduler.scheduler.patience=0", "scheduler.scheduler.threshold=10"], tmp_path)
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["monitor"] == "val/loss" and config["lr_scheduler"]["interval"] == "epoch"
    assert _per_epoch(_fit_lrs(module)) == pytest.approx([0.1, 0.05, 0.025])


def test_step_and_multistep_per_epoch(tmp_path: Path) -> None:
    step = _module(["optimizer=sgd", "scheduler=step", "scheduler.scheduler.step_size=1",
                    "scheduler.scheduler.gamma=0.5"], tmp_path / "a")
    assert _per_epoch(_fit_lrs(step)) == pytest.approx([0.1, 0.05, 0.025])
    multi = _module(["optimizer=sgd", "scheduler=multistep", "scheduler.scheduler.milestones=[2]"], tmp_path / "b")
    assert _per_epoch(_fit_lrs(multi)) == pytest.approx([0.1, 0.1, 0.01])


def test_scheduler_defaults(tmp_path: Path) -> None:
    cfg = compose_cfg(["scheduler=multistep"], tmp_path)
    assert list(cfg.scheduler.scheduler.milestones) == [15, 22] and cfg.scheduler.scheduler.gamma == 0.1
    cfg = compose_cfg(["scheduler=step"], tmp_path)
    assert cfg.scheduler.scheduler.step_size == 10
    cfg = compose_cfg(["scheduler=onecycle", "optimizer=sgd", "optimizer.lr=0.3"], tmp_path)
    assert cfg.scheduler.scheduler.max_lr == 0.3 and cfg.scheduler.scheduler.total_steps is None
    cfg = compose_cfg(["scheduler=cosine", "trainer.max_epochs=7"], tmp_path)
    assert cfg.scheduler.scheduler.T_max == 7


# ------------------------------------------------------------------------- warmup_cosine
def test_warmup_cosine_curve() -> None:
    curve = WarmupDecay(total=10, warmup=2, start=0.0, end=0.1, shape="cosine")
    assert curve(0) == 0.0 and curve(1) == pytest.approx(0.5) and curve(2) == pytest.approx(1.0)
    assert curve(6) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert curve(10) == pytest.approx(0.1) and curve(50) == pytest.approx(0.1)  # flat after T_max
    assert WarmupDecay(total=4, shape="cosine")(0) == 1.0  # no warmup: starts at the full rate


def test_warmup_cosine_per_epoch_and_eta_min() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = warmup_cosine(opt, T_max=4, warmup_epochs=1, warmup_start_factor=0.5, eta_min=0.02, steps_per_epoch=1)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.1, 0.2]) and lrs[4:] == pytest.approx([0.02, 0.02])
    assert lrs[2] == pytest.approx(0.02 + 0.18 * (1 + math.cos(math.pi / 3)) / 2)


def test_warmup_cosine_resumes_from_state_dict() -> None:
    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, warmup_cosine(opt, T_max=3, warmup_epochs=1, steps_per_epoch=5)

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_warmup_cosine_rejects_bad_lengths() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        warmup_cosine(opt, T_max=3)
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_cosine(opt, T_max=3, warmup_epochs=4, steps_per_epoch=2)


# ------------------------------------------------------------------------- gradient clipping
class GradRecorder(L.Callback):
    """Largest |gradient| before clipping (on_before_optimizer_step runs before Lightning clips)
    and after it (the gradients the optimizer step used, still there at batch end)."""

    def __init__(self) -> None:
        self.raw: list[float] = []
        self.clipped: list[float] = []

    @staticmethod
    def _max_abs(module: L.LightningModule) -> float:
        return max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.raw.append(self._max_abs(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clipped.append(self._max_abs(pl_module))


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_gradient_clipping(algorithm: str, tmp_path: Path) -> None:
    clip = 0.1
    cfg = compose_cfg([*TINY, "optimizer=sgd", "optimizer.weight_decay=0", "optimizer.lr=0.01", "scheduler=none",
                       f"trainer.gradient_clip_val={clip}", f"trainer.gradient_clip_algorithm={algorithm}"], tmp_path)
    module = builders.build_module(cfg)
    recorder = GradRecorder()
    trainer = _trainer([recorder], epochs=1, gradient_clip_val=cfg.trainer.gradient_clip_val,
                       gradient_clip_algorithm=cfg.trainer.gradient_clip_algorithm)
    trainer.fit(module, train_dataloaders=_loader())
    assert len(recorder.clipped) == BATCHES_PER_EPOCH
    assert max(recorder.raw) > clip  # clipping had work to do
    if algorithm == "value":
        assert max(recorder.clipped) <= clip + 1e-7
        assert max(recorder.clipped) == pytest.approx(clip)
    else:
        total_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in module.parameters() if p.grad is not None))
        assert total_norm.item() <= clip * (1 + 1e-4)
