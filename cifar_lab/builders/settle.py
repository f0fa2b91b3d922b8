"""Settle: the composed config made final before anything of the run is built.

:func:`settle` checks the config for the command's role, refuses the keys the role cannot use,
reads the checkpoint whose saved choices apply (a resume's, or evaluate's), and decides every
``auto`` value with :func:`cifar_lab.autotune.decide`: ``trainer.precision``,
``module.memory_format`` and ``module.compile``. The result (:class:`Settled`) holds a read-only
copy of the config with no ``auto`` left; it is the run's config.yaml, and
:func:`cifar_lab.builders.assemble.assemble` builds every object from it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_lab import autotune, builders
from cifar_lab.checkpoints import Resume
from cifar_lab.config.schema import validate_config
from cifar_lab.data.datamodule import ReadSplits
from cifar_lab.errors import ConfigError
from cifar_lab.module import MEMORY_FORMATS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Role:
    """What a command does with a settled config: which steps of the build it takes."""

    name: str
    reads_training_set: bool  # the data is read before deciding (missing data fails first; run length)
    resumes: bool = False  # ckpt_path continues a run: its checkpoint's saved choices and replay rules
    init_from: str = "refused"  # "used": its weights start the network; "refused"; "ignored" (says why)
    teacher: bool = True  # module.distill.teacher is built and attached
    trainer: bool = True
    loggers: bool = True
    reporting: bool = True  # report, checkpoint and progress callbacks of the callbacks group


TRAIN = Role("train", reads_training_set=True, init_from="used")
RESUME = Role("resume", reads_training_set=True, resumes=True)
SWEEP_TRIAL = Role("sweep trial", reads_training_set=True, init_from="used")
EVALUATE = Role("evaluate", reads_training_set=False, init_from="ignored", teacher=False)
TUNE_LR = Role("tune lr", reads_training_set=False, init_from="used", loggers=False, reporting=False)
TUNE_BATCH_SIZE = Role("tune batch_size", reads_training_set=True, init_from="used", loggers=False,
                       reporting=False)
BENCH = Role("bench", reads_training_set=False, teacher=False, trainer=False, loggers=False, reporting=False)
ROLES = (TRAIN, RESUME, SWEEP_TRIAL, EVALUATE, TUNE_LR, TUNE_BATCH_SIZE, BENCH)


@dataclass(frozen=True)
class Settled:
    """A final run config (read-only, no ``auto``), the decision behind it and the checkpoint it uses."""

    cfg: DictConfig
    role: Role
    decision: autotune.Decision
    resume: Resume | None = None  # a resume's checked checkpoint
    trained: tuple[Path, dict[str, Any]] | None = None  # evaluate: the checkpoint file and contents tested
    train_images: int | None = None  # the training set's size, where the role read it (rank 0)
    data: ReadSplits | None = None  # the splits rank 0 read while settling: the run's datamodule reuses them
    notes: list[str] = field(default_factory=list)  # keys the role does not use, and what happens to them

    def with_batch_size(self, batch_size: int) -> "Settled":
        """The same decisions at another ``data.batch_size`` (one trial of the batch-size finder)."""
        cfg = copy.deepcopy(self.cfg)
        OmegaConf.set_readonly(cfg, False)
        with open_dict(cfg):
            cfg.data.batch_size = batch_size
        OmegaConf.set_readonly(cfg, True)
        return replace(self, cfg=cfg)


def settle(cfg: DictConfig, role: Role, run_dir: Path | None = None, resume: Resume | None = None,
           trained: tuple[Path, dict[str, Any]] | None = None, train_images: int | None = None,
           **measure: Any) -> Settled:
    """``cfg`` checked for ``role`` and decided, as a read-only copy (``cfg`` itself is left as it was).

    ``resume`` (a resume: :func:`cifar_lab.checkpoints.prepare_resume`, checked before the run directory is
    taken) and ``trained`` (evaluate: the checkpoint tested) give the saved precision and memory format, which
    are kept. ``run_dir`` receives rank 0's decision for the other DDP ranks. ``train_images``: the training
    set's size where the role states it without reading the data (the bench: CIFAR-10's). ``measure`` goes to
    :func:`cifar_lab.autotune.decide` (a fake clock in tests).
    """
    final = copy.deepcopy(cfg)
    validate_config(final)
    _check_memory_format(final)
    notes = _unused_keys(final, role)
    if role.resumes != (resume is not None):
        raise ValueError(f"{role.name}: a resume is settled with its checked checkpoint, and only a resume")
    if not role.resumes and final.get("ckpt_path") and trained is None:
        raise ConfigError(f"ckpt_path={final.ckpt_path}: {role.name} does not resume a run; drop ckpt_path "
                          "(init_from=<checkpoint> starts from a checkpoint's weights)")
    _probe(final)
    data = _read_training_set(final) if role.reads_training_set and rank_zero_only.rank == 0 else None
    images = data.train_images if data else train_images
    saved = resume.config if resume else (trained[1].get("hyper_parameters") if trained else None)
    decision = autotune.decide(final, run_dir, saved, rank=rank_zero_only.rank, train_images=images, **measure)
    with open_dict(final):
        final.module.compile = bool(final.module.compile) if decision.compile is None else decision.compile
    OmegaConf.set_readonly(final, True)
    return Settled(final, role, decision, resume, trained, images, data, notes)


def _check_memory_format(cfg: DictConfig) -> None:
    """Checked here, before the decision, against the module's own list (cifar_lab.module.MEMORY_FORMATS)."""
    value = str(OmegaConf.select(cfg, "module.memory_format", default=autotune.AUTO))
    if value != autotune.AUTO and value not in MEMORY_FORMATS:
        raise ConfigError(f"invalid config: module.memory_format={value}: must be auto or one of "
                          f"{', '.join(MEMORY_FORMATS)}")


def _unused_keys(cfg: DictConfig, role: Role) -> list[str]:
    """Refuse what the role cannot do; a key it ignores is said in one line."""
    notes = []
    if cfg.get("init_from") and role.init_from == "refused":
        if role.resumes:
            raise ConfigError("ckpt_path and init_from exclude each other: ckpt_path resumes a run (optimizer and "
                              "schedule included), init_from starts a new run from a checkpoint's weights only")
        raise ConfigError(f"init_from={cfg.init_from}: {role.name} does not start from a checkpoint's weights; "
                          "drop init_from")
    if cfg.get("init_from") and role.init_from == "ignored":
        notes.append(f"init_from={cfg.init_from}: not used by {role.name}, which runs the checkpoint's own weights")
    teacher = OmegaConf.select(cfg, "module.distill.teacher", default=None)
    if teacher and not role.teacher:
        if role.name == "bench":
            raise ConfigError(f"module.distill.teacher={teacher}: the bench times plain training steps; drop it")
        notes.append(f"module.distill.teacher={teacher}: not used by {role.name}, which trains no step")
    for note in notes:
        log.info("%s", note)
    return notes


def _probe(cfg: DictConfig) -> None:
    """Build the module and the Trainer once, undecided values as their plainest choice, and throw them away:
    a value torch or Lightning refuses stops the command in seconds, before data is read or steps are timed."""
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        if str(probe.trainer.get("precision")) == autotune.AUTO:
            probe.trainer.precision = "32"
        if str(probe.module.get("memory_format")) == autotune.AUTO:
            probe.module.memory_format = "contiguous"
        if str(probe.module.get("compile")) == autotune.AUTO:
            probe.module.compile = False
    builders.check_module(probe)
    builders.check_trainer(probe)


def _read_training_set(cfg: DictConfig) -> ReadSplits:
    """The data, read once before deciding: missing data and a batch larger than the training set fail here,
    before steps are timed; its size gives the run's length to the compile decision."""
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        probe.module.memory_format = "contiguous"  # the layout of batches is not looked at here
    datamodule = builders.build_datamodule(probe)
    datamodule.prepare_data()
    datamodule.setup("fit")
    read = datamodule.read_splits()
    if int(cfg.data.batch_size) > read.train_images:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training set "
                          f"({read.train_images} images); choose data.batch_size <= {read.train_images}")
    return read


def runtime_record(settled: Settled) -> dict[str, Any]:
    """How the network ran (metrics.json): precision, memory format and compilation, and the decision behind them."""
    cfg = settled.cfg
    return {"precision": str(cfg.trainer.precision), "memory_format": str(cfg.module.memory_format),
            "compile": bool(cfg.module.compile), "autotune": settled.decision.record()}
