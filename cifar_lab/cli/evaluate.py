"""Evaluate a trained checkpoint on the test set, with the config it was trained with.

    python -m cifar_lab.evaluate ckpt_path=<run dir or .ckpt> [overrides]

The run config is the training run's own: its ``.hydra/config.yaml`` when the checkpoint sits
in a run directory (``<run>/checkpoints/*.ckpt``), else the resolved config the module saved
in the checkpoint (``hyper_parameters``). So later edits to ``conf/`` do not change what is
evaluated. Checkpoints are read with ``weights_only=True`` and a saved config may only name
allow-listed ``_target_``s (:func:`cifar_lab.security.check_targets`). Command-line
overrides apply on top of it:

* they are composed after the training run's own overrides (its ``.hydra/overrides.yaml``),
  so keys of the groups it chose can be set directly (``data.source.test_size=100`` for a
  ``data=synthetic`` run);
* a group choice (``data=imagefolder``, ``trainer=cpu``) replaces that whole node;
* any other change (``data.eval_batch_size=1024``, ``experiment=...``, ``+x=1``, ``~x``)
  changes exactly the keys it changes in ``conf/evaluate.yaml``.

The job writes, in its own run directory (``logs/evaluate/runs/...`` or ``hydra.run.dir``):
``config.yaml`` (the config used), the report files of the configured callbacks
(``classification_report.txt``, ``confusion_matrix.png``, ...), TensorBoard events and
``metrics.json`` with the ``test/*`` metrics.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_lab import builders
from cifar_lab.callbacks.tta import TTACallback
from cifar_lab.config_tree import print_and_save
from cifar_lab.data.splits import DataError
from cifar_lab.schema import ConfigError
from cifar_lab.security import UnsafeConfigError, check_targets

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Keys that belong to the evaluate/predict job itself, never to the training config.
OWN_KEYS = ("ckpt_path", "tta", "task_name")


class EvaluationError(Exception):
    """A problem the user can fix (missing checkpoint, weights that do not fit the model, ...)."""


# Printed as one line and exit status 2 by the command-line entry points (no traceback).
USER_ERRORS = (EvaluationError, ConfigError, DataError)


# ----------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(ckpt_path: Any) -> Path:
    """A .ckpt file, or a training run directory: its best checkpoint, else checkpoints/last.ckpt."""
    if ckpt_path in (None, "", "???"):
        raise EvaluationError("ckpt_path is required: ckpt_path=<checkpoint .ckpt file or training run directory>")
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        best = ""
        metrics_file = path / "metrics.json"
        if metrics_file.is_file():
            try:
                best = json.loads(metrics_file.read_text()).get("best_ckpt") or ""
            except (OSError, ValueError):
                best = ""
        candidates = [Path(best)] if best else []
        candidates.append(path / "checkpoints" / "last.ckpt")
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise EvaluationError(
            f"ckpt_path={ckpt_path}: no checkpoint found in that directory (looked for the best checkpoint "
            f"named in metrics.json and {path / 'checkpoints' / 'last.ckpt'})"
        )
    if not path.is_file():
        raise EvaluationError(f"ckpt_path={ckpt_path}: no such file or directory")
    return path


def _run_dir_guess(ckpt_file: Path) -> Path:
    parent = ckpt_file.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def training_run_dir(ckpt_file: Path) -> Path | None:
    """The run directory the checkpoint came from, if it still holds its ``.hydra/config.yaml``."""
    parent = ckpt_file.resolve().parent
    for candidate in (parent.parent, parent) if parent.name == "checkpoints" else (parent,):
        if (candidate / ".hydra" / "config.yaml").is_file():
            return candidate
    return None


def load_checkpoint(ckpt_file: Path) -> dict[str, Any]:
    """The checkpoint dict on the CPU, read with ``weights_only=True``.

    A file holding anything but tensors and plain values is refused: unpickling it could run code.
    """
    try:
        checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, or objects weights_only refuses
        text = str(err).strip()
        unsupported = [line.strip() for line in text.splitlines() if "Unsupported global" in line]
        if unsupported:
            raise EvaluationError(
                f"refusing to load {ckpt_file}: it holds objects other than tensors and plain values "
                f"({unsupported[0]}); only checkpoints written by cifar-lab can be evaluated"
            ) from None
        cause = err.__cause__ or err.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else type(err).__name__
        raise EvaluationError(
            f"cannot read checkpoint {ckpt_file} ({detail}); it is truncated, corrupted or not a checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise EvaluationError(f"{ckpt_file} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _repoint_paths(node: Any, old: str, new: str) -> Any:
    """Strings that start with the training run directory, pointed at ``new`` instead."""
    if isinstance(node, dict):
        return {k: _repoint_paths(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_repoint_paths(v, old, new) for v in node]
    if isinstance(node, str) and old and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old):]
    return node


def _check_targets(cfg: Any, origin: str) -> None:
    """A saved config is code (Hydra builds its ``_target_``s): only the allow-listed ones pass."""
    try:
        check_targets(cfg, origin=origin)
    except UnsafeConfigError as err:
        raise EvaluationError(str(err)) from None


def training_config(ckpt_file: Path, checkpoint: dict[str, Any]) -> tuple[DictConfig, str]:
    """The config the checkpoint was trained with, and where it was found."""
    run_dir = training_run_dir(ckpt_file)
    if run_dir is not None:
        path = run_dir / ".hydra" / "config.yaml"
        cfg = OmegaConf.load(path)
        if isinstance(cfg, DictConfig) and "model" in cfg:
            _check_targets(cfg, str(path))
            return cfg, str(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, dict) or "model" not in hparams or "data" not in hparams:
        raise EvaluationError(
            f"{ckpt_file}: no training config found; the checkpoint's hyper_parameters hold no run config and "
            "there is no .hydra/config.yaml in its run directory"
        )
    _check_targets(hparams, f"{ckpt_file} (hyper_parameters)")
    hparams = dict(hparams)
    old_dir = str((hparams.get("paths") or {}).get("output_dir") or "")
    # The stored config is resolved: paths inside the old run directory follow this job's directory.
    hparams = _repoint_paths(hparams, old_dir, "${paths.output_dir}")
    cfg = OmegaConf.create(hparams)
    OmegaConf.update(cfg, "paths.output_dir", "${hydra:runtime.output_dir}", force_add=True)
    return cfg, f"{ckpt_file} (hyper_parameters)"


def load_network_weights(net: torch.nn.Module, checkpoint: dict[str, Any], ckpt_file: Path | str) -> None:
    """Copy the checkpoint's ``net.*`` weights into ``net`` (works whether training compiled it or not)."""
    state = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    if not state:
        raise EvaluationError(f"{ckpt_file}: the state_dict has no 'net.*' weights; is it a cifar_lab checkpoint?")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(str(err).split())
        raise EvaluationError(
            f"{ckpt_file}: the weights do not fit the configured model {type(net).__name__} ({detail[:500]}). "
            "Evaluate with the model config the checkpoint was trained with"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:5]) + (" ..." if len(result.missing_keys) > 5 else "")
        unexpected = ", ".join(result.unexpected_keys[:5]) + (" ..." if len(result.unexpected_keys) > 5 else "")
        raise EvaluationError(
            f"{ckpt_file}: the weights do not fit the configured model {type(net).__name__} "
            f"(missing: {missing or '-'}; unexpected: {unexpected or '-'}). Evaluate with the model config "
            "the checkpoint was trained with"
        )


# ----------------------------------------------------------------------------- config merging


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for a plain container; lists count as leaves."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _first_missing(plain: dict[str, Any], key: str) -> str:
    """The shortest prefix of the dotted ``key`` that ``plain`` lacks (what an override deleted)."""
    node: Any = plain
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            return ".".join(parts[: i + 1])
        node = node[part]
    return key


def _is_own(key: str) -> bool:
    return key.split(".")[0] in OWN_KEYS or key.split(".")[0] == "hydra"


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def apply_overrides(base: DictConfig, composed: DictConfig, default: DictConfig, overrides: Sequence[str],
                    conf_dir: Path = CONF_DIR) -> DictConfig:
    """``base`` with the changes the ``overrides`` made to ``default`` (giving ``composed``).

    A group choice (``data=imagefolder``) replaces the whole node; every other change is
    carried over key by key. The job's own keys (``ckpt_path``, ``tta``, ``task_name``) come
    from ``composed``.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=False))
    OmegaConf.set_struct(cfg, False)
    composed_plain = OmegaConf.to_container(composed, resolve=False)
    replaced: list[str] = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if _is_own(key) or override.is_delete() or "." in key or override.package:
            continue
        if (conf_dir / key).is_dir() and key in composed_plain:
            cfg[key] = composed_plain[key]
            replaced.append(key)
    new = _leaves({k: v for k, v in composed_plain.items() if k != "hydra"})
    old = _leaves({k: v for k, v in OmegaConf.to_container(default, resolve=False).items() if k != "hydra"})
    for key, value in new.items():
        if _is_own(key) or _under(key, replaced):
            continue
        if key not in old or old[key] != value:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    removed = {_first_missing(composed_plain, key) for key in old.keys() - new.keys()}
    for key in sorted(removed, key=len):
        if _is_own(key) or _under(key, replaced):
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if isinstance(parent, DictConfig) and name in parent:
            del parent[name]
    for key in OWN_KEYS:
        if key in composed_plain:
            cfg[key] = composed_plain[key]
    return cfg


def _key(override: str) -> str:
    """The key (or group) an override string sets: ``+data.x=1`` -> ``data.x``."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def training_overrides(ckpt_path: Any, overrides: Sequence[str]) -> list[str]:
    """The command-line overrides of the checkpoint's training run (``.hydra/overrides.yaml``).

    Composing them before the user's overrides makes the user's keys valid where the training
    run's groups define them (``data.source.test_size`` for ``data=synthetic``). Left out:
    Hydra's and the job's own keys, ``hparams_search`` (a sweeper), and keys below a group the
    user chooses again or deletes (they would not fit the new choice).
    """
    try:
        ckpt_file = resolve_checkpoint(ckpt_path)
    except EvaluationError:
        return []
    run_dir = training_run_dir(ckpt_file)
    path = run_dir / ".hydra" / "overrides.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    try:
        saved = [str(o) for o in OmegaConf.load(path)]
        parser = OverridesParser.create()
        user = parser.parse_overrides(list(overrides))
        parsed = parser.parse_overrides(saved)
    except Exception:  # noqa: BLE001 - an unreadable file only loses the convenience
        return []
    rechosen = [o.key_or_group for o in user if o.is_delete() or "." not in o.key_or_group]
    kept = []
    for text, override in zip(saved, parsed):
        key = override.key_or_group
        if _is_own(key) or key.split(".")[0] == "hparams_search":
            continue
        if any(key != group and _under(key, [group]) for group in rechosen):
            continue
        kept.append(text)
    return kept


def _ckpt_argument(overrides: Sequence[str]) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and _key(o) == "ckpt_path"]
    return values[-1] if values else None


def _compose_default(overrides: Sequence[str], injected: Sequence[str] = ()) -> DictConfig:
    """The app's config with the training run's overrides and the job's own ones, without the user's."""
    name = "evaluate"
    try:
        name = HydraConfig.get().job.config_name or name
    except ValueError:
        pass
    own = [o for o in overrides if _is_own(_key(o))]
    return compose(name, overrides=[*injected, *own])


def evaluation_config(composed: DictConfig, overrides: Sequence[str], injected: Sequence[str] = ()
                      ) -> tuple[DictConfig, Path, dict[str, Any], str]:
    """The config to evaluate with, the checkpoint file, its contents and where the config came from.

    ``overrides`` are the user's; ``injected`` the training run's, composed before them.
    """
    ckpt_file = resolve_checkpoint(OmegaConf.select(composed, "ckpt_path", throw_on_missing=False))
    checkpoint = load_checkpoint(ckpt_file)
    base, source = training_config(ckpt_file, checkpoint)
    default = _compose_default(overrides, injected)
    cfg = apply_overrides(base, composed, default, overrides)
    cfg.ckpt_path = str(ckpt_file)
    return cfg, ckpt_file, checkpoint, source


# ----------------------------------------------------------------------------- evaluation


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v)
            for k, v in sorted(metrics.items()) if k.startswith(prefix)}


def _training_summary(ckpt_file: Path) -> dict[str, Any]:
    run_dir = training_run_dir(ckpt_file) or _run_dir_guess(ckpt_file)
    if not (run_dir / "metrics.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def evaluate(cfg: DictConfig, ckpt_file: Path, checkpoint: dict[str, Any], config_source: str = "") -> dict[str, Any]:
    """Test the checkpoint's weights with ``cfg``; write reports and metrics.json in the run directory."""
    start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:
        print_and_save(cfg, run_dir)
        log.info("evaluating %s with the config from %s", ckpt_file, config_source)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = builders.build_datamodule(cfg)
    if rank_zero_only.rank == 0:
        datamodule.prepare_data()
    module = builders.build_module(cfg)
    load_network_weights(module.net, checkpoint, ckpt_file)
    callbacks = builders.build_callbacks(cfg)
    tta = cfg.get("tta") or {}
    if tta.get("enabled", False):
        callbacks.append(TTACallback(flip=bool(tta.get("flip", True)), translate=int(tta.get("translate", 0)),
                                     padding_mode=str(tta.get("padding_mode", "reflect")), stages=("test",)))
    loggers = builders.build_loggers(cfg)
    trainer = builders.build_trainer(cfg, callbacks, loggers)
    trainer.test(module, datamodule=datamodule)

    trained = _training_summary(ckpt_file)
    summary = {
        "task": "evaluate",
        "run_dir": str(run_dir),
        "ckpt_path": str(ckpt_file),
        "train_run_dir": str(trained.get("run_dir") or training_run_dir(ckpt_file) or ""),
        "config_source": config_source,
        "model": trained.get("model") or str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1],
        "choices": trained.get("choices", {}),
        "params": sum(p.numel() for p in module.net.parameters() if p.requires_grad),
        "epochs": int(checkpoint.get("epoch", -1)) + 1,
        "global_step": int(checkpoint.get("global_step", 0)),
        "seed": cfg.seed,
        "tta": OmegaConf.to_container(cfg.tta, resolve=True) if tta.get("enabled", False) else None,
        "metrics": _scalars(trainer.callback_metrics, "test/"),
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        print(f"Run directory: {run_dir}")
    return summary


@contextmanager
def _hydra_context(config_name: str, overrides: Sequence[str], output_dir: Path) -> Iterator[DictConfig]:
    """Compose like the CLI would, outside a Hydra app (tests, notebooks)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
            cfg.hydra.job.config_name = config_name
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        yield cfg
    GlobalHydra.instance().clear()


def _composes(overrides: Sequence[str]) -> bool:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose("evaluate", overrides=list(overrides))
        return True
    except Exception:  # noqa: BLE001 - whatever fails here fails again, reported, in the real run
        return False
    finally:
        GlobalHydra.instance().clear()


def with_training_overrides(overrides: Sequence[str]) -> list[str]:
    """The training run's overrides (when they still compose) followed by the user's."""
    injected = training_overrides(_ckpt_argument(overrides), overrides)
    if injected and _composes([*injected, *overrides]):
        return injected
    return []


def run(overrides: Sequence[str], output_dir: str | Path) -> dict[str, Any]:
    """In-process ``python -m cifar_lab.evaluate <overrides>`` with its run directory at ``output_dir``."""
    injected = with_training_overrides(overrides)
    with _hydra_context("evaluate", [*injected, *overrides], Path(output_dir)) as composed:
        cfg, ckpt_file, checkpoint, source = evaluation_config(composed, overrides, injected)
        return evaluate(cfg, ckpt_file, checkpoint, source)


_INJECTED: list[str] = []  # the training run's overrides that cli() put before the user's


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(composed: DictConfig) -> float | None:
    try:
        task = list(HydraConfig.get().overrides.task)
        injected = _INJECTED if task[: len(_INJECTED)] == _INJECTED else []
        cfg, ckpt_file, checkpoint, source = evaluation_config(composed, task[len(injected):], injected)
        summary = evaluate(cfg, ckpt_file, checkpoint, source)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return summary["metrics"].get("test/acc")


def cli() -> None:
    """``python -m cifar_lab.evaluate``: the training run's overrides go first on the command line."""
    args = sys.argv[1:]
    first = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    _INJECTED[:] = with_training_overrides([a for a in args if "=" in a and not a.startswith("-")])
    sys.argv[1:] = [*args[:first], *_INJECTED, *args[first:]]
    main()


if __name__ == "__main__":
    cli()
