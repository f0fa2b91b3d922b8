"""Turn the composed config into the objects a run needs.

Each object is built as soon as it can be, before any data is read: a value that torch or
Lightning refuses (a negative learning rate, an unknown precision, a dropout of 1.5) ends
the run within seconds as one :class:`~cifar_lab.errors.ConfigError` that names the config
node, its ``_target_`` and the library's own words (:func:`refused`). The schema
(:mod:`cifar_lab.config.schema`) checks only what these constructors do not.

They build from a settled config (:mod:`cifar_lab.builders.settle`: no ``auto`` left; an ``auto``
is refused by name); :mod:`cifar_lab.builders.assemble` calls them for every command.
"""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from cifar_lab import checkpoints
from cifar_lab.callbacks.estimate import RunEstimate
from cifar_lab.callbacks.peers import let_the_main_thread_report
from cifar_lab.callbacks.progress import EpochLines, TestLines, interactive
from cifar_lab.callbacks.tta import check_single_layer
from cifar_lab.data.datamodule import ReadSplits
from cifar_lab.callbacks.sync_batchnorm import CPUSyncBatchNorm
from cifar_lab.errors import ConfigError
from cifar_lab.module import ClassifierModule, Renormalize
from cifar_lab.runs import tags

log = logging.getLogger(__name__)

# What constructors raise for a value they refuse, or for an optional package that is missing
# (e.g. logger=mlflow without `pip install -e ".[mlflow]"`).
_REFUSALS = (ValueError, TypeError, ImportError, MisconfigurationException, InstantiationException)


@contextmanager
def refused(key: str, node: Any) -> Iterator[None]:
    """Turn a constructor's refusal of the config at ``key`` into one ConfigError naming it."""
    try:
        yield
    except _REFUSALS as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        words = " ".join(str(cause).split()) or type(cause).__name__
        target = OmegaConf.select(node, "_target_", default=None) if isinstance(node, DictConfig) else None
        where = f"{key} ({target})" if target else key
        raise ConfigError(f"invalid config: {where}: {words}") from None


def task_overrides() -> list[str]:
    """This job's command-line overrides (empty outside a Hydra job)."""
    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:
        return []


def _decided(cfg: DictConfig, key: str) -> Any:
    """A value ``auto`` stands for until the config is settled (cifar_lab.builders.settle)."""
    value = OmegaConf.select(cfg, key, default=None)
    if str(value) == "auto":
        raise ConfigError(f"{key}=auto is decided before anything is built: settle the config first "
                          f"(cifar_lab.builders.settle.settle), or set {key} explicitly")
    return value


def build_datamodule(cfg: DictConfig, read: ReadSplits | None = None) -> L.LightningDataModule:
    """The ``data`` node's datamodule, its batches in the network's layout (``module.memory_format``);
    ``read``: the splits this data config gave already (settle read them), not read again."""
    channels_last = _decided(cfg, "module.memory_format") == "channels_last"
    with refused("data", cfg.data):
        given = {"read": read} if read is not None else {}
        return instantiate(cfg.data, channels_last=channels_last, **given, _convert_="all")


def check_module(cfg: DictConfig) -> None:
    """Build the module once and throw it away: a value torch refuses stops the command before data is read."""
    build_module(cfg)


def build_module(cfg: DictConfig, teacher: torch.nn.Module | None = None,
                 load_weights: Callable[[torch.nn.Module], Any] | None = None) -> ClassifierModule:
    """The network from ``model`` (``load_weights`` fills its weights: init_from, a tested checkpoint), the
    optimizer and scheduler partials and the distillation ``teacher``, wrapped in the module.

    The optimizer and scheduler are built once here on the network's parameters and thrown
    away, so their constructors check their arguments now rather than when fitting starts.
    """
    _decided(cfg, "module.memory_format"), _decided(cfg, "module.compile")
    scheduler_cfg = cfg.get("scheduler") or {}
    with refused("model", cfg.model):
        net = instantiate(cfg.model, _convert_="all")
    if load_weights is not None:
        load_weights(net)
    with refused("optimizer", cfg.optimizer):
        optimizer = instantiate(cfg.optimizer)
        probe = optimizer(params=net.parameters())
    scheduler = None
    if scheduler_cfg.get("scheduler"):
        with refused("scheduler.scheduler", scheduler_cfg.scheduler):
            scheduler = instantiate(scheduler_cfg.scheduler)
            _probe_scheduler(scheduler, probe, cfg)
    with refused("module", cfg.module):
        # A partial first: the run config passed as `hparams` holds `_target_`s that
        # instantiate() would otherwise try to build.
        module_factory = instantiate(cfg.module, _partial_=True, _convert_="all")
        return module_factory(
            net=net,
            optimizer=optimizer,
            scheduler=scheduler,
            scheduler_interval=scheduler_cfg.get("interval", "epoch"),
            scheduler_frequency=scheduler_cfg.get("frequency", 1),
            scheduler_monitor=scheduler_cfg.get("monitor", "val/loss"),
            hparams=OmegaConf.to_container(cfg, resolve=True),
            run_overrides=task_overrides(),
            teacher=teacher,
        )


def build_teacher(cfg: DictConfig) -> torch.nn.Module | None:
    """``module.distill.teacher``: the trained network of a run directory or checkpoint (None when unset).

    Read as every checkpoint is (:mod:`cifar_lab.checkpoints`: weights only, its saved config's
    targets checked before its model config is built); it must classify the same classes. A
    teacher trained with another ``data.mean``/``data.std`` gets this run's batches renormalised
    to its own (:class:`cifar_lab.module.Renormalize`).
    """
    path = OmegaConf.select(cfg, "module.distill.teacher", default=None)
    if not path:
        return None
    ckpt_file = checkpoints.resolve(path, "use", key="module.distill.teacher")
    assert ckpt_file is not None
    checkpoint = checkpoints.load(ckpt_file, mmap=True)
    saved, origin = checkpoints.saved_config(ckpt_file, checkpoint)
    saved_data = saved.get("data") or {}
    if "num_classes" in saved_data and saved_data["num_classes"] != cfg.data.num_classes:
        raise ConfigError(f"module.distill.teacher={path}: the teacher classifies {saved_data['num_classes']} classes "
                          f"(data.num_classes), this run {cfg.data.num_classes}; distil from a teacher of the same "
                          "classes")
    with refused("module.distill.teacher", OmegaConf.create(saved["model"])):
        teacher = instantiate(saved["model"], _convert_="all")
    checkpoints.load_network_weights(teacher, checkpoint, ckpt_file)
    log.info("distilling from %s (%s)", ckpt_file, origin)
    ours = [_floats(cfg.data.mean), _floats(cfg.data.std)]
    theirs = [_floats(saved_data.get("mean", ours[0])), _floats(saved_data.get("std", ours[1]))]
    if theirs != ours:
        return torch.nn.Sequential(Renormalize(ours, theirs), teacher)
    return teacher


def _floats(value: Any) -> list[float]:
    value = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    return [float(v) for v in value]


def _probe_scheduler(scheduler: Any, optimizer: Any, cfg: DictConfig) -> None:
    """Build the scheduler once on a throw-away optimizer (lengths the module fills in are guessed)."""
    accepted = inspect.signature(scheduler.func).parameters
    epochs = max(1, int(OmegaConf.select(cfg, "trainer.max_epochs", default=1) or 1))
    guesses = {"total_steps": epochs * 10, "steps_per_epoch": 10}
    kwargs = {k: v for k, v in guesses.items() if k in accepted and scheduler.keywords.get(k) is None}
    scheduler(optimizer=optimizer, **kwargs)


def _instantiate_group(group: DictConfig | None, kind: str) -> list:
    objects = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"invalid config: {kind}.{name} has no _target_; each {kind} entry must name a "
                              "class to build")
        with refused(f"{kind}.{name}", node):
            objects.append(instantiate(node, _convert_="all"))
    return objects


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return _instantiate_group(cfg.get("callbacks"), "callbacks")


def build_loggers(cfg: DictConfig) -> list:
    loggers = _instantiate_group(cfg.get("logger"), "logger")
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):  # the run's tags and notes (its run is created lazily)
            logger.tags = {**(logger.tags or {}), **tags.mlflow_tags(cfg)}
    return loggers


def check_trainer(cfg: DictConfig) -> None:
    """Build the Trainer once with nothing attached, so a value Lightning refuses stops the command before any
    data is read; the real Trainer is built from the settled config."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its device lines are said once, by the real Trainer
    try:
        build_trainer(cfg, [], [])
    finally:
        quiet.setLevel(level)


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, **settings: Any) -> L.Trainer:
    """The ``trainer`` node's Trainer; ``settings`` are a command's own Trainer arguments over the config's
    (the finders' step limits)."""
    _decided(cfg, "trainer.precision")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: no CUDA GPU is visible to this process (torch.cuda.is_available() "
            "is false). Train on the CPU with trainer=cpu, or trainer=default, which uses a GPU when there is one"
        )
    check_single_layer(callbacks)  # two TTA layers on one stage: refused now, not after the test pass
    if not OmegaConf.select(cfg, "trainer.fast_dev_run", default=False):
        # how long an epoch and the run will take, said early
        callbacks = [*callbacks, RunEstimate(test=bool(cfg.get("test", True)))]
    if OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True) and not interactive():
        # not a terminal (a log file, CI, a cluster job): one plain line per epoch instead of a bar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)] + [EpochLines(), TestLines()]
        cfg = _writable_copy(cfg)
        with open_dict(cfg):
            cfg.trainer.enable_progress_bar = False
    elif not OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True):
        # no bar asked for: a bar callback of the callbacks group goes too (Lightning refuses the pair)
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not loggers:
        # LearningRateMonitor refuses to run without a logger; with logger=none it has nowhere to write.
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    cfg, strategy = _strategy(cfg)
    with refused("trainer", cfg.trainer):
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all",
                           **strategy, **_plugins(cfg), **settings)


def _writable_copy(cfg: DictConfig) -> DictConfig:
    """A copy of (a settled, read-only) ``cfg`` the Trainer's arguments may be derived in."""
    copy = cfg.copy()
    OmegaConf.set_readonly(copy, False)
    return copy


def _strategy(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """``trainer.process_group_timeout_s`` (not a Trainer argument): DDP's collective timeout, so a process that
    stops answering ends the run within that time (cifar_lab/callbacks/peers.py) instead of torch's 30 minutes."""
    timeout = OmegaConf.select(cfg, "trainer.process_group_timeout_s", default=None)
    if "process_group_timeout_s" not in cfg.trainer:
        return cfg, {}
    cfg = _writable_copy(cfg)
    with open_dict(cfg):
        del cfg.trainer["process_group_timeout_s"]
        if timeout is None or cfg.trainer.get("strategy") != "ddp":
            return cfg, {}
        del cfg.trainer["strategy"]
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    let_the_main_thread_report(grace_s=float(timeout) + 60)
    return cfg, {"strategy": DDPStrategy(timeout=timedelta(seconds=float(timeout)))}


def _plugins(cfg: DictConfig) -> dict[str, Any]:
    """Plugins the trainer config cannot name: synchronised BatchNorm for CPU processes, and in a SLURM job
    GracefulStop's SIGUSR1/SIGTERM handling (a checkpoint at a batch boundary, then a requeue) instead of
    Lightning's auto-requeue, which saves hpc_ckpt_*.ckpt from inside the signal handler."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if "plugins" in cfg.trainer:
        return {}
    plugins: list[Any] = []
    on_cpu = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")) == "cpu"
    if on_cpu and OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False):
        plugins.append(CPUSyncBatchNorm())  # torch's SyncBatchNorm runs on GPUs only
    if "SLURM_NTASKS" in os.environ and SLURMEnvironment.job_name() not in ("bash", "interactive"):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return {"plugins": plugins} if plugins else {}
