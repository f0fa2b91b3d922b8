"""Each report's experiment composes into its stated recipe and builds every object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_lab import builders
from cifar_lab.data import augment as A
from cifar_lab.data.mixing import BatchMixer
from cifar_lab.cli.train import train
from conftest import CONF, SYNTH, compose_cfg

EXPERIMENTS = ["attention_net", "conv_block_net", "efficientnet", "finetune_pretrained", "pseudo_se_net",
               "resnet_se", "simple_cnn", "simple_cnn_bn", "squeezenet"]

# What each report states (README, "Models") plus the epoch count we chose where it gives none.
RECIPES = {
    "pseudo_se_net": dict(net="PseudoSENet", opt=torch.optim.SGD, lr=1e-3, wd=0.0, sched=None, epochs=30, batch=128,
                          augment=[]),
    "simple_cnn": dict(net="SimpleCNN", opt=torch.optim.Adam, lr=1e-3, wd=0.0, sched=None, epochs=50, batch=64,
                       augment=[A.RandomCrop, A.HorizontalFlip]),
    "simple_cnn_bn": dict(net="SimpleCNN", opt=torch.optim.Adam, lr=1e-3, wd=0.0, sched=None, epochs=50, batch=64,
                          augment=[A.RandomCrop, A.HorizontalFlip]),
    "efficientnet": dict(net="EfficientNet", opt=torch.optim.Adam, lr=1e-3, wd=0.0,
                         sched=torch.optim.lr_scheduler.ReduceLROnPlateau, epochs=50, batch=128,
                         augment=[A.RandomCrop, A.HorizontalFlip]),
    "squeezenet": dict(net="SqueezeNet", opt=torch.optim.Adam, lr=1e-4, wd=1e-4,
                       sched=torch.optim.lr_scheduler.ReduceLROnPlateau, epochs=50, batch=128,
                       augment=[A.RandomCrop, A.HorizontalFlip, A.ColorJitter, A.RandomRotation]),
    "conv_block_net": dict(net="ConvBlockNet", opt=torch.optim.Adam, lr=1e-3, wd=1e-4, sched=None, epochs=40,
                           batch=150, augment=[A.RandomCrop, A.HorizontalFlip, A.ColorJitter]),
    "resnet_se": dict(net="ResNetSE", opt=torch.optim.SGD, lr=0.1, wd=5e-4,
                      sched=torch.optim.lr_scheduler.CosineAnnealingLR, epochs=420, batch=128,
                      augment=[A.RandomCrop, A.HorizontalFlip, A.RandomGrayscale, A.RandomAutocontrast]),
    "attention_net": dict(net="AttentionNet", opt=torch.optim.AdamW, lr=1e-3, wd=0.02, sched=None, epochs=70,
                          batch=128, augment=[A.RandomCrop, A.HorizontalFlip]),
    "finetune_pretrained": dict(net="TorchvisionNet", opt=torch.optim.SGD, lr=0.01, wd=5e-4,
                                sched=torch.optim.lr_scheduler.CosineAnnealingLR, epochs=15, batch=128,
                                augment=[A.RandomCrop, A.HorizontalFlip]),
}


class FakeTrainer:
    """What configure_optimizers reads from the trainer."""

    def __init__(self, max_epochs: int, steps_per_epoch: int = 10) -> None:
        self.max_epochs = max_epochs
        self.estimated_stepping_batches = max_epochs * steps_per_epoch


def _compose(name: str, tmp_path: Path, extra: list[str] | None = None):
    # data=synthetic keeps instantiation offline; the experiment's data keys apply to any source
    # explicit device settings: these tests build objects, they do not measure (tests/test_autotune.py does)
    return compose_cfg(["data=synthetic", f"experiment={name}", "trainer.precision=32",
                        "module.memory_format=channels_last", *(extra or [])], tmp_path)


def _built(name: str, tmp_path: Path, extra: list[str] | None = None):
    cfg = _compose(name, tmp_path, extra)
    module = builders.build_module(cfg)
    module.trainer = FakeTrainer(cfg.trainer.max_epochs)  # type: ignore[assignment]
    opt_cfg = module.configure_optimizers()
    optimizer = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    scheduler = opt_cfg["lr_scheduler"] if isinstance(opt_cfg, dict) else None
    return cfg, module, optimizer, scheduler


def test_every_report_has_an_experiment() -> None:
    assert set(EXPERIMENTS) <= {p.stem for p in (CONF / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_augmentation_comes_from_the_augment_group(name: str, tmp_path: Path) -> None:
    """No experiment repeats an augmentation block: each picks a conf/augment option."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"))
    assert "augment" not in raw.get("data", {}), name
    defaults = raw.get("defaults", [])
    chosen = [d["override /augment"] for d in defaults if isinstance(d, dict) and "override /augment" in d]
    if name == "speedrun_long":  # speedrun's recipe, choice included
        assert chosen == [] and "speedrun" in defaults
        return
    assert len(chosen) == 1 and (CONF / "augment" / f"{chosen[0]}.yaml").is_file(), name
    cfg = _compose(name, tmp_path)
    if chosen[0] == "none":
        assert cfg.data.augment is None
        return
    option = OmegaConf.load(CONF / "augment" / f"{chosen[0]}.yaml")
    assert {k for k in option if k != "defaults"} <= set(cfg.data.augment), name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_file_header(name: str) -> None:
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    header = text.split("defaults:")[0]
    assert "Report " in header and f"experiment={name}" in header
    assert "%" in header  # the report's result it targets


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_report_recipe(name: str, tmp_path: Path) -> None:
    recipe = RECIPES[name]
    extra = ["model.pretrained=false"] if name == "finetune_pretrained" else []  # no weights offline
    cfg, module, optimizer, scheduler = _built(name, tmp_path, extra)
    assert cfg.task_name == name
    assert type(module.net).__name__ == recipe["net"]
    assert type(optimizer) is recipe["opt"]
    group = optimizer.param_groups[0]
    assert group.get("initial_lr", group["lr"]) == pytest.approx(recipe["lr"])  # before any scheduler step
    assert group["weight_decay"] == pytest.approx(recipe["wd"])
    if recipe["sched"] is None:
        assert scheduler is None
    else:
        assert type(scheduler["scheduler"]) is recipe["sched"] and scheduler["interval"] == "epoch"
    assert cfg.trainer.max_epochs == recipe["epochs"]

    dm = builders.build_datamodule(cfg)
    assert dm.batch_size == recipe["batch"] == cfg.data.batch_size
    assert [type(op) for op in dm.train_augment.ops.values()] == recipe["augment"]
    if name != "resnet_se":
        assert dm.mixer is None and cfg.trainer.gradient_clip_val is None


def test_resnet_se_full_recipe(tmp_path: Path) -> None:
    cfg, module, optimizer, scheduler = _built("resnet_se", tmp_path)
    # network: the report's exact parameter count
    assert sum(p.numel() for p in module.net.parameters() if p.requires_grad) == 4_993_166
    # SGD 0.1 / 0.9 / 5e-4, cosine with T_max 400 epochs stepped per epoch
    group = optimizer.param_groups[0]
    assert (group["initial_lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 5e-4, False)
    assert len(optimizer.param_groups) == 1  # weight decay on every parameter
    sched = scheduler["scheduler"]
    assert sched.T_max == 400 and sched.eta_min == 0.0 and scheduler["interval"] == "epoch"
    # clipping by value at 0.1, 420 epochs = 400 with mixup + 20 without
    assert cfg.trainer.gradient_clip_val == 0.1 and cfg.trainer.gradient_clip_algorithm == "value"
    assert cfg.trainer.max_epochs == 420
    trainer = builders.build_trainer(cfg, callbacks=[], loggers=[])
    assert trainer.gradient_clip_val == 0.1 and trainer.gradient_clip_algorithm == "value"

    dm = builders.build_datamodule(cfg)
    assert dm.batch_size == 128
    # augmentation: crop 32 pad 4, flip / grayscale / autocontrast at p 0.2
    crop, flip, gray, auto = dm.train_augment.ops.values()
    assert crop.size == (32, 32) and crop.padding == (4, 4, 4, 4) and crop.p == 1.0
    assert (flip.p, gray.p, auto.p) == (0.2, 0.2, 0.2)
    # normalisation statistics of the report (not the framework's default std)
    norm = dm.train_augment.normalize
    assert norm.mean == pytest.approx((0.4914, 0.4822, 0.4465)) and norm.std == pytest.approx((0.2023, 0.1994, 0.2010))
    assert dm.eval_augment.normalize.std == norm.std
    # mixup alpha 1, whole epochs with probability 0.9, stopped from epoch 400
    mixer = dm.mixer
    assert isinstance(mixer, BatchMixer)
    assert (mixer.mixup_alpha, mixer.cutmix_alpha, mixer.prob, mixer.mode, mixer.stop_epoch) == (1.0, None, 0.9, "epoch",
                                                                                               400)
    assert mixer.num_classes == 10 and mixer.seed == cfg.seed
    on = [mixer.active(e) for e in range(400)]
    assert 0.8 < sum(on) / 400 < 0.97  # about 90% of the epochs mix
    assert not any(mixer.active(e) for e in range(400, 420))


def test_pseudo_se_net_recipe(tmp_path: Path) -> None:
    cfg, module, optimizer, _ = _built("pseudo_se_net", tmp_path)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["momentum"] == 0.9
    assert cfg.data.augment is None
    assert cfg.model.channels == [10, 25, 50, 150] and cfg.model.branches == 5


def test_simple_cnn_models(tmp_path: Path) -> None:
    vanilla = _compose("simple_cnn", tmp_path).model
    assert (list(vanilla.filters), vanilla.fc_units, vanilla.dropout, vanilla.batch_norm) == ([32, 64], 512, 0.0, False)
    edited = _compose("simple_cnn_bn", tmp_path).model
    assert (list(edited.filters), edited.fc_units, edited.dropout, edited.batch_norm) == ([32, 64], 256, 0.5, True)


def test_efficientnet_and_squeezenet_plateau(tmp_path: Path) -> None:
    for name in ("efficientnet", "squeezenet"):
        cfg, _, _, scheduler = _built(name, tmp_path / name)
        assert scheduler["monitor"] == "val/loss" and scheduler["interval"] == "epoch"
        assert scheduler["scheduler"].mode == "min"
    cfg = _compose("efficientnet", tmp_path)
    assert cfg.model.version == "b0" and cfg.model.stem == "cifar"
    cfg = _compose("squeezenet", tmp_path)
    assert cfg.model.dropout == 0.5 and cfg.data.val_size == 5000
    dm = builders.build_datamodule(cfg)
    jitter, rotation = dm.train_augment.ops["jitter"], dm.train_augment.ops["rotation"]
    assert jitter.brightness == (0.8, 1.2) and jitter.hue == (-0.1, 0.1) and rotation.degrees == (-15.0, 15.0)


def test_conv_block_and_attention_nets(tmp_path: Path) -> None:
    cfg = _compose("conv_block_net", tmp_path)
    assert cfg.data.batch_size == 150 and cfg.model.branches == 5 and cfg.model.channels[-1] == 1024
    cfg = _compose("attention_net", tmp_path)
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.weight_decay == 0.02
    assert cfg.model.branches == 2 and cfg.model.init == "kaiming"


def test_finetune_pretrained_config(tmp_path: Path) -> None:
    cfg = _compose("finetune_pretrained", tmp_path)
    assert cfg.model._target_.endswith("TorchvisionNet")
    assert cfg.model.arch == "resnet18" and cfg.model.pretrained is True and cfg.model.adapt_stem is True
    assert cfg.module.no_decay_norm_and_bias is True
    assert list(cfg.data.mean) == [0.485, 0.456, 0.406]
    _, module, optimizer, _ = _built("finetune_pretrained", tmp_path, ["model.pretrained=false"])
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_command_line_overrides_win_over_experiment(tmp_path: Path) -> None:
    cfg = _compose("resnet_se", tmp_path, ["trainer.max_epochs=3", "optimizer.lr=0.05", "data.mixing=null"])
    assert cfg.trainer.max_epochs == 3 and cfg.optimizer.lr == 0.05 and cfg.data.mixing is None
    assert cfg.scheduler.scheduler.T_max == 400  # stated by the report, not tied to max_epochs


@pytest.mark.slow
def test_resnet_se_trains_one_batch_with_mixup_and_clipping(tmp_path: Path) -> None:
    """The whole recipe (augment, epoch mixup, clip by value, cosine) runs end to end."""
    run_dir = tmp_path / "run"
    # a model= override would beat the experiment's; no callbacks (reports) to keep it quick
    synth = [o for o in SYNTH if not o.startswith(("model=", "callbacks."))]
    cfg = compose_cfg([*synth, "experiment=resnet_se", "debug=fast_dev_run", "data.batch_size=8", "data.eval_batch_size=8", "logger=none",
                       "trainer.enable_progress_bar=false", "data.mixing.prob=1.0", "test=false", "callbacks=none"], run_dir)
    assert cfg.model._target_.endswith("ResNetSE")
    value = train(cfg)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["params"] == 4_993_166 and summary["global_step"] == 1
    assert value == summary["metrics"]["val/acc_best"]
