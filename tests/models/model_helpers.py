"""Helpers shared by the model tests: load ``conf/model/*.yaml`` without the rest of the config tree."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

MODEL_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
MODEL_NAMES = sorted(p.stem for p in MODEL_CONF_DIR.glob("*.yaml"))


def load_model_cfg(name: str, num_classes: int = 10, **overrides):
    """The ``model`` node of ``conf/model/<name>.yaml`` inside a stand-in root with ``data.num_classes``."""
    model = OmegaConf.load(MODEL_CONF_DIR / f"{name}.yaml")
    root = OmegaConf.create({"data": {"num_classes": num_classes}, "model": model})
    for key, value in overrides.items():
        OmegaConf.update(root, f"model.{key}", value, force_add=True)
    return root.model
