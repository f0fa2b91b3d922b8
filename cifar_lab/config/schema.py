"""Config validation: what no constructor checks, before any work starts.

``validate_config(cfg)`` runs at the top of ``train()`` and raises one :class:`ConfigError`
that lists every problem found, each as ``<key>=<value>: <what is allowed>``, so a typo
stops the run in seconds instead of at epoch 80. Values that torch, Lightning or the
project's classes refuse in their constructors are left to them: ``cifar_lab.builders``
builds every object right after this check, before any data is read, and reports a
refusal as one message. Three kinds of checks here:

1. ``RULES``: a table of ``key -> allowed values``. A ``*`` in a key matches any one
   child (``data.augment.*.p`` is the ``p`` of every augmentation op). A rule applies
   where its key exists; a key the config does not have is not an error here (Hydra's
   struct mode already refuses unknown keys on the command line).
2. ``CROSS_CHECKS``: relations between keys (a crop larger than the padded image, a
   validation split larger than a known training set, float16 on a CPU, ...).
3. Unknown arguments: every ``_target_`` node under the data, model, optimizer, scheduler
   and module keys must only hold arguments its callable accepts, so a misspelt knob in
   an experiment file (``model.dropuot: 0.5``) is an error, not silently ignored.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from cifar_lab.data.archive import VARIANTS
from cifar_lab.data.augment.indexing import PADDING_MODES as CROP_PADDING_MODES
from cifar_lab.data.mixing import MODES as MIXING_MODES
from cifar_lab.data.sampling import PIPELINES
from cifar_lab.errors import ConfigError
from cifar_lab.models.tta import PADDING_MODES as TTA_PADDING_MODES
from cifar_lab.optim.schedules import INTERVALS as SCHEDULER_INTERVALS

__all__ = ["Check", "RULES", "CROSS_CHECKS", "validate_config", "KNOWN_METRICS"]


# ----------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    """A predicate on one value plus the words that describe what it accepts."""

    test: Callable[[Any], bool]
    allowed: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    words = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
    if lo is not None and hi is not None:
        words = f"an integer in [{lo}, {hi}]"
    return Check(lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi), words)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    def test(v: Any) -> bool:
        if not _is_number(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    if lo is not None and hi is not None:
        words = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        words = f"a number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        words = f"a number {'<' if hi_open else '<='} {hi:g}"
    else:
        words = "a finite number"
    return Check(test, words)


def one_of(*values: Any) -> Check:
    return Check(lambda v: any(v == x and type(v) is type(x) for x in values),
                 "one of " + ", ".join(repr(x) if isinstance(x, str) else str(x) for x in values))


def either(*checks: Check) -> Check:
    return Check(lambda v: any(c(v) for c in checks), ", or ".join(c.allowed for c in checks))


def optional(check: Check, meaning: str = "") -> Check:
    return Check(lambda v: v is None or check(v), f"{check.allowed}, or null{' ' + meaning if meaning else ''}")


def numbers(count: int, each: Check) -> Check:
    return Check(lambda v: _is_seq(v) and len(v) == count and all(each(x) for x in v),
                 f"a list of {count} values, each {each.allowed}")


def _is_seq(v: Any) -> bool:
    return isinstance(v, (list, tuple))


BOOL = Check(lambda v: isinstance(v, bool), "true or false")
PROBABILITY = number(0, 1)
POSITIVE = number(0, lo_open=True)
NON_NEGATIVE = number(0)


def _metric_names() -> tuple[str, ...]:
    names = ["val/acc_best", "val/ece", "test/ece"]
    for stage in ("train", "val", "test"):
        for name in ("loss", "acc", "acc_top5"):
            names.append(f"{stage}/{name}")
    names += ["train/loss_step", "train/acc_step"]  # per-step curves
    return tuple(names)


KNOWN_METRICS = _metric_names()
# What a sweep optimises or a callback monitors during fitting: never a test metric.
FIT_METRICS = tuple(m for m in KNOWN_METRICS if not m.startswith("test/"))
# Precisions Lightning accepts that cast the whole network (its input included): not supported.
CAST_PRECISIONS = ("64", "64-true", "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")

# ----------------------------------------------------------------------------- the table
# Only what no constructor checks: values torch, Lightning or our own classes refuse when
# built (a negative learning rate, an unknown precision, a dropout of 1.5) are left to them;
# cifar_lab.builders builds every object before any data is read and reports a refusal as
# one message. What stays: the project's own keys, values the libraries accept but that
# fail later or silently (momentum 1.5, dampening 2, a zero warm-up period, a metric name
# that is never logged), and the relations between keys (CROSS_CHECKS).
RULES: dict[str, Check] = {
    # run
    "seed": integer(0, 2**32 - 1),
    "test": BOOL,
    "reuse_host_memory": BOOL,
    "tags": Check(lambda v: _is_seq(v) and all(isinstance(t, str) and t for t in v),
                  "a list of names, e.g. tags=[baseline,cv]"),
    "notes": optional(Check(lambda v: isinstance(v, str), 'a text, e.g. notes="first try"'), "(no notes)"),
    "optimized_metric": optional(one_of(*FIT_METRICS), "(return nothing)"),
    # data
    "data.batch_size": integer(1),
    "data.eval_batch_size": optional(integer(1), "(same as data.batch_size)"),
    "data.val_size": integer(0),
    "data.folds": Check(lambda v: _is_int(v) and (v == 0 or v >= 2), "0 (no cross-validation) or a number of folds >= 2"),
    "data.fold": integer(0),
    "data.num_workers": integer(0),
    "data.num_classes": integer(2),
    "data.pipeline": one_of(*PIPELINES),
    "data.mean": numbers(3, number(0, 1)),
    "data.std": numbers(3, POSITIVE),
    "data.drop_last": BOOL,
    "data.pin_memory": BOOL,
    "data.source.image_size": integer(8),
    "data.source.train_size": integer(1),
    "data.source.test_size": integer(1),
    "data.source.noise": NON_NEGATIVE,
    "data.source.variant": one_of(*VARIANTS),
    "data.augment.*.p": PROBABILITY,
    "data.augment.*.padding_mode": one_of(*CROP_PADDING_MODES),
    "data.mixing.prob": PROBABILITY,
    "data.mixing.switch_prob": PROBABILITY,
    "data.mixing.mixup_alpha": optional(POSITIVE, "(no mixup)"),
    "data.mixing.cutmix_alpha": optional(POSITIVE, "(no CutMix)"),
    "data.mixing.mode": one_of(*MIXING_MODES),
    "data.mixing.stop_epoch": optional(integer(0), "(never stop)"),
    # model knobs shared by several networks
    "model.stochastic_depth": number(0, 1, hi_open=True),
    # optimizer
    "optimizer.momentum": number(0, 1, hi_open=True),
    "optimizer.dampening": number(0, 1),
    "optimizer.nesterov": BOOL,
    "optimizer.amsgrad": BOOL,
    # scheduler (the group's own keys, then the scheduler's arguments)
    "scheduler.interval": one_of(*SCHEDULER_INTERVALS),
    "scheduler.frequency": integer(1),
    "scheduler.monitor": one_of(*FIT_METRICS),
    "scheduler.scheduler.T_max": POSITIVE,
    "scheduler.scheduler.eta_min": NON_NEGATIVE,
    "scheduler.scheduler.step_size": integer(1),
    "scheduler.scheduler.gamma": POSITIVE,
    "scheduler.scheduler.milestones": Check(lambda v: _is_seq(v) and all(_is_int(x) and x >= 1 for x in v),
                                            "a list of epochs (integers >= 1)"),
    "scheduler.scheduler.max_lr": POSITIVE,
    "scheduler.scheduler.div_factor": POSITIVE,
    "scheduler.scheduler.final_div_factor": POSITIVE,
    "scheduler.scheduler.patience": integer(0),
    "scheduler.scheduler.min_lr": NON_NEGATIVE,
    # the LightningModule
    "module.label_smoothing": number(0, 1, hi_open=True),
    "module.no_decay_norm_and_bias": BOOL,
    "autotune.budget_s": NON_NEGATIVE,
    "autotune.budget_fraction": number(0, 1),
    "autotune.budget_max_s": NON_NEGATIVE,
    "autotune.min_rounds": integer(1),
    "autotune.max_rounds": integer(1),
    "autotune.settle": number(0, 1, hi_open=True),
    "autotune.give_up": number(1, lo_open=True),
    "autotune.give_up_first": number(1, lo_open=True),
    "autotune.probe_slower": number(1, lo_open=True),
    "autotune.stale_above": POSITIVE,
    "module.compile": either(BOOL, one_of("auto")),
    "module.distill.temperature": POSITIVE,
    "module.distill.weight": number(0, 1),
    # trainer
    "trainer.max_epochs": Check(lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1, or -1 for no limit"),
    "trainer.min_epochs": optional(integer(0)),
    "trainer.check_val_every_n_epoch": optional(integer(1), "(validate on val_check_interval only)"),
    "trainer.log_every_n_steps": integer(1),
    "trainer.process_group_timeout_s": optional(POSITIVE, "(torch's default: 30 minutes)"),
    "trainer.gradient_clip_val": optional(NON_NEGATIVE, "(no clipping)"),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.deterministic": either(BOOL, one_of("warn")),
    "trainer.benchmark": optional(BOOL),
    "trainer.num_sanity_val_steps": integer(-1),
    "trainer.use_distributed_sampler": Check(lambda v: v is False, "false (the datamodule shards batches itself)"),
    # callbacks
    "callbacks.model_checkpoint.monitor": optional(one_of(*FIT_METRICS), "(no best checkpoint)"),
    "callbacks.early_stopping.monitor": one_of(*FIT_METRICS),
}

# Training-set sizes of the datasets known without loading them.
KNOWN_TRAIN_SIZES = {name: layout["train_images"] for name, layout in VARIANTS.items()}
KNOWN_NUM_CLASSES = {name: layout["num_classes"] for name, layout in VARIANTS.items()}


# ----------------------------------------------------------------------------- walking
def _plain(cfg: Any) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _matches(node: Any, parts: list[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every key of ``node`` matching ``parts`` (``*`` = any one key)."""
    if not parts:
        yield prefix, node
        return
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    keys = [k for k in node if fnmatch.fnmatchcase(str(k), head)] if "*" in head else ([head] if head in node else [])
    for key in keys:
        yield from _matches(node[key], rest, f"{prefix}.{key}" if prefix else str(key))


def _get(cfg: dict, key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _problem(key: str, value: Any, allowed: str) -> str:
    """One problem line: ``<key>=<value>: must be <allowed>``."""
    return f"{key}={_show(value)}: must be {allowed}"


# ----------------------------------------------------------------------------- cross checks
def _pair(v: Any) -> tuple[int, int] | None:
    if _is_int(v):
        return v, v
    if _is_seq(v) and len(v) in (1, 2) and all(_is_int(x) for x in v):
        return (v[0], v[-1])
    return None


def _padding(v: Any) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom), as RandomCrop reads it."""
    if _is_int(v):
        return v, v, v, v
    if _is_seq(v) and all(_is_int(x) for x in v):
        if len(v) == 1:
            return v[0], v[0], v[0], v[0]
        if len(v) == 2:
            return v[0], v[1], v[0], v[1]
        if len(v) == 4:
            return tuple(v)  # type: ignore[return-value]
    return None


def _image_size(cfg: dict) -> int | None:
    """Side of the training images when the config says it (archives are 32x32)."""
    source = _get(cfg, "data.source") or {}
    if str(source.get("_target_", "")).endswith("CifarArchive"):
        return 32
    size = source.get("image_size")
    return size if _is_int(size) else None


def _check_crops(cfg: dict) -> Iterator[str]:
    size = _image_size(cfg)
    augment = _get(cfg, "data.augment") or {}
    if size is None or not isinstance(augment, dict):
        return
    for name, op in augment.items():
        if not isinstance(op, dict) or not str(op.get("_target_", "")).endswith("RandomCrop"):
            continue
        crop, pad = _pair(op.get("size", 32)), _padding(op.get("padding", 4))
        if crop is None:
            yield _problem(f"data.augment.{name}.size", op.get("size"), "an integer or a pair of integers")
            continue
        if pad is None or min(pad) < 0:
            yield _problem(f"data.augment.{name}.padding", op.get("padding"),
                           "a non-negative integer or a list of 2 or 4 of them")
            continue
        height, width = size + pad[1] + pad[3], size + pad[0] + pad[2]
        if crop[0] > height or crop[1] > width:
            yield _problem(f"data.augment.{name}.size", op.get("size"),
                           f"at most the padded image, {height}x{width} ({size}-pixel images padded by "
                           f"data.augment.{name}.padding={_show(op.get('padding', 4))})")
        elif op.get("p", 1.0) != 1.0 and crop != (size, size):
            yield _problem(f"data.augment.{name}.size", op.get("size"),
                           f"{size} (the image size) when data.augment.{name}.p < 1, "
                           "so an uncropped image keeps its size")


def _training_set(cfg: dict) -> tuple[int, str] | None:
    """Size and description of the training set when known before loading."""
    source = _get(cfg, "data.source") or {}
    target = str(source.get("_target_", ""))
    if target.endswith("CifarArchive") and source.get("variant") in KNOWN_TRAIN_SIZES:
        return KNOWN_TRAIN_SIZES[source["variant"]], f"the {source['variant']} training set"
    if target.endswith("SyntheticSource") and _is_int(source.get("train_size")):
        return source["train_size"], "data.source.train_size"
    return None


def _check_split(cfg: dict) -> Iterator[str]:
    known = _training_set(cfg)
    val_size, batch = _get(cfg, "data.val_size"), _get(cfg, "data.batch_size")
    if known is None or not _is_int(val_size) or val_size < 0:
        return
    total, what = known
    if val_size >= total:
        yield _problem("data.val_size", val_size,
                       f"less than {total} ({what} has {total} images), or 0 to validate on the test set")
        return
    if _get(cfg, "data.drop_last") is True and _is_int(batch) and batch > total - val_size:
        yield _problem("data.batch_size", batch,
                       f"at most {total - val_size} (the training images left after data.val_size) "
                       "with data.drop_last=true, or no batch is ever trained")


def _check_folds(cfg: dict) -> Iterator[str]:
    folds, fold = _get(cfg, "data.folds"), _get(cfg, "data.fold", 0)
    if _is_int(fold) and fold != 0 and folds in (None, 0):
        yield _problem("data.fold", fold, "0 without cross-validation: data.fold picks a fold of data.folds, which "
                                          f"is {folds}; set data.folds (e.g. data.folds=5 data.fold={fold})")
    if _is_int(folds) and folds >= 2 and _is_int(fold) and fold >= folds:
        yield _problem("data.fold", fold, f"a fold in [0, {folds - 1}] for data.folds={folds}")
    known = _training_set(cfg)
    if known is not None and _is_int(folds) and folds > known[0]:
        yield _problem("data.folds", folds, f"at most {known[0]} ({known[1]} has {known[0]} images)")


def _check_classes(cfg: dict) -> Iterator[str]:
    variant = _get(cfg, "data.source.variant")
    num_classes = _get(cfg, "data.num_classes")
    if str(_get(cfg, "data.source._target_", "")).endswith("CifarArchive") and variant in KNOWN_NUM_CLASSES:
        if num_classes != KNOWN_NUM_CLASSES[variant]:
            yield _problem("data.num_classes", num_classes, f"{KNOWN_NUM_CLASSES[variant]} for {variant}")
    mixing = _get(cfg, "data.mixing")
    if isinstance(mixing, dict):
        if not mixing.get("mixup_alpha") and not mixing.get("cutmix_alpha"):
            yield _problem("data.mixing.mixup_alpha", mixing.get("mixup_alpha"),
                           "a number > 0 when data.mixing.cutmix_alpha is null too (data.mixing=null turns mixing off)")
        if "num_classes" in mixing and mixing["num_classes"] != num_classes:
            yield _problem("data.mixing.num_classes", mixing["num_classes"], f"data.num_classes ({num_classes})")


def _check_trainer(cfg: dict) -> Iterator[str]:
    trainer = _get(cfg, "trainer") or {}
    lo, hi = trainer.get("min_epochs"), trainer.get("max_epochs")
    if _is_int(lo) and _is_int(hi) and hi != -1 and lo > hi:
        yield _problem("trainer.min_epochs", lo, f"at most trainer.max_epochs ({hi})")
    precision = str(trainer.get("precision"))
    if precision in CAST_PRECISIONS:
        # Lightning accepts these, then casts the network while batches stay float32: the first
        # convolution fails on mismatched dtypes.
        yield _problem("trainer.precision", trainer.get("precision"),
                       "32, bf16-mixed or 16-mixed (the batches are float32; precisions that cast the "
                       "whole network are not supported)")
    elif trainer.get("accelerator") == "cpu" and precision in ("16", "16-mixed"):
        yield _problem("trainer.precision", trainer.get("precision"),
                       "32 or bf16-mixed on the CPU (float16 needs a GPU)")
    no_val = trainer.get("limit_val_batches") == 0 or trainer.get("limit_val_batches") == 0.0
    metric = cfg.get("optimized_metric")
    if no_val and isinstance(metric, str) and metric.startswith("val/"):
        yield _problem("optimized_metric", metric,
                       "a train/ metric (or null): trainer.limit_val_batches=0 turns validation off")


def _check_resize(cfg: dict) -> Iterator[str]:
    """A progressive-resizing schedule must reach full size by the last epoch: the test runs at full
    size, and a network whose every epoch trained on smaller images tests near chance."""
    epochs = _get(cfg, "trainer.max_epochs")
    augment = _get(cfg, "data.augment") or {}
    if not _is_int(epochs) or epochs < 1 or not isinstance(augment, dict):
        return
    for name, op in augment.items():
        if not isinstance(op, dict) or not str(op.get("_target_", "")).endswith("ProgressiveResize"):
            continue
        schedule = op.get("schedule") or []
        started = [entry for entry in schedule if _is_seq(entry) and len(entry) == 2 and _is_int(entry[0])
                   and entry[0] <= epochs - 1]
        if started and started[-1][1] is not None:
            yield _problem(f"data.augment.{name}.schedule", schedule,
                           f"a schedule back to full size (null) by the last epoch ({epochs - 1} with "
                           f"trainer.max_epochs={epochs}); raise trainer.max_epochs, shorten the schedule, "
                           f"or drop it with data.augment.{name}=null")


# Groups whose numbers reach constructors and arithmetic: nan and inf there are never a setting.
_NUMBER_GROUPS = ("optimizer", "scheduler", "module", "model", "data", "trainer", "autotune")
# Groups whose values are all constructor arguments: a number given as text (quoted) is refused too.
_ARGUMENT_GROUPS = ("optimizer", "scheduler", "module", "model")
_YAML_NON_FINITE = re.compile(r"^[-+]?\.(nan|inf)$", re.IGNORECASE)  # YAML 1.1's spellings: text to Hydra


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _check_numbers(cfg: dict) -> Iterator[str]:
    """nan and inf anywhere numbers are settings, whether Hydra read them as floats (``nan``, ``inf``) or as
    text (YAML's ``.nan``/``.inf``), and numbers in quotes among constructor arguments: named by key
    before a constructor compares them (torch's own message names neither key nor value)."""
    def walk(node: Any, path: str, group: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key, child in node.items():
                yield from walk(child, f"{path}.{key}", group)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                yield from walk(child, f"{path}.{i}", group)
        elif isinstance(node, float) and not math.isfinite(node):
            yield _problem(path, node, "a finite number (nan and inf are not settings)")
        elif isinstance(node, str) and _YAML_NON_FINITE.match(node.strip()):
            yield _problem(path, node, f"a finite number ({node!r} is YAML's spelling of nan/inf, which no setting "
                                       "takes)")
        elif isinstance(node, str) and group in _ARGUMENT_GROUPS and path.rsplit(".", 1)[-1] not in _HYDRA_KEYS:
            value = _as_float(node)
            if value is not None:
                yield _problem(path, node, "a finite number, not text" + (" (drop the quotes)" if math.isfinite(value)
                                                                           else " (nan and inf are not settings)"))

    for group in _NUMBER_GROUPS:
        yield from walk(cfg.get(group), group, group)


CROSS_CHECKS: tuple[Callable[[dict], Iterator[str]], ...] = (
    _check_crops, _check_split, _check_folds, _check_classes, _check_trainer, _check_resize,
)


# ----------------------------------------------------------------------------- unknown arguments
# Config groups whose `_target_` nodes are built with their keys as arguments.
TARGET_GROUPS = ("data", "model", "optimizer", "scheduler", "module", "trainer", "callbacks", "logger")
# Keys a node may hold that are not arguments of its callable.
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Arguments the builders pass themselves (cifar_lab.builders.build_module and friends).
_PASSED_BY_BUILDERS = {
    "module": {"net", "optimizer", "scheduler", "scheduler_interval", "scheduler_frequency",
               "scheduler_monitor", "hparams"},
    "trainer": {"callbacks", "logger"},
    "optimizer": {"params"},
    "scheduler.scheduler": {"optimizer"},
}
# Keys the builders read and remove before building (cifar_lab.builders.build_trainer).
_READ_BY_BUILDERS = {"trainer": {"process_group_timeout_s"}}


def _locate(target: str) -> Any:
    """The object a dotted ``_target_`` names: the longest importable module, then attributes."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot import {target}")


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, child in node.items():
            if isinstance(child, (dict, list)):
                yield from _target_nodes(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _target_nodes(child, f"{path}.{i}")


def _check_arguments(cfg: dict) -> Iterator[str]:
    for group in TARGET_GROUPS:
        for path, node in _target_nodes(cfg.get(group), group):
            target = node["_target_"]
            if not isinstance(target, str):
                yield _problem(f"{path}._target_", target, "the dotted name of a class or function")
                continue
            try:
                params = inspect.signature(_locate(target)).parameters
            except ImportError as err:
                yield _problem(f"{path}._target_", target, f"an importable class or function ({err})")
                continue
            except (AttributeError, ValueError, TypeError):
                yield _problem(f"{path}._target_", target, "an importable class or function")
                continue
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                continue
            accepted = set(params) | _PASSED_BY_BUILDERS.get(path, set()) | _READ_BY_BUILDERS.get(path, set())
            for key in node:
                if key in _HYDRA_KEYS or key in accepted:
                    continue
                names = sorted(p for p in params if p not in _PASSED_BY_BUILDERS.get(path, set()) and p != "self")
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                yield (f"{path}.{key}: not an argument of {target}{hint}; "
                       f"it takes {', '.join(names) or 'no arguments'}")


# ----------------------------------------------------------------------------- entry point
def find_problems(cfg: DictConfig | dict) -> list[str]:
    """Every problem of ``cfg`` as ``<key>=<value>: <what is allowed>`` lines (empty: valid)."""
    try:
        plain = _plain(cfg)
    except Exception as err:  # an interpolation that cannot resolve, e.g. ${oc.env:UNSET}
        return [f"the config does not resolve: {err}".splitlines()[0]]
    problems: list[str] = list(_check_numbers(plain))  # first: its message is the one kept for a key
    for key, check in RULES.items():
        for path, value in _matches(plain, key.split(".")):
            if not check(value):
                problems.append(_problem(path, value, check.allowed))
    for cross in CROSS_CHECKS:
        problems += list(cross(plain))
    problems += list(_check_arguments(plain))
    # One line per key: a value failing its rule may fail a cross check too.
    first: dict[str, str] = {}
    for line in problems:
        first.setdefault(line.split("=", 1)[0].split(":", 1)[0], line)
    return list(first.values())


def validate_config(cfg: DictConfig | dict) -> None:
    """Raise one :class:`ConfigError` listing every problem of ``cfg``; return quietly when valid."""
    problems = find_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError(f"invalid config ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems))


TTA_KEYS = {"enabled", "flip", "translate", "shifts", "padding_mode"}


def check_tta(tta: Any, image_size: int = 32, key: str = "tta") -> None:
    """Refuse test-time augmentation settings no view can be made from, before any work (one line)."""
    tta = _plain(tta) or {}
    if not isinstance(tta, dict) or not tta.get("enabled", False):
        return
    unknown = sorted(set(tta) - TTA_KEYS)
    if unknown:
        raise ConfigError(_problem(f"{key}.{unknown[0]}", tta[unknown[0]], f"one of the keys {key}."
                                   + f", {key}.".join(sorted(TTA_KEYS)) + " (it would be ignored)"))
    translate, mode = tta.get("translate", 0), tta.get("padding_mode", "reflect")
    shifts = tta.get("shifts")
    if shifts is not None:
        limit = image_size // 2 if mode == "reflect" else image_size
        if not isinstance(shifts, list) or not shifts or not all(
                isinstance(p, list) and len(p) == 2 and all(_is_int(v) and abs(v) < limit for v in p) for p in shifts):
            raise ConfigError(_problem(f"{key}.shifts", shifts, f"a list of [dy, dx] pairs of whole pixels under {limit} "
                                       "in size, e.g. [[1,1],[-1,-1]], or null"))
    if not _is_int(translate) or not 0 <= translate < image_size:
        raise ConfigError(_problem(f"{key}.translate", translate, f"a whole number of pixels from 0 to {image_size - 1}"))
    if mode not in TTA_PADDING_MODES:
        raise ConfigError(_problem(f"{key}.padding_mode", mode, f"one of {', '.join(TTA_PADDING_MODES)}"))
    if mode == "reflect" and translate >= image_size // 2 and translate:
        raise ConfigError(_problem(f"{key}.translate", translate,
                                   f"below {image_size // 2} with padding_mode=reflect (half the image)"))
    if not isinstance(tta.get("flip", True), bool):
        raise ConfigError(_problem(f"{key}.flip", tta.get("flip"), "true or false"))
