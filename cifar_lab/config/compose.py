"""Compose configs in code, as the command line would, and replay a training run's overrides.

``evaluate`` and ``predict`` rebuild the configuration a checkpoint was trained with by
composing the training command's own overrides (``.hydra/overrides.yaml``, or the copy
stored in the checkpoint) with Hydra's compose API, followed by the user's overrides. So
``ckpt_path=<a data=synthetic run> data.source.test_size=50`` works: the key exists in the
group the training run chose. The network node is always the one saved with the checkpoint
(what its weights were built with), unless the user overrides ``model`` explicitly.

Saved overrides are data from a file (:mod:`cifar_lab.config.saved`): only :data:`REPLAYED`
is replayed, the groups and keys that define the data and the test-time settings. A group
choice must name a shipped option (``conf/<group>/<name>.yaml``); a value holding ``${`` is
refused. Everything else (``hydra/*`` groups and ``hydra.*`` keys, loggers, callbacks other
than the test-time ``callbacks.tta``, paths, trainer, optimizer, the sweep's
``hparams_search``, ``model`` choices and keys: the network comes from the checkpoint) comes
from the current command only.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import configure_log, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_lab.config import CONF_DIR
from cifar_lab.config.trust import check_targets
from cifar_lab.errors import ConfigError, UnsafeConfigError

log = logging.getLogger(__name__)

__all__ = ["hydra_job", "replayable", "from_training", "compose_training"]

# What of a training command's overrides is replayed: the groups and keys that define the data
# and the test-time settings. The network is the checkpoint's own (saved with its weights).
REPLAYED = ("data", "augment", "experiment", "tta", "callbacks.tta", "seed")
# Group choices among them (the option must be a shipped conf/<group>/<name>.yaml).
REPLAYED_GROUPS = ("data", "augment", "experiment")
_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _replayed(override: Any, text: str, origin: str) -> bool:
    """Whether a saved override is replayed; refuses one that is replayable in kind but not safe."""
    key = override.key_or_group
    if not any(_under(key, root) for root in REPLAYED):
        return False
    if "${" in text:
        raise UnsafeConfigError(f"{origin}: the saved override {text!r} holds an interpolation; saved overrides "
                                "are replayed as plain values only. Use the run's own, unmodified files")
    if key in REPLAYED_GROUPS and not override.is_delete():
        value = override.value()
        if not isinstance(value, str) or not _OPTION.fullmatch(value) or ".." in value \
                or not (CONF_DIR / key / f"{value}.yaml").is_file():
            raise UnsafeConfigError(f"{origin}: the saved override {text!r} does not name a shipped {key} option "
                                    f"(conf/{key}/<name>.yaml). Use the run's own, unmodified files")
    return True


def replayable(saved: Sequence[str], user: Sequence[str], origin: str = "the training run's overrides") -> list[str]:
    """The training overrides to compose before the user's ``user`` overrides.

    Only :data:`REPLAYED` groups and keys, and none below a group the user chooses again or
    deletes (``data.source.test_size=50`` would not fit ``data=cifar10``).
    """
    parser = OverridesParser.create()
    try:
        parsed_user = parser.parse_overrides(list(user))
    except Exception as err:  # noqa: BLE001 - Hydra's own parse errors, one line
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    try:
        parsed = parser.parse_overrides([str(o) for o in saved])
    except Exception as err:  # noqa: BLE001
        raise UnsafeConfigError(f"{origin}: cannot parse the saved overrides ({str(err).splitlines()[0]}); use "
                                "the run's own, unmodified files") from None
    rechosen = [o.key_or_group for o in parsed_user if o.is_delete() or "." not in o.key_or_group]
    kept = []
    for text, override in zip(saved, parsed):
        if not _replayed(override, str(text), origin):
            continue
        key = override.key_or_group
        if any(key != group and _under(key, group) for group in rechosen):
            continue
        kept.append(str(text))
    return kept


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    try:
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors (unknown key, group, option, YAML)
        raise config_error(err) from None


@contextmanager
def hydra_job(config_name: str, overrides: Sequence[str], output_dir: str | Path | None = None,
              *, logging_to_file: bool = False) -> Iterator[DictConfig]:
    """Compose ``config_name`` with ``overrides`` and set up a Hydra job around it, as ``@hydra.main`` would.

    The job's directory is ``output_dir``, else the config's ``hydra.run.dir``; ``${hydra:...}``
    interpolations resolve against it. With ``logging_to_file`` Hydra's job logging is
    configured (the command line). Yields the config without its ``hydra`` node.
    """
    setup_globals()  # the ${now:...} and ${hydra:...} resolvers
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = _compose(config_name, overrides)
            with open_dict(cfg):
                out = Path(output_dir) if output_dir is not None else Path(str(cfg.hydra.run.dir))
                cfg.hydra.runtime.output_dir = str(out.resolve())
                cfg.hydra.job.num = 0
                cfg.hydra.job.name = config_name
                cfg.hydra.job.config_name = config_name
            HydraConfig.instance().set_config(cfg)
            if logging_to_file:
                out.mkdir(parents=True, exist_ok=True)
                configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
            with open_dict(cfg):
                del cfg["hydra"]
            yield cfg
    finally:
        GlobalHydra.instance().clear()


def _touches(overrides: Sequence[str], group: str) -> bool:
    keys = (o.lstrip("+~").split("=", 1)[0] for o in overrides)
    return any(_under(key, group) for key in keys)


def from_training(cfg: DictConfig, saved: dict[str, Any], user: Sequence[str] = ()) -> DictConfig:
    """``cfg`` composed over a training run's replayed overrides, with the checkpoint's network.

    ``saved`` is the checkpoint's run config as checked plain data
    (:func:`cifar_lab.checkpoints.saved_config`); its ``model`` node becomes ``cfg.model`` (what
    the weights were built with) unless ``user`` overrides the model. The result is checked again
    as a whole (the replayed overrides came from a file) and is what the command builds.
    """
    from cifar_lab.checkpoints import LEGACY_MODEL_KEYS

    if isinstance(saved.get("model"), dict) and "model" in cfg and not _touches(user, "model"):
        network = {k: v for k, v in saved["model"].items() if k not in LEGACY_MODEL_KEYS}
        if OmegaConf.to_container(cfg.model, resolve=True) != network:
            log.info("using the network config saved with the checkpoint (conf/model differs from it)")
        with open_dict(cfg):
            cfg.model = OmegaConf.create(network)
    check_targets(cfg, origin="the training run's replayed overrides")
    return cfg


def compose_training(training: Sequence[str] | None, overrides: Sequence[str], saved: dict[str, Any]
                     ) -> DictConfig:
    """The ``train`` config of a checkpoint's run, without the hydra node.

    ``training=None`` (the training command is unknown: an older checkpoint away from its run
    directory) composes the defaults with ``overrides``; the network and the data node are the
    checkpoint's (the user's ``data.*`` keys applied on top).
    """
    composed = [*replayable(training or [], overrides), *overrides]
    if GlobalHydra.instance().is_initialized():
        cfg = _compose("train", composed)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = _compose("train", composed)
    with open_dict(cfg):
        del cfg["hydra"]
        if training is None and isinstance(saved.get("data"), dict):
            _use_saved_data(cfg, saved["data"], overrides)
    return from_training(cfg, saved, overrides)


def _use_saved_data(cfg: DictConfig, data: dict[str, Any], overrides: Sequence[str]) -> None:
    """The checkpoint's data node (checked plain data), then the user's ``data.*`` keys on top of it;
    a user's own ``data=<option>`` keeps the composed node instead."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if any(o.key_or_group == "data" for o in parsed):
        return
    cfg.data = OmegaConf.create(data)
    for override in parsed:
        if override.key_or_group.startswith("data.") and not override.is_delete():
            OmegaConf.update(cfg, override.key_or_group, override.value(), force_add=True)


def config_error(err: BaseException) -> ConfigError:
    """One :class:`ConfigError` for a config that does not compose: a YAML syntax error (with its
    file, line and column), an unknown group, option or key, or a bad override."""
    import yaml

    cause = err
    while cause.__cause__ is not None and not isinstance(cause, yaml.YAMLError):
        cause = cause.__cause__
    if isinstance(cause, yaml.YAMLError):
        where = " ".join(str(cause).split())
        return ConfigError(f"a config file is not valid YAML: {where}; fix the file at that line")
    lines = []
    for line in (line.strip() for line in str(err).strip().splitlines()):
        if line.startswith(("full_key:", "object_type", "reference_type", "value:", "Set the environment",
                            "Config search path")):
            break
        if line:
            lines.append(line)
    text, options = " ".join(lines) or type(err).__name__, ""
    if "Available options" in text:  # Hydra lists one option per line: keep them on one
        head, _, rest = text.partition("Available options")
        label, _, names = rest.partition(":")
        text, options = head.strip(), f" Available options{label}: {', '.join(names.split())}"
    return ConfigError(f"cannot compose the config: {text}{options}")
