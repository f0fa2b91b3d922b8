"""Saved state is data: one path from the bytes of a run's files to the containers that are built.

THE RULE. Everything a command reads back from a run (a checkpoint's ``hyper_parameters``, a
run directory's ``.hydra/*.yaml`` and ``config.yaml``, the overrides stored in either) goes
through this module before anything uses it:

1. It is read into plain Python containers once: YAML with :func:`load_yaml` (at most
   :data:`MAX_YAML_BYTES`, no anchors or aliases, no tags), a checkpoint with
   ``torch.load(weights_only=True)``; anything other than dicts, lists, strings, numbers,
   booleans and None is refused.
2. ``${...}`` in saved data never reaches OmegaConf. A value that is exactly a node reference
   (``${data.num_classes}``) or holds references inline is resolved here, against the same
   file, as plain copies (Hydra writes ``.hydra/config.yaml`` unresolved); any other
   interpolation (a resolver such as ``${oc.env:...}``, ``${oc.create:...}``,
   ``${hydra:...}``, a relative or self reference) is refused with the key that holds it
   (:func:`plain_config`). So nothing in a saved file can create a node, read the
   environment or change meaning after it was checked.
3. The ``_target_``s of the resulting container are checked
   (:func:`cifar_lab.config.trust.check_targets`) and that container, never a re-read or
   re-resolved copy, is what the command builds from.

Which saved overrides are replayed (only those that define the network and the data) is
:data:`cifar_lab.config.compose.REPLAYED`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from cifar_lab.config.trust import check_targets
from cifar_lab.errors import UnsafeConfigError

__all__ = ["MAX_YAML_BYTES", "load_yaml", "plain_config", "checked_config"]

# Run-directory YAML files are a few KB (a composed config is about 10 KB); a larger one is not ours.
MAX_YAML_BYTES = 1_000_000
_MAX_DEPTH = 64
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases (a 1 KB file of nested aliases expands without bound)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401 - yaml hook
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            event = self.peek_event()
            raise yaml.YAMLError(f"anchors and aliases are not allowed (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def load_yaml(path: str | Path) -> Any:
    """The plain content of a YAML file from a run directory, read with limits.

    Raises :class:`UnsafeConfigError` for a file over :data:`MAX_YAML_BYTES`, one using anchors or
    aliases, or one that is not valid YAML; ``OSError`` when it cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise UnsafeConfigError(f"{path} is over {MAX_YAML_BYTES:,} bytes, far larger than any file cifar-lab "
                                "writes; refusing to read it (use the run's own, unmodified files)")
    try:
        # safe: _NoAliasLoader is yaml.SafeLoader (plain types only, no tags that build objects) without aliases
        return yaml.load(raw.decode("utf-8", errors="replace"), Loader=_NoAliasLoader)  # noqa: S506
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())[:200]
        raise UnsafeConfigError(f"{path} cannot be read as a saved config ({first}); use the run's own, "
                                "unmodified files") from None


def _lookup(root: Any, dotted: str) -> Any:
    node = root
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def plain_config(value: Any, origin: str, root: Any = None, strict: tuple[str, ...] | None = None) -> Any:
    """``value`` (from ``origin``) as plain containers with its node references resolved (rule 2).

    ``root`` is what references resolve against (default: ``value`` itself). ``strict`` names the
    top-level keys where a refused interpolation is an error (default: all); elsewhere (keys that
    are only read as information, such as a ``.hydra/config.yaml``'s ``paths``) it becomes None.
    """
    root = value if root is None else root

    def walk(node: Any, key: str, depth: int, chain: tuple[str, ...], hard: bool) -> Any:
        if depth > _MAX_DEPTH:
            raise UnsafeConfigError(f"{origin}: {key or '<root>'} nests more than {_MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise UnsafeConfigError(f"{origin}: {key}: a key of type {type(k).__name__} is not plain data")
                here = f"{key}.{k}" if key else str(k)
                out[k] = walk(v, here, depth + 1, chain, hard or (not key and (strict is None or k in strict)))
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}.{i}" if key else str(i), depth + 1, chain, hard) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            try:
                return resolve_text(node, key, depth, chain, hard)
            except UnsafeConfigError:
                if hard:
                    raise
                return None
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise UnsafeConfigError(f"{origin}: {key}: a value of type {type(node).__name__} is not plain data")

    def resolve_text(text: str, key: str, depth: int, chain: tuple[str, ...], hard: bool) -> Any:
        whole = _REFERENCE.fullmatch(text)
        if "${" in _REFERENCE.sub("", text) or "\\$" in text:
            raise UnsafeConfigError(
                f"{origin}: {key}={text!r}: saved configs may only refer to other keys of the same file "
                "(${a.b}); resolvers and other interpolations are refused. Use the run's own, unmodified files")

        def target(ref: str) -> Any:
            if ref in chain:
                raise UnsafeConfigError(f"{origin}: {key}={text!r} refers to itself (via {' -> '.join(chain)})")
            try:
                found = _lookup(root, ref)
            except KeyError:
                raise UnsafeConfigError(f"{origin}: {key}={text!r} refers to {ref}, which the file does not "
                                        "hold") from None
            return walk(found, ref, depth + 1, (*chain, ref), hard)

        if whole:
            return target(whole.group(1))
        pieces = []
        for ref_match in _REFERENCE.finditer(text):
            found = target(ref_match.group(1))
            if isinstance(found, (dict, list)) or (found is not None and "${" in str(found)):
                raise UnsafeConfigError(f"{origin}: {key}={text!r} puts a whole node inside a string")
            pieces.append(found)
        values = iter(pieces)
        return _REFERENCE.sub(lambda _: str(next(values)), text)

    return walk(value, "", 0, (), strict is None)


def checked_config(saved: Any, origin: str, built: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """A saved run config as plain data (rule 2) with its ``_target_``s checked (rule 3).

    ``built`` are the top-level keys a command may build from: an interpolation there is refused;
    elsewhere (information only) it reads as None.
    """
    if not isinstance(saved, dict):
        raise UnsafeConfigError(f"{origin}: a saved run config must be a mapping, not {type(saved).__name__}")
    config = plain_config(saved, origin, strict=built)
    check_targets(config, origin=origin)
    return config
