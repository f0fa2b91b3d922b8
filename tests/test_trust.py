"""What a config read back from a checkpoint or a run directory may build: the allow-list."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import hydra.utils
import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from cifar_lab import checkpoints
from cifar_lab.config.trust import TRUSTED_ENV, UnsafeConfigError, check_targets, shipped_targets
from conftest import CONF, SYNTH, compose_cfg

OPT_IN_HINT = f"{TRUSTED_ENV}=<package>[,<package>...].)"

# Every option of every config group (conf/<group>/<option>.yaml), experiments included.
OPTIONS = [f"{group.name}={option.stem}"
           for group in sorted(p for p in CONF.iterdir() if p.is_dir())
           for option in sorted(group.glob("*.yaml"))]


@pytest.fixture(autouse=True)
def _no_trusted_packages(monkeypatch):
    monkeypatch.delenv(TRUSTED_ENV, raising=False)


def _refusal(cfg, origin: str = "run/config.yaml") -> str:
    with pytest.raises(UnsafeConfigError) as err:
        check_targets(cfg, origin=origin)
    message = str(err.value)
    assert message.startswith(f"refusing to build the config from {origin}: "), message
    assert message.endswith(OPT_IN_HINT), message
    return message


# ----------------------------------------------------------------------------- what is admitted
def test_options_cover_every_group() -> None:
    groups = {o.split("=")[0] for o in OPTIONS}
    assert {"experiment", "model", "optimizer", "scheduler", "trainer", "callbacks", "logger", "data",
            "augment"} <= groups
    assert len([o for o in OPTIONS if o.startswith("experiment=")]) == len(list((CONF / "experiment").glob("*.yaml")))


@pytest.mark.parametrize("option", OPTIONS)
def test_every_shipped_config_option_is_admitted(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg([option], tmp_path / "run")
    check_targets(cfg, origin=option)  # as read back from .hydra/config.yaml
    check_targets(OmegaConf.to_container(cfg, resolve=True), origin=option)  # as saved in hyper_parameters


@pytest.mark.parametrize("config_name", ["evaluate", "predict"])
def test_the_evaluate_and_predict_configs_are_admitted(tmp_path: Path, config_name: str) -> None:
    from cifar_lab.config.compose import hydra_job

    with hydra_job(config_name, [], tmp_path / "run") as cfg:
        check_targets(cfg, origin=config_name)


def test_shipped_targets_are_read_from_the_config_tree() -> None:
    shipped = shipped_targets()
    trainer_targets = {OmegaConf.load(p).get("_target_") for p in (CONF / "trainer").glob("*.yaml")} - {None}
    assert trainer_targets and trainer_targets <= shipped
    assert {"cifar_lab.sweeps.report.SweepReport", "torch.optim.SGD", "lightning.pytorch.callbacks.ModelCheckpoint",
            "cifar_lab.optim.schedules.warmup_cosine"} <= shipped
    assert not any("${" in t or "<" in t for t in shipped)  # never an interpolation or a comment's example


ADMITTED = [
    "torch.nn.Sequential", "torch.nn.Conv2d", "torch.nn.modules.conv.Conv2d", "torch.nn.Module",
    "torch.optim.SGD", "torch.optim.sgd.SGD", "torch.optim.RMSprop",
    "torch.optim.lr_scheduler.LambdaLR", "torch.optim.lr_scheduler.ReduceLROnPlateau",
    "lightning.pytorch.callbacks.EarlyStopping", "lightning.pytorch.callbacks.early_stopping.EarlyStopping",
    "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.Trainer", "lightning.Trainer",
    "cifar_lab.models.simple_cnn.SimpleCNN", "cifar_lab.models.blocks.make_activation",
    "cifar_lab.data.mixing.BatchMixer", "cifar_lab.callbacks.averaging.EMA", "cifar_lab.optim.muon.MuonSGD",
    "cifar_lab.module.ClassifierModule", "cifar_lab.sweeps.report.SweepReport",
]


@pytest.mark.parametrize("target", ADMITTED)
def test_admitted_targets(target: str) -> None:
    check_targets({"x": {"_target_": target}})


@pytest.mark.parametrize("module,base", [
    ("torch.nn", torch.nn.Module), ("torch.optim", torch.optim.Optimizer),
    ("torch.optim.lr_scheduler", torch.optim.lr_scheduler.LRScheduler),
    ("lightning.pytorch.callbacks", pl.callbacks.Callback), ("lightning.pytorch.loggers", pl.loggers.Logger),
])
def test_every_layer_optimizer_scheduler_callback_and_logger_is_admitted(module: str, base: type) -> None:
    namespace = sys.modules[module]
    names = [n for n, obj in vars(namespace).items() if not n.startswith("_") and inspect.isclass(obj)
             and issubclass(obj, base) and obj.__module__.startswith(module)
             and not obj.__module__.startswith("torch.nn.parallel")]  # DataParallel: not a layer
    assert len(names) >= 3
    check_targets({"x": [{"_target_": f"{module}.{n}"} for n in names]})


def test_augmentation_ops_are_admitted() -> None:
    import cifar_lab.data.augment as augment

    ops = [n for n, obj in vars(augment).items() if not n.startswith("_") and inspect.isclass(obj)
           and obj.__module__.startswith("cifar_lab.data.augment")]
    assert ops
    check_targets({"data": {"augment": {n: {"_target_": f"cifar_lab.data.augment.{n}"} for n in ops}}})


def test_small_torch_nets_are_built_from_a_saved_config() -> None:
    saved = {"model": {"_target_": "torch.nn.Sequential", "_args_": [
        {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3},
        {"_target_": "torch.nn.AdaptiveAvgPool2d", "output_size": 1},
        {"_target_": "torch.nn.Flatten"}]}}
    check_targets(saved)
    net = hydra.utils.instantiate(saved["model"])
    assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 4)


# ----------------------------------------------------------------------------- what is refused
REFUSED = {
    "torch.cuda.memory.CUDAPluggableAllocator": "it is not on the allow-list",  # loads a native library
    "torch.utils.tensorboard.SummaryWriter": "it is not on the allow-list",  # creates its log_dir
    "torch.load": "it is not on the allow-list",
    "torch.onnx.export": "it is not on the allow-list",
    "torch.classes.load_library": "it is not on the allow-list",
    "torch.ops.load_library": "it is not on the allow-list",
    "os.system": "it is not on the allow-list",
    "builtins.eval": "it is not on the allow-list",
    "torch.os.system": "it is not on the allow-list",
    "cifar_lab.data.cache.load_if_fresh": "it is not on the allow-list",
    "cifar_lab.fileio.atomic_torch_save": "it is not on the allow-list",
    "cifar_lab.models._private_helper": "private or malformed names are not allowed",
    "torch.nn.Module.__init__": "private or malformed names are not allowed",
    "cifar_lab.models.simple_cnn": "it names a module, not a class or function",
    "torch.nn.modules.conv": "it names a module, not a class or function",
    # admitted names that reach something else: the object decides
    "cifar_lab.models.blocks.torch.load": "it resolves to torch.serialization.load, which is not on the allow-list",
    "lightning.pytorch.callbacks.model_checkpoint.os.remove": "it resolves to posix.remove, which is not on the "
                                                             "allow-list",
    "torch.nn.Module.load_state_dict": "it resolves to torch.nn.modules.module.Module.load_state_dict, which is "
                                       "not on the allow-list",  # a method, not a class
    "torch.nn.functional.relu": "it resolves to torch.nn.functional.relu, which is not on the allow-list",
    "torch.nn.parallel.DistributedDataParallel": "it resolves to torch.nn.parallel.distributed."
                                                 "DistributedDataParallel, which is not on the allow-list",
    "torch.optim.swa_utils.AveragedModel": "it resolves to torch.optim.swa_utils.AveragedModel, which is not on "
                                           "the allow-list",
    "cifar_lab.callbacks.plots.save_figure": "it resolves to cifar_lab.callbacks.plots.save_figure, which is not "
                                             "on the allow-list",  # writes a file
    "cifar_lab.module.ClassifierModule.load_from_checkpoint": "it resolves to lightning.pytorch.core.module."
                                                              "LightningModule.load_from_checkpoint, which is not "
                                                              "on the allow-list",
    "cifar_lab.models.no_such_module.Net": "it cannot be resolved: cifar_lab.models.no_such_module does not exist",
    "${oc.env:HOME}": "an interpolated _target_ is not allowed",
}


@pytest.mark.parametrize("target", REFUSED)
def test_refused_targets_name_key_and_target(target: str) -> None:
    cfg = {"model": {"_target_": "cifar_lab.models.simple_cnn.SimpleCNN"},
           "callbacks": {"x": {"_target_": "lightning.pytorch.callbacks.LambdaCallback",
                               "on_fit_start": {"_target_": target, "_args_": ["x"]}}}}
    message = _refusal(cfg)
    assert f"\n  - callbacks.x.on_fit_start._target_={target}: {REFUSED[target]}" in message, message
    assert message.count("\n  - ") == 1  # the admitted targets are not listed


def test_every_refused_target_is_listed(tmp_path: Path) -> None:
    cfg = OmegaConf.to_container(compose_cfg(SYNTH, tmp_path / "run"), resolve=True)
    cfg["callbacks"]["evil"] = {"_target_": "torch.utils.tensorboard.SummaryWriter", "log_dir": "x"}
    cfg["model"]["act"] = {"_target_": "builtins.eval", "_args_": ["1"]}
    message = _refusal(cfg, origin="saved.ckpt")
    assert "\n  - callbacks.evil._target_=torch.utils.tensorboard.SummaryWriter: " in message
    assert "\n  - model.act._target_=builtins.eval: " in message
    assert message.count("\n  - ") == 2


def test_names_outside_the_allow_list_are_not_imported(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "trust_probe_side_effect.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _refusal({"x": {"_target_": "trust_probe_side_effect.Thing"}})
    assert not (tmp_path / "imported").exists() and "trust_probe_side_effect" not in sys.modules


def test_interpolations_are_resolved_node_by_node() -> None:
    # an unresolvable value elsewhere must not hide a node another interpolation creates
    payload = {"paths": {"out": "${oc.env:CIFAR_LAB_TEST_SURELY_UNSET}"},
               "model": "${oc.create:{_target_: os.system, _args_: [ls]}}"}
    for cfg in (payload, OmegaConf.create(payload)):
        assert "\n  - model._target_=os.system: it is not on the allow-list" in _refusal(cfg)
    unresolvable = {"model": "${oc.create:{_target_: os.system, x: ${oc.env:CIFAR_LAB_TEST_SURELY_UNSET}}}"}
    assert "model=${oc.create:" in _refusal(unresolvable)
    # a node referred to from elsewhere is checked (and admitted) where it is used
    check_targets(OmegaConf.create({"a": {"_target_": "torch.nn.Identity"}, "b": "${a}", "c": ["${a}"],
                                    "d": "${oc.env:CIFAR_LAB_TEST_SURELY_UNSET}"}))


# ----------------------------------------------------------------------------- a payload in a checkpoint
def test_a_checkpoint_whose_config_writes_files_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    # the payload is real: built, it creates its log_dir
    control = hydra.utils.instantiate({"_target_": "torch.utils.tensorboard.SummaryWriter",
                                       "log_dir": str(tmp_path / "control")})
    control.close()
    assert (tmp_path / "control").is_dir()

    hparams = OmegaConf.to_container(compose_cfg(SYNTH, tmp_path / "train"), resolve=True)
    hparams["callbacks"]["tb_writer"] = {"_target_": "torch.utils.tensorboard.SummaryWriter", "log_dir": str(marker)}
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.net.0.weight": torch.zeros(2, 3)}, "hyper_parameters": hparams,
                "epoch": 0, "global_step": 0}, ckpt)

    with pytest.raises(UnsafeConfigError) as err:
        checkpoints.saved_config(ckpt, checkpoints.load(ckpt))
    assert "callbacks.tb_writer._target_=torch.utils.tensorboard.SummaryWriter: " in str(err.value)
    assert not marker.exists()

    from cifar_lab.cli import evaluate

    with pytest.raises(UnsafeConfigError, match="callbacks.tb_writer._target_=torch.utils.tensorboard.SummaryWriter"):
        evaluate.run([f"ckpt_path={ckpt}"], tmp_path / "eval")
    assert not marker.exists()


# ----------------------------------------------------------------------------- the opt-in
def test_trusted_packages_opt_in(tmp_path: Path, monkeypatch) -> None:
    name = "cifar_lab_trust_probe_pkg"
    (tmp_path / f"{name}.py").write_text(
        "from os import system\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "class Thing:\n    def method(self):\n        pass\n"
        "def make_thing():\n    return Thing()\n"
        "def _hidden():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    cfg = {"model": {"_target_": f"{name}.Thing"}, "data": {"_target_": f"{name}.make_thing"}}

    message = _refusal(cfg)
    assert f"\n  - model._target_={name}.Thing: it is not on the allow-list" in message
    assert f"\n  - data._target_={name}.make_thing: it is not on the allow-list" in message

    monkeypatch.setenv(TRUSTED_ENV, f"some_other_pkg, {name}")
    check_targets(cfg)
    # the same rules apply inside a trusted package
    for target, reason in {
        f"{name}._hidden": "private or malformed names are not allowed",
        f"{name}.system": "it resolves to posix.system, which is not on the allow-list",
        f"{name}.SummaryWriter": "it resolves to torch.utils.tensorboard.writer.SummaryWriter, which is not on "
                                 "the allow-list",
        f"{name}.Thing.method": f"it resolves to {name}.Thing.method, which is not on the allow-list",
        name: "it names a module, not a class or function",
    }.items():
        assert f"\n  - x._target_={target}: {reason}" in _refusal({"x": {"_target_": target}})
