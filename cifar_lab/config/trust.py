"""What a config read back from a checkpoint or a run directory may build.

Hydra builds whatever a ``_target_`` names, with the arguments next to it, so a config from
outside (a downloaded checkpoint's ``hyper_parameters``, a shared run directory's
``config.yaml``) is code. :func:`check_targets` accepts only classes and functions that live
inside ``cifar_lab``, ``torch``, ``torchvision`` and ``lightning`` (plus the packages named in
``CIFAR_LAB_TRUSTED_PACKAGES``), and refuses the known
entry points there that load code, run commands or move files (``torch.hub``,
``torch.load``, ``torch.utils.cpp_extension``, ...). Call it before instantiating anything
from such a config::

    from cifar_lab.config.trust import check_targets
    check_targets(cfg, origin=str(ckpt_path))   # raises UnsafeConfigError

Names are resolved the way Hydra resolves them (import, then attribute access) without
calling anything, and every step must stay inside the allowed packages: ``torch.os.system``
is ``os.system`` reached through ``torch`` and is refused, as is any private name
(``_C``, ``__globals__``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import types
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from cifar_lab.errors import UnsafeConfigError

__all__ = ["ALLOWED_PACKAGES", "DENIED", "UnsafeConfigError", "check_targets", "iter_targets"]

ALLOWED_PACKAGES = ("cifar_lab", "torch", "torchvision", "lightning")

# Inside the allowed packages: what loads or compiles code, runs commands, downloads, or
# reads and writes arbitrary files. A target equal to one of these, or below it, is refused.
DENIED = (
    "torch.hub",
    "torch.load",
    "torch.save",
    "torch.serialization",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch.utils.collect_env",
    "torch.utils.benchmark",
    "torch.utils.model_zoo",
    "torch.ops",
    "torch.classes",
    "torch.jit",
    "torch.library",
    "torch.export.load",
    "torch.export.save",
    "torch.distributed",
    "torch.multiprocessing",
    "torch.backends.cudnn.rnn",
    "torch.testing",
    "torch.from_file",
    "torchvision.datasets",
    "torchvision.io.write_file",
    "torchvision.io.write_png",
    "torchvision.io.write_jpeg",
    "torchvision.io.write_video",
    "torchvision.io.read_file",
    "torchvision.utils.save_image",
    "torchvision.models.get_weight",
    "lightning.fabric.utilities.cloud_io",
    "lightning.pytorch.core.saving",
    "lightning.pytorch.cli",
    "lightning.fabric.cli",
    "lightning.pytorch.utilities.migration",
    "cifar_lab.data.cache",
)
# Attribute names refused anywhere in a target (loading or saving through any class).
DENIED_NAMES = {"load", "load_from_checkpoint", "load_state_dict_from_url", "save", "save_checkpoint",
                "system", "popen", "exec", "eval", "run", "call", "check_call", "check_output", "remove",
                "unlink", "rmtree"}


# Your own packages, comma-separated, e.g. CIFAR_LAB_TRUSTED_PACKAGES=mylab (same rules apply inside them).
TRUSTED_ENV = "CIFAR_LAB_TRUSTED_PACKAGES"


def _allowed_packages() -> tuple[str, ...]:
    extra = [p.strip() for p in os.environ.get(TRUSTED_ENV, "").split(",") if p.strip()]
    return ALLOWED_PACKAGES + tuple(p for p in extra if p.isidentifier())


def _in_allowed(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _allowed_packages())


def _denied(name: str) -> bool:
    return any(name == d or name.startswith(d + ".") for d in DENIED)


def _owner(obj: Any) -> str | None:
    """The module a class, function or module belongs to."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return getattr(obj, "__module__", None)


def _why_refused(target: Any) -> str | None:
    """None when ``target`` names an allowed class or function; else the reason."""
    if not isinstance(target, str) or not target:
        return "a _target_ must be the dotted name of a class or function"
    parts = target.split(".")
    if not _in_allowed(target):
        return f"{parts[0]} is not one of the allowed packages"
    if any(p.startswith("_") or not p.isidentifier() for p in parts):
        return "private or malformed names are not allowed"
    if _denied(target) or DENIED_NAMES & set(parts[1:]):
        return "it can load code, run commands or read and write files"
    try:
        obj: Any = importlib.import_module(parts[0])
    except ImportError as err:
        return f"cannot import {parts[0]} ({err})"
    path = parts[0]
    for part in parts[1:]:
        path = f"{path}.{part}"
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif isinstance(obj, types.ModuleType):
            try:
                obj = importlib.import_module(path)
            except ImportError:
                return f"{path} does not exist"
        else:
            return f"{path} does not exist"
        owner = _owner(obj)
        if isinstance(obj, types.ModuleType) or inspect.isclass(obj) or inspect.isroutine(obj):
            if owner is None or not _in_allowed(owner) or _denied(owner):
                return f"{path} is {owner or 'something'}'s, reached through an allowed package"
        else:
            return f"{path} is not a class, function or module"
    if isinstance(obj, types.ModuleType) or not callable(obj):
        return "it names a module, not a class or function"
    return None


def iter_targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every ``_target_`` in a plain nested config."""
    if isinstance(node, dict):
        for key, child in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield here, child
            else:
                yield from iter_targets(child, here)
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            yield from iter_targets(child, f"{path}.{i}" if path else str(i))


def _plain(cfg: Any) -> Any:
    if not isinstance(cfg, (DictConfig, ListConfig)):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - unresolvable interpolations: check the raw text instead
        return OmegaConf.to_container(cfg, resolve=False)


def check_targets(cfg: Any, origin: str = "a saved config") -> None:
    """Refuse ``cfg`` (DictConfig or nested dicts) when a ``_target_`` is outside the allow-list.

    Raises :class:`UnsafeConfigError` naming the key, the target and why; returns quietly
    when every target is allowed.
    """
    refused = []
    for key, target in iter_targets(_plain(cfg)):
        if isinstance(target, str) and "${" in target:
            refused.append(f"{key}={target}: an interpolated _target_ is not allowed")
            continue
        reason = _why_refused(target)
        if reason:
            refused.append(f"{key}={target}: {reason}")
    if refused:
        packages = _allowed_packages()
        allowed = ", ".join(packages[:-1]) + " and " + packages[-1]
        lines = "\n".join(f"  - {r}" for r in refused)
        raise UnsafeConfigError(
            f"refusing to build the config from {origin}: only classes and functions inside {allowed} "
            f"may be built from a saved config, and not those that load code or touch files.\n{lines}\n"
            f"(If it is your own package and you trust this file: {TRUSTED_ENV}=<package>.)"
        )
