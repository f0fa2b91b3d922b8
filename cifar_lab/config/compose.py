"""Compose configs in code, as the command line would, and replay a training run's overrides.

``evaluate`` and ``predict`` rebuild the configuration a checkpoint was trained with by
composing the training command's own overrides (``.hydra/overrides.yaml``, or the copy
stored in the checkpoint) with Hydra's compose API, followed by the user's overrides. So
``ckpt_path=<a data=synthetic run> data.source.test_size=50`` works: the key exists in the
group the training run chose. The network node is always the one saved with the checkpoint
(what its weights were built with), unless the user overrides ``model`` explicitly.
"""

from __future__ import annotations

import logging
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
from cifar_lab.errors import ConfigError, config_error

log = logging.getLogger(__name__)

__all__ = ["hydra_job", "replayable", "from_training", "compose_training"]

# Keys of a training command that must not be replayed: Hydra's own, the sweeper, and the
# training job's own settings (a resumed run's ckpt_path=last, its task name).
NOT_REPLAYED = ("hydra", "hparams_search", "ckpt_path", "task_name")


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def replayable(saved: Sequence[str], user: Sequence[str]) -> list[str]:
    """The training overrides to compose before the user's ``user`` overrides.

    Left out: :data:`NOT_REPLAYED` keys, and keys below a group the user chooses again or
    deletes (``data.source.test_size=50`` would not fit ``data=cifar10``).
    """
    parser = OverridesParser.create()
    try:
        parsed_user = parser.parse_overrides(list(user))
        parsed = parser.parse_overrides(list(saved))
    except Exception as err:  # noqa: BLE001 - Hydra's own parse errors, one line
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    rechosen = [o.key_or_group for o in parsed_user if o.is_delete() or "." not in o.key_or_group]
    kept = []
    for text, override in zip(saved, parsed):
        key = override.key_or_group
        if any(_under(key, own) for own in NOT_REPLAYED):
            continue
        if any(key != group and _under(key, group) for group in rechosen):
            continue
        kept.append(text)
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
    """``cfg`` composed over a training run's overrides, made safe and faithful to the checkpoint.

    Its ``_target_``s are checked (:func:`~cifar_lab.config.trust.check_targets`: the replayed
    overrides came from a file), and its ``model`` node becomes the one saved with the
    checkpoint (``saved``, what the weights were built with) unless ``user`` overrides the model.
    """
    from cifar_lab.checkpoints import LEGACY_MODEL_KEYS

    check_targets(cfg, origin="the training run's overrides")
    if isinstance(saved.get("model"), dict) and "model" in cfg and not _touches(user, "model"):
        network = {k: v for k, v in saved["model"].items() if k not in LEGACY_MODEL_KEYS}
        if OmegaConf.to_container(cfg.model, resolve=True) != network:
            log.info("using the network config saved with the checkpoint (conf/model differs from it)")
            with open_dict(cfg):
                cfg.model = OmegaConf.create(network)
    return cfg


def compose_training(training: Sequence[str] | None, overrides: Sequence[str], saved: dict[str, Any]
                     ) -> DictConfig:
    """The ``train`` config of a checkpoint's run, without the hydra node.

    ``training=None`` (the training command is unknown: an older checkpoint away from its run
    directory) gives the checkpoint's own resolved config ``saved`` with ``overrides`` applied.
    """
    if training is None:
        cfg = OmegaConf.create(saved)
        cfg.merge_with_dotlist([o.lstrip("+") for o in overrides])
        return cfg
    if GlobalHydra.instance().is_initialized():
        cfg = _compose("train", [*replayable(training, overrides), *overrides])
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = _compose("train", [*replayable(training, overrides), *overrides])
    with open_dict(cfg):
        del cfg["hydra"]
    return from_training(cfg, saved, overrides)
