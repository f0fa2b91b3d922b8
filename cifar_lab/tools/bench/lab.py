"""cifar-lab's side of every comparison: the composed config, its datamodule, and training
batches as Lightning delivers them (loader, transfer, ``on_after_batch_transfer``)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from cifar_lab.config import CONF_DIR


def compose(overrides: list[str]):
    """``conf/train.yaml`` composed with ``overrides``, without a Hydra run directory (no logger and no
    callbacks unless ``overrides`` choose them)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import cifar_lab  # noqa: F401  (registers the resolvers)

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        chosen = {o.split("=")[0] for o in overrides}
        quiet = [o for o in ("logger=none", "callbacks=none") if o.split("=")[0] not in chosen]
        cfg = hydra_compose("train", overrides=[*quiet, *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()
    with open_dict(cfg):  # what a Hydra run would set; the benchmark writes no run files
        cfg.hydra.runtime.output_dir = str(Path(tempfile.gettempdir()) / "cifar_lab_bench")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# models whose training run is a whole recipe: composed as that experiment, not as model=<name>
EXPERIMENTS = {"speedrun_net": "speedrun"}


def model_overrides(model: str) -> list[str]:
    """The overrides that compose ``model`` as a training run of it would: its experiment, if any."""
    return [f"experiment={EXPERIMENTS[model]}"] if model in EXPERIMENTS else [f"model={model}"]


@contextlib.contextmanager
def _open(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        yield


def autotuned(cfg, batch_size: int, **measure: Any):
    """``cfg`` at ``batch_size`` settled as a training run of it would be (``auto`` measured or read from
    the user's cache, explicit values kept): a :class:`cifar_lab.builders.settle.Settled` whose ``cfg`` is
    final and whose ``decision`` says where the choice came from."""
    from cifar_lab.builders.settle import BENCH, settle

    with _open(cfg):
        cfg.data.batch_size = batch_size
    return settle(cfg, BENCH, **measure)


def assembled_module(settled, device: torch.device):
    """The training module of a settled config, built as every command builds it, on ``device`` in training mode."""
    from cifar_lab.builders.assemble import assemble

    return assemble(settled).module.to(device).train()


class _TrainingStub:
    """What ``CIFARDataModule.on_after_batch_transfer`` reads from a Trainer while training, in
    the run's last epoch: a recipe that resizes by epoch (the speedrun's 24 px first epochs)
    trains at its final size there, the size the reference pipeline trains at and the step
    measurement counts."""

    training = True
    sanity_checking = False
    global_rank = 0
    world_size = 1

    def __init__(self, current_epoch: int = 0) -> None:
        self.current_epoch = current_epoch


_LOADED: dict[str, Any] = {}  # source description -> ImageSplits, so repeats skip decoding


def build_datamodule(cfg, cached: bool = True):
    """The configured datamodule; with ``cached`` its source loads from disk only once per run."""
    from cifar_lab import builders

    dm = builders.build_datamodule(cfg)
    if cached:
        source = dm.source
        key = source.describe()
        load = source.load

        def load_once():
            if key not in _LOADED:
                _LOADED[key] = load()
            return _LOADED[key]

        source.load = load_once
    return dm


def lab_datamodule(cfg, batch_size: int, cached: bool = True):
    """A set-up datamodule that augments as in training (a stand-in for the Trainer)."""
    if cfg.data.batch_size != batch_size:
        with _open(cfg):
            cfg.data.batch_size = batch_size
    dm = build_datamodule(cfg, cached)  # batches in the network's layout (module.memory_format)
    dm.setup("fit")
    dm.trainer = _TrainingStub(max(0, int(cfg.trainer.get("max_epochs") or 1) - 1))
    return dm


def lab_batches(dm, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """cifar-lab's training batches as Lightning delivers them: loader, transfer, hook."""
    while True:
        for batch in dm.train_dataloader():
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            yield dm.on_after_batch_transfer(batch, 0)
