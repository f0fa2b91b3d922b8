"""A run's tags and notes (``tags=[baseline,cv] notes="..."``): what its author says about it.

They are recorded in metrics.json, the model card, TensorBoard's HPARAMS tab (with the rest of
the config), as MLflow tags and W&B tags and notes; ``python -m cifar_lab.compare --tag X``
keeps the runs tagged X.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["tags_of", "notes_of", "mlflow_tags", "has_tags"]

# MLflow shows this tag as the run's description
MLFLOW_NOTE = "mlflow.note.content"


def tags_of(cfg: Mapping[str, Any] | Any) -> list[str]:
    """The run's tags as strings, in the order given, each once ([] when none)."""
    tags = cfg.get("tags") if cfg is not None else None
    if not tags:
        return []
    if isinstance(tags, str):
        tags = [tags]
    return list(dict.fromkeys(str(t) for t in tags))


def notes_of(cfg: Mapping[str, Any] | Any) -> str:
    notes = cfg.get("notes") if cfg is not None else None
    return "" if notes is None else str(notes)


def mlflow_tags(cfg: Mapping[str, Any] | Any) -> dict[str, str]:
    """MLflow run tags: ``tags`` (comma-separated; search with ``tags.tags LIKE '%X%'``) and the notes as
    the run's description."""
    out = {}
    if tags := tags_of(cfg):
        out["tags"] = ",".join(tags)
    if notes := notes_of(cfg):
        out[MLFLOW_NOTE] = notes
    return out


def has_tags(run_tags: Iterable[str], wanted: Iterable[str]) -> bool:
    """Whether every wanted tag is among the run's."""
    return set(wanted) <= set(run_tags)
