"""What a config read back from a checkpoint or a run directory may build.

Hydra builds whatever a ``_target_`` names, with the arguments next to it, so a config from
outside (a downloaded checkpoint's ``hyper_parameters``, a shared run directory's
``config.yaml``, the overrides replayed from either) is code. :func:`check_targets` admits
only an explicit allow-list, what cifar-lab configs actually build:

* every ``_target_`` named in the shipped config tree (``conf/**/*.yaml``);
* torch optimizers (classes in ``torch.optim`` that subclass ``torch.optim.Optimizer``) and
  LR schedulers (classes in ``torch.optim.lr_scheduler`` that subclass ``LRScheduler`` or
  ``ReduceLROnPlateau``);
* ``torch.nn`` layers (subclasses of ``torch.nn.Module`` defined in ``torch.nn.modules``);
* Lightning callbacks (``Callback`` subclasses in ``lightning.pytorch.callbacks``), loggers
  (``Logger`` subclasses in ``lightning.pytorch.loggers``) and ``lightning.pytorch.Trainer``;
* cifar-lab's own classes and factory functions in ``cifar_lab.models``, ``cifar_lab.data``
  (not ``cifar_lab.data.cache``), ``cifar_lab.optim`` and ``cifar_lab.module``, its classes in
  ``cifar_lab.callbacks`` (the functions there render and save figures) and
  ``cifar_lab.sweeps.report.SweepReport``;
* classes and functions of the packages you name yourself, comma-separated, in the
  environment variable ``CIFAR_LAB_TRUSTED_PACKAGES`` (e.g. ``CIFAR_LAB_TRUSTED_PACKAGES=mylab``),
  for configs that build your own code; set it only for files you trust.

Everything else is refused, in particular whatever in those libraries loads native code,
unpickles, exports or writes files (``torch.load``, ``torch.classes``,
``torch.cuda.memory.CUDAPluggableAllocator``, ``torch.utils.tensorboard.SummaryWriter``,
``torch.onnx.export``, ...). Call it before instantiating anything from such a config::

    from cifar_lab.config.trust import check_targets
    check_targets(cfg, origin=str(ckpt_path))   # raises UnsafeConfigError

A name is resolved the way Hydra resolves it (import the first part, then attribute access,
importing a submodule where an attribute is missing), without calling anything, and only
when it lies under one of the namespaces above (nothing else is imported). The rule is
applied to the object it resolves to: it must be a public, module-level class or function
whose ``__module__`` the rule admits, so ``torch.os.system`` or
``cifar_lab.models.simple_cnn.torch.load`` (``os.system`` and ``torch.load`` reached through
an admitted name) are refused, as are private names (``_C``, ``__globals__``), modules and
methods. A ``_target_`` written as an interpolation (``${...}``) is refused; other
interpolations are resolved node by node, so a node they create is checked too.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from cifar_lab.errors import UnsafeConfigError

__all__ = ["TRUSTED_ENV", "UnsafeConfigError", "check_targets", "iter_targets", "shipped_targets"]

# Your own packages, comma-separated, e.g. CIFAR_LAB_TRUSTED_PACKAGES=mylab,mylab_extra (the same
# rules apply inside them: public module-level classes and functions that belong to the package).
TRUSTED_ENV = "CIFAR_LAB_TRUSTED_PACKAGES"

# The namespaces the rules below look into: a name outside all of them (and outside the shipped
# targets and the trusted packages) is refused before anything is imported.
_NAMESPACES = (
    "torch.nn",
    "torch.optim",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.Trainer",
    "lightning.Trainer",
    "cifar_lab.models",
    "cifar_lab.data",
    "cifar_lab.callbacks",
    "cifar_lab.optim",
    "cifar_lab.module",
    "cifar_lab.sweeps.report.SweepReport",
)
# cifar-lab modules whose classes and functions may be built, those whose classes only, and
# those excluded (the data cache reads and writes files).
_PROJECT_MODULES = ("cifar_lab.models", "cifar_lab.data", "cifar_lab.optim", "cifar_lab.module")
_PROJECT_CLASS_MODULES = ("cifar_lab.callbacks",)
_PROJECT_EXCLUDED = ("cifar_lab.data.cache",)
_PROJECT_EXTRA = ("cifar_lab.sweeps.report.SweepReport",)  # module.qualname

_MAX_DEPTH = 64  # deeper (or self-referencing) configs are refused


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_dotted_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _trusted_packages() -> tuple[str, ...]:
    extra = (p.strip() for p in os.environ.get(TRUSTED_ENV, "").split(","))
    return tuple(p for p in extra if _is_dotted_name(p) and not any(s.startswith("_") for s in p.split(".")))


@functools.lru_cache(maxsize=None)
def _shipped(conf_dir: str) -> frozenset[str]:
    names: set[str] = set()
    for path in sorted(Path(conf_dir).rglob("*.yaml")):
        try:
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError):
            continue
        for document in documents:
            names.update(t for _, t in iter_targets(document) if isinstance(t, str) and "${" not in t)
    return frozenset(names)


def shipped_targets() -> frozenset[str]:
    """Every ``_target_`` named in the shipped config tree (``conf/**/*.yaml``), read once."""
    from cifar_lab.config import CONF_DIR

    return _shipped(str(CONF_DIR))


# ----------------------------------------------------------------------------- the rules
def _torch_class(cls: type) -> bool:
    module = cls.__module__
    if not _within(module, "torch"):
        return False
    import torch
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    return ((_within(module, "torch.nn.modules") and issubclass(cls, torch.nn.Module))
            or (_within(module, "torch.optim") and issubclass(cls, torch.optim.Optimizer))
            or (_within(module, "torch.optim.lr_scheduler") and issubclass(cls, (LRScheduler, ReduceLROnPlateau))))


def _lightning_class(cls: type) -> bool:
    module = cls.__module__
    if not _within(module, "lightning.pytorch"):
        return False
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    return (cls is Trainer
            or (_within(module, "lightning.pytorch.callbacks") and issubclass(cls, Callback))
            or (_within(module, "lightning.pytorch.loggers") and issubclass(cls, Logger)))


def _project_object(obj: Any) -> bool:
    module = obj.__module__
    if any(_within(module, m) for m in _PROJECT_EXCLUDED):
        return False
    if f"{module}.{obj.__qualname__}" in _PROJECT_EXTRA:
        return True
    if any(_within(module, m) for m in _PROJECT_CLASS_MODULES):
        return inspect.isclass(obj)
    return any(_within(module, m) for m in _PROJECT_MODULES)


def _trusted_object(obj: Any) -> bool:
    return any(_within(obj.__module__, p) for p in _trusted_packages())


_RULES: tuple[Callable[[Any], bool], ...] = (_project_object, _trusted_object)
_CLASS_RULES: tuple[Callable[[type], bool], ...] = (_torch_class, _lightning_class)


def _admitted(obj: Any) -> bool:
    if inspect.isclass(obj) and any(rule(obj) for rule in _CLASS_RULES):
        return True
    return any(rule(obj) for rule in _RULES)


def _module_level(obj: Any) -> bool:
    """A public class or function defined at the top of the module it says it belongs to."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__name__", None)
    if not isinstance(module, str) or not isinstance(name, str) or name.startswith("_"):
        return False
    if getattr(obj, "__qualname__", None) != name:  # a method, a nested or local definition
        return False
    return getattr(sys.modules.get(module), name, None) is obj


def _resolve(target: str) -> Any:
    """The object ``target`` names, found as Hydra's ``_locate`` finds it; nothing is called.

    Raises ``LookupError`` with the reason when it cannot be found, or when the walk passes
    through something other than a module or a class.
    """
    parts = target.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
    except Exception as err:  # noqa: BLE001 - whatever the import raised, Hydra would not build it
        raise LookupError(f"{parts[0]} cannot be imported ({type(err).__name__}: {err})") from None
    for m in range(1, len(parts)):
        path = ".".join(parts[: m + 1])
        if not isinstance(obj, types.ModuleType) and not inspect.isclass(obj):
            raise LookupError(f"{'.'.join(parts[:m])} is neither a module nor a class")
        try:
            obj = getattr(obj, parts[m])
            continue
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                raise LookupError(f"{path} does not exist") from None
        try:
            obj = importlib.import_module(path)
        except Exception as err:  # noqa: BLE001
            raise LookupError(f"{path} does not exist ({type(err).__name__}: {err})") from None
    return obj


def _why_refused(target: Any) -> str | None:
    """None when ``target`` names an admitted class or function; else the reason."""
    if not isinstance(target, str) or not target:
        return "a _target_ must be the dotted name of a class or function"
    if "${" in target:
        return "an interpolated _target_ is not allowed"
    if not _is_dotted_name(target) or any(p.startswith("_") for p in target.split(".")):
        return "private or malformed names are not allowed"
    if target in shipped_targets():
        return None
    namespaces = _NAMESPACES + _trusted_packages()
    if not any(_within(target, ns) for ns in namespaces) or any(_within(target, m) for m in _PROJECT_EXCLUDED):
        return "it is not on the allow-list"
    try:
        obj = _resolve(target)
    except LookupError as err:
        return f"it cannot be resolved: {err}"
    if isinstance(obj, types.ModuleType):
        return "it names a module, not a class or function"
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return "it names neither a class nor a function"
    if not _module_level(obj) or not _admitted(obj):
        owner = getattr(obj, "__module__", None) or "?"
        name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or "?"
        return f"it resolves to {owner}.{name}, which is not on the allow-list"
    return None


# ----------------------------------------------------------------------------- walking a config
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


def _raw(node: DictConfig | ListConfig, key: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False)[key]  # type: ignore[index]


def _node_targets(node: DictConfig | ListConfig, path: str, seen: tuple[int, ...]
                  ) -> Iterator[tuple[str, Any, str | None]]:
    """(key, target, reason it is refused before any look-up, or None) of every ``_target_``.

    Each value is resolved on its own, as instantiating it would resolve it: a node an
    interpolation creates or points to is walked too; a value that cannot be resolved here
    is skipped unless its text could create a node with a ``_target_``.
    """
    if len(seen) > _MAX_DEPTH or id(node) in seen:
        yield path or "<root>", "...", "the config nests too deeply or refers to itself"
        return
    seen = (*seen, id(node))
    try:
        keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    except Exception:  # noqa: BLE001 - a None or missing node: nothing to build
        return
    for key in keys:
        here = f"{path}.{key}" if path else str(key)
        interpolated = OmegaConf.is_interpolation(node, key)  # type: ignore[arg-type]
        if key == "_target_":
            if interpolated:
                yield here, _raw(node, key), "an interpolated _target_ is not allowed"
            else:
                yield here, node[key], None
            continue
        try:
            child = node[key]
        except Exception:  # noqa: BLE001 - missing (???) or unresolvable here
            raw = _raw(node, key) if interpolated else None
            if isinstance(raw, str) and any(w in raw for w in ("_target_", "oc.create", "oc.decode")):
                yield here, raw, "an interpolation that cannot be resolved here could create a node to build"
            continue
        if isinstance(child, (DictConfig, ListConfig)):
            yield from _node_targets(child, here, seen)


def _targets(cfg: Any) -> Iterator[tuple[str, Any, str | None]]:
    if not isinstance(cfg, (DictConfig, ListConfig)):
        try:  # as Hydra's instantiate does with a plain container: its interpolations resolve
            cfg = OmegaConf.create(cfg, flags={"allow_objects": True})
        except Exception:  # noqa: BLE001 - not a config OmegaConf can hold: walk it as it is
            for key, target in iter_targets(cfg):
                yield key, target, None
            return
    yield from _node_targets(cfg, "", ())


def check_targets(cfg: Any, origin: str = "a saved config") -> None:
    """Refuse ``cfg`` (DictConfig or nested dicts) when a ``_target_`` is not on the allow-list.

    Raises :class:`UnsafeConfigError` naming, for each refused target, its key, the target
    and why, and how to opt in to your own package; returns quietly when every target is admitted.
    """
    refused = []
    for key, target, reason in _targets(cfg):
        reason = reason or _why_refused(target)
        if reason:
            refused.append(f"{key}={target}: {reason}")
    if refused:
        lines = "\n".join(f"  - {r}" for r in refused)
        raise UnsafeConfigError(
            f"refusing to build the config from {origin}: a saved config may only build what cifar-lab's "
            "configs build (the targets in conf/, torch.nn layers, torch optimizers and LR schedulers, "
            "Lightning callbacks, loggers and Trainer, cifar-lab's models, data, callbacks and optimizers).\n"
            f"{lines}\n"
            f"(If a target is in your own package and you trust this file, opt in with "
            f"{TRUSTED_ENV}=<package>[,<package>...].)"
        )
