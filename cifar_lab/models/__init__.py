"""Networks of the model zoo: plain ``nn.Module``s mapping ``(B, 3, H, W)`` images to logits.

``build_network(cfg)`` turns a composed ``model`` config (``conf/model/*.yaml``)
into a network: it drops the runtime keys in ``RUNTIME_KEYS`` (consumed by the
training module) and instantiates ``_target_`` with the remaining keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

RUNTIME_KEYS: tuple[str, ...] = ("channels_last", "compile", "compile_mode")

__all__ = ["RUNTIME_KEYS", "build_network"]


def build_network(model_cfg: Any) -> nn.Module:
    """Instantiate the network described by ``model_cfg`` (DictConfig or mapping).

    Interpolations (``${data.num_classes}``) are resolved against the config's
    root, runtime keys are dropped, and the rest is passed to
    ``hydra.utils.instantiate`` with ``_convert_="all"`` (constructors get
    plain lists and dicts).
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if isinstance(model_cfg, DictConfig):
        cfg = OmegaConf.to_container(model_cfg, resolve=True)
    elif isinstance(model_cfg, Mapping):
        cfg = dict(model_cfg)
    else:
        raise TypeError(f"model_cfg must be a DictConfig or a mapping, got {type(model_cfg).__name__}")
    for key in RUNTIME_KEYS:
        cfg.pop(key, None)
    return instantiate(cfg, _convert_="all")
