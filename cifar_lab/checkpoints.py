"""Checkpoints and run directories: find, load safely, trust, and check before a resume.

A **run directory** is what ``train.py`` leaves: ``.hydra/`` (the composed config and the
command-line overrides), ``checkpoints/`` (``last.ckpt`` and the best by ``val/acc``) and
``metrics.json`` (which names the best checkpoint). Every command resolves one the same way:

* to **resume** (``train.py ckpt_path=...``): ``last`` means this run's own ``last.ckpt``
  (with ``hydra.run.dir=<run dir>``); a run directory means its ``checkpoints/last.ckpt``;
* to **use** the trained model (``evaluate``, ``predict``): a run directory means its best
  checkpoint (named in ``metrics.json``), else ``checkpoints/last.ckpt``.

Checkpoints are read with ``weights_only=True`` (tensors and plain values only: unpickling
anything else could run code), and the run config saved in them (``hyper_parameters``) or
next to them (``.hydra/config.yaml``) is data: it goes through :mod:`cifar_lab.config.saved`
(plain containers, no interpolation, allow-listed ``_target_``s) before anything is built from it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf

from cifar_lab.config.saved import checked_config, load_yaml
from cifar_lab.errors import CheckpointError, UnsafeConfigError

log = logging.getLogger(__name__)

__all__ = [
    "OVERRIDES_KEY",
    "CLASS_NAMES_KEY",
    "Resume",
    "resolve",
    "load",
    "run_dir_of_checkpoint",
    "saved_config",
    "saved_overrides",
    "load_network_weights",
    "check_resume_compatible",
    "prepare_resume",
    "trained_epochs",
    "load_weights_from",
]

# Extra entries cifar-lab writes into every checkpoint next to Lightning's own.
OVERRIDES_KEY = "overrides"       # the training command's overrides, replayed by evaluate/predict
CLASS_NAMES_KEY = "class_names"   # the class names, for predict's CSV

# Where a checkpoint's saved config must equal the current one for a resume to be allowed:
# the network (its state dict), the classes, the optimizer and scheduler types (their
# state dicts) and the parameter grouping. Runtime options (module.memory_format,
# module.compile) may change freely: they do not change the weights.
RESUME_MUST_MATCH = ("model", "data.num_classes", "optimizer._target_", "scheduler.scheduler._target_",
                     "module.no_decay_norm_and_bias")
# Values a resume takes from the checkpoint, whatever the config now says.
RESUME_RESTORED = ("optimizer", "scheduler")
# Values that may change, but then the run no longer matches an uninterrupted one.
# Keys earlier versions kept in the model config (runtime options, now module.*): ignored when
# comparing a checkpoint's network with the current one.
LEGACY_MODEL_KEYS = ("channels_last", "compile", "compile_mode")
RESUME_CHANGES_RESULT = ("seed", "data.batch_size", "data.augment", "data.mixing", "data.val_size", "data.folds", "data.fold",
                         "data.source",
                         "data.pipeline", "module.label_smoothing", "trainer.precision",
                         "trainer.accumulate_grad_batches", "trainer.gradient_clip_val")


# ----------------------------------------------------------------------------- finding
def _best_recorded(run_dir: Path) -> Path | None:
    """The best checkpoint named in the run's metrics.json, inside this run directory.

    The path is relative to the run directory. An absolute one (written by older versions)
    is taken as its place inside this directory when the run was copied or moved, so a copy
    never uses the original's files.
    """
    try:
        best = json.loads((run_dir / "metrics.json").read_text()).get("best_ckpt") or ""
    except (OSError, ValueError, AttributeError):
        return None
    if not best:
        return None
    recorded = Path(best)
    if not recorded.is_absolute():
        candidate = run_dir / recorded
    elif recorded.parent.name == "checkpoints":
        candidate = run_dir / "checkpoints" / recorded.name
    else:
        candidate = recorded
    if candidate.is_file():
        return candidate
    log.warning("%s names the best checkpoint %s, which is not in %s; using checkpoints/last.ckpt",
                run_dir / "metrics.json", best, run_dir)
    return None


def resolve(ckpt_path: Any, purpose: Literal["resume", "use"], checkpoint_dir: Path | None = None,
            key: str = "ckpt_path") -> Path | None:
    """The checkpoint file ``ckpt_path`` means for ``purpose`` (see the module docstring).

    ``None``/empty gives ``None`` for a resume (a fresh run) and an error for ``use``.
    Anything that does not exist is a :class:`CheckpointError`, never a silent fresh start.
    """
    if ckpt_path in (None, "", "???"):
        if purpose == "resume":
            return None
        raise CheckpointError(f"{key} is required: {key}=<checkpoint .ckpt file or training run directory>")
    if purpose == "resume" and ckpt_path == "last":
        folder = checkpoint_dir or Path("checkpoints")
        candidates = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        if not candidates and folder.is_dir():
            # killed between its first checkpoint and its first last.ckpt: the newest checkpoint is the state
            candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
            if candidates:
                log.warning("ckpt_path=last: no last.ckpt in %s; resuming from its newest checkpoint, %s", folder,
                            candidates[-1].name)
        if not candidates:
            raise CheckpointError(
                f"ckpt_path=last: no last.ckpt in {folder}. `last` resumes the run directory given with "
                "hydra.run.dir=<run directory>; without it every run gets a new directory. Pass "
                "hydra.run.dir=<the run to resume>, or ckpt_path=<run directory or .ckpt file>"
            )
        return candidates[-1]
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        found = last if purpose == "resume" else (_best_recorded(path) or last)
        if not found.is_file():
            looked = str(last) if purpose == "resume" else f"the best checkpoint named in metrics.json and {last}"
            raise CheckpointError(f"{key}={ckpt_path}: no checkpoint found in that directory (looked for {looked})")
        return found
    if not path.is_file():
        if purpose == "resume":
            raise CheckpointError(
                f"ckpt_path={ckpt_path}: no checkpoint at {path}. Pass a .ckpt file, a run directory holding "
                "checkpoints/last.ckpt, or ckpt_path=last together with hydra.run.dir=<that run directory>"
            )
        raise CheckpointError(f"{key}={ckpt_path}: no such file or directory; give a checkpoint .ckpt file or a "
                              "training run directory")
    return path


def run_dir_of_checkpoint(ckpt_file: Path) -> Path | None:
    """The run directory a checkpoint belongs to, if it still holds its ``.hydra/config.yaml``."""
    parent = Path(ckpt_file).resolve().parent
    for candidate in (parent.parent, parent) if parent.name == "checkpoints" else (parent,):
        if (candidate / ".hydra" / "config.yaml").is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------- loading
def load(ckpt_file: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict on the CPU, read with ``weights_only=True`` (no code can run)."""
    try:
        checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, or objects weights_only refuses
        text = str(err).strip()
        # torch names a refused object "Unsupported global: ..." or "unsupported GLOBAL ... is blocked"
        unsupported = [line.strip() for line in text.splitlines() if "unsupported global" in line.lower()]
        if unsupported:
            reason = unsupported[0]
            raise CheckpointError(
                f"refusing to load {ckpt_file}: it holds objects other than tensors and plain values "
                f"({reason}); only checkpoints written by cifar-lab can be used"
            ) from None
        cause = err.__cause__ or err.__context__
        reason = str(cause if cause is not None else err).strip().split(". ")[0]
        detail = f"{type(cause if cause is not None else err).__name__}: {reason}"
        raise CheckpointError(
            f"cannot read checkpoint {ckpt_file} ({detail}); the file is truncated or corrupted, or not a "
            "checkpoint: use another one (checkpoints/epoch_*.ckpt or last.ckpt)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{ckpt_file} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def saved_config(ckpt_file: Path, checkpoint: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The run config a checkpoint was trained with, as checked plain data, and where it came from.

    The checkpoint's own ``hyper_parameters`` (what the weights were built with); a checkpoint
    without it falls back to its run directory's ``.hydra/config.yaml``. Either goes through
    :func:`cifar_lab.config.saved.checked_config` (no interpolation, allow-listed targets).
    """
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and "model" in hparams:
        origin = f"{ckpt_file} (hyper_parameters)"
        # resolved when saved: the data node is as plain as the network (a lone checkpoint is rebuilt from both)
        return checked_config(hparams, origin, built=("model", "data")), origin
    run_dir = run_dir_of_checkpoint(ckpt_file)
    if run_dir is not None:
        path = run_dir / ".hydra" / "config.yaml"
        cfg = load_yaml(path)
        if isinstance(cfg, dict) and "model" in cfg:
            return checked_config(cfg, str(path)), str(path)
    raise CheckpointError(
        f"{ckpt_file}: no training config found; the checkpoint's hyper_parameters hold no run config and "
        "there is no .hydra/config.yaml in its run directory"
    )


def saved_overrides(ckpt_file: Path, checkpoint: dict[str, Any]) -> tuple[list[str] | None, str]:
    """The training command's overrides and where they were found.

    Its run directory's ``.hydra/overrides.yaml``, else the copy stored in the checkpoint;
    ``(None, "")`` when neither has them (an older checkpoint moved away from its run). What of
    them is replayed is decided by :func:`cifar_lab.config.compose.replayable`.
    """
    run_dir = run_dir_of_checkpoint(ckpt_file)
    path = run_dir / ".hydra" / "overrides.yaml" if run_dir is not None else None
    if path is not None and path.is_file():
        loaded = load_yaml(path)
        if not isinstance(loaded, list) or not all(isinstance(o, str) for o in loaded):
            raise UnsafeConfigError(f"{path}: a run's overrides must be a list of strings")
        return list(loaded), str(path)
    stored = checkpoint.get(OVERRIDES_KEY)
    if isinstance(stored, list) and all(isinstance(o, str) for o in stored):
        return list(stored), f"{ckpt_file} (stored overrides)"
    return None, ""


def load_network_weights(net: torch.nn.Module, checkpoint: dict[str, Any], ckpt_file: Path | str) -> None:
    """Copy the checkpoint's ``net.*`` weights into ``net``."""
    state = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    if not state:
        raise CheckpointError(f"{ckpt_file}: the state_dict has no 'net.*' weights; is it a cifar_lab checkpoint?")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(str(err).split())
        raise CheckpointError(
            f"{ckpt_file}: the weights do not fit the configured model {type(net).__name__} ({detail[:500]}). "
            "Use the model config the checkpoint was trained with"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:5]) + (" ..." if len(result.missing_keys) > 5 else "")
        unexpected = ", ".join(result.unexpected_keys[:5]) + (" ..." if len(result.unexpected_keys) > 5 else "")
        raise CheckpointError(
            f"{ckpt_file}: the weights do not fit the configured model {type(net).__name__} "
            f"(missing: {missing or '-'}; unexpected: {unexpected or '-'}). Use the model config "
            "the checkpoint was trained with"
        )


# ----------------------------------------------------------------------------- resuming
def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    """``{"prefix.a.b": value}`` for a plain nested dict (an empty dict is one leaf)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}.{key}"))
        return out or {prefix: {}}
    return {prefix: node}


def _differences(saved: DictConfig, current: DictConfig, keys: tuple[str, ...], skip: tuple[str, ...] = ()
                 ) -> list[str]:
    lines = []
    for key in keys:
        old, new = (_leaves(_plain(OmegaConf.select(c, key, default=None)), key) for c in (saved, current))
        for name in sorted(set(old) | set(new)):
            if name.rsplit(".", 1)[-1] in skip or old.get(name) == new.get(name):
                continue
            lines.append(f"{name}: {old.get(name)!r} in the checkpoint, {new.get(name)!r} now")
    return lines


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_resume_compatible(saved: dict[str, Any], cfg: DictConfig, path: str | Path) -> list[str]:
    """Refuse a checkpoint trained with another network, classes, optimizer or scheduler type.

    Returns warnings for values the resume takes from the checkpoint (optimizer and
    scheduler settings) or that make the result differ from an uninterrupted run.
    """
    saved_cfg = OmegaConf.create(saved)
    mismatched = _differences(saved_cfg, cfg, RESUME_MUST_MATCH, skip=LEGACY_MODEL_KEYS)
    if mismatched:
        shown = "\n".join(f"  - {line}" for line in mismatched[:8])
        more = f"\n  - ... and {len(mismatched) - 8} more" if len(mismatched) > 8 else ""
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with a different setup:\n{shown}{more}\n"
            "Resume with the overrides that run used (its config.yaml is next to checkpoints/), or start a "
            "new run without ckpt_path"
        )
    skip_restored = tuple(k.split(".")[-1] for k in RESUME_MUST_MATCH)
    warnings = [f"{line} (the checkpoint's value is restored)"
                for line in _differences(saved_cfg, cfg, RESUME_RESTORED, skip=skip_restored)]
    warnings += [f"{line} (the resumed run will differ from an uninterrupted one)"
                 for line in _differences(saved_cfg, cfg, RESUME_CHANGES_RESULT)]
    return warnings


@dataclass
class Resume:
    """A checked checkpoint to resume from, with the warnings the check produced."""

    path: str
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the run config saved in the checkpoint


def prepare_resume(cfg: DictConfig, checkpoint_dir: Path) -> Resume | None:
    """Resolve ``ckpt_path`` for a resume and check the checkpoint before anything is built."""
    path = resolve(cfg.get("ckpt_path"), "resume", checkpoint_dir)
    if path is None:
        return None
    checkpoint = load(path, mmap=True)
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, dict) or "model" not in saved:
        raise CheckpointError(f"{path} holds no cifar-lab run config (hyper_parameters), so it cannot be checked "
                              "against this run; resume only from checkpoints written by train.py")
    saved = checked_config(saved, str(path), built=("model", "data"))  # resolved when saved
    warnings = check_resume_compatible(saved, cfg, path)
    if _results_written(Path(path), checkpoint_dir, int(checkpoint.get("global_step", 0))):
        _refuse_finished(checkpoint, cfg, path)
    # else a run killed after its training but before its results (test, reports, metrics.json): the resume
    # trains nothing and finishes it
    return Resume(str(path), warnings, saved)


def _results_written(path: Path, checkpoint_dir: Path, global_step: int) -> bool:
    """Whether the checkpoint's run (or the run resuming into ``checkpoint_dir``) has written the results of
    the training the checkpoint holds: a metrics.json (the last file a run writes) recording its step. An
    earlier segment's metrics.json (a resumed run killed before writing its own) is not those results; an
    unreadable one is taken as written (the refusal then says what to do)."""
    for folder in (path.parent, Path(checkpoint_dir)):
        metrics = folder.parent / "metrics.json"
        if not metrics.is_file():
            continue
        try:
            recorded = json.loads(metrics.read_text()).get("global_step")
        except (OSError, ValueError, AttributeError):
            return True
        if not isinstance(recorded, int) or recorded >= global_step:
            return True
    return False


def trained_epochs(checkpoint: dict[str, Any]) -> int:
    """Epochs whose training the checkpoint has finished (Lightning's fit-loop progress)."""
    progress = (checkpoint.get("loops") or {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", checkpoint.get("epoch", 0)))


def _refuse_finished(checkpoint: dict[str, Any], cfg: DictConfig, path: str | Path) -> None:
    """A run that already reached ``trainer.max_epochs`` (or ``max_steps``) has nothing left to resume."""
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    epochs, steps = trained_epochs(checkpoint), int(checkpoint.get("global_step", 0))
    done_epochs = isinstance(max_epochs, int) and max_epochs >= 0 and epochs >= max_epochs
    done_steps = isinstance(max_steps, int) and max_steps > 0 and steps >= max_steps
    if done_epochs or done_steps:
        limit = f"trainer.max_epochs={max_epochs}" if done_epochs else f"trainer.max_steps={max_steps}"
        raise CheckpointError(
            f"{path} is a finished run: it trained {epochs} epochs ({steps} steps), which {limit} allows, so there "
            f"is nothing to resume. To train it further, resume with a larger limit (e.g. trainer.max_epochs="
            f"{max(epochs, 0) + 10}); to fine-tune from its weights in a new run with a fresh optimizer and "
            f"schedule, pass init_from={path} instead of ckpt_path"
        )


def load_weights_from(ckpt_path: Any, net: torch.nn.Module, cfg: DictConfig) -> Path:
    """``init_from``: copy a checkpoint's network weights into ``net`` (nothing else: a fresh run).

    The checkpoint's network config must match this run's (as for a resume); a run
    directory means its best checkpoint.
    """
    path = resolve(ckpt_path, "use", key="init_from")
    assert path is not None
    checkpoint = load(path, mmap=True)
    saved, origin = saved_config(path, checkpoint)
    mismatched = _differences(OmegaConf.create(saved), cfg, ("model", "data.num_classes"), skip=LEGACY_MODEL_KEYS)
    if mismatched:
        shown = "\n".join(f"  - {line}" for line in mismatched[:8])
        raise CheckpointError(f"init_from={ckpt_path}: its network differs from this run's:\n{shown}\n"
                              "Start from a checkpoint of the same model, or use that run's model overrides")
    load_network_weights(net, checkpoint, path)
    log.info("initialised the network from %s (weights only)", path)
    return path
