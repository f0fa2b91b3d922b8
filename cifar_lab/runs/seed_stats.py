"""Runs that differ only by their seed, or only by their fold of a k-fold cross-validation: grouped, with
mean, standard deviation and a 95% interval per metric.

Two runs belong to one group when their saved configs (``config.yaml``) are equal once the
seed is left out: the top-level ``seed``, every ``*seed`` key that holds its run's seed in all
runs compared (``data.seed`` interpolates it), ``paths``/``hydra``, and values naming the run's
own directory (logger folders, checkpoint paths, run names). Folds group the same way, with
``data.fold`` left out instead of the seed (the seed must match: it fixes the folds). The interval is
Student's t: ``mean +- t(0.975, n-1) * std / sqrt(n)`` with the sample standard deviation (``n - 1`` in the denominator).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["config_leaves", "t_quantile", "summarize", "RunGroup", "group_runs", "group_by_seed", "group_by_fold",
           "markdown"]

IGNORED_TOP = ("seed", "paths", "hydra", "tags", "notes")  # tags and notes say nothing of the config
# Student's t 97.5% quantiles for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher beyond 30)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def config_leaves(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config's leaves (``a.b.c -> value``) without the seed, ``paths``/``hydra`` and values naming
    the run's own directory (``None``: no config)."""
    if not cfg:
        return None
    paths = cfg.get("paths")
    output_dir = str(paths.get("output_dir") or "") if isinstance(paths, Mapping) else ""
    own = {output_dir, Path(output_dir).name} if output_dir else set()
    return {key: value for key, value in _leaves({k: v for k, v in cfg.items() if k not in IGNORED_TOP}).items()
            if not (isinstance(value, str) and own and (value in own or output_dir in value))}


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, mean, sample std and the 95% t interval (the interval collapses to the mean for n = 1)."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


@dataclass
class RunGroup:
    """Runs with one config that differ only by one factor (their seeds, or their folds of k-fold
    cross-validation), and the statistics of each metric over them."""

    label: str
    runs: list[str]
    values: list[Any]  # each run's value of the factor (its seed, or its fold)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    factor: str = "seed"


# What may vary within a group: runs that differ by seed, or by fold (data.fold) with the same seed.
FACTORS = ("seed", "fold")
FOLD_KEY = "data.fold"


def _factor_value(run: Any, factor: str) -> Any:
    return run.extra.get("seed") if factor == "seed" else run.extra["config"].get(FOLD_KEY)


def _varying_keys(usable: Sequence[Any], factor: str) -> set[str]:
    """Config keys that hold the factor itself in every run (for seeds: data.seed: ${seed}, ...)."""
    if factor == "fold":
        return {FOLD_KEY}
    seed_keys = {k for r in usable for k in r.extra["config"] if k.rsplit(".", 1)[-1].endswith("seed")}
    return {k for k in seed_keys
            if all(r.extra["config"][k] == r.extra.get("seed") for r in usable if k in r.extra["config"])}


def _stats(members: Sequence[Any]) -> dict[str, dict[str, float]]:
    names = sorted({m for r in members for m in r.extra.get("metrics", {})})
    stats = {}
    for name in names:
        values = [float(r.extra["metrics"][name]) for r in members if name in r.extra.get("metrics", {})]
        values = [v for v in values if math.isfinite(v)]
        if values:
            stats[name] = summarize(values)
    return stats


def group_runs(runs: Sequence[Any], factor: str = "seed") -> list[RunGroup]:
    """Groups of two or more runs (``extra["config"]``, ``["seed"]``, ``["metrics"]``) whose configs are
    equal but for ``factor``: ``seed`` (top-level seed and the keys that follow it) or ``fold``
    (``data.fold`` of runs with the same ``data.folds`` and the same seed)."""
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    usable = [r for r in runs if r.extra.get("config") is not None and r.status != "failed"]
    if factor == "fold":
        usable = [r for r in usable if r.extra["config"].get("data.folds")]
    varying = _varying_keys(usable, factor)
    groups: dict[str, list[Any]] = {}
    for run in usable:
        kept = {k: v for k, v in run.extra["config"].items() if k not in varying}
        if factor == "fold":
            kept["seed"] = run.extra.get("seed")
        groups.setdefault(json.dumps(kept, sort_keys=True, default=str), []).append(run)
    found = []
    for members in groups.values():
        members = sorted(members, key=lambda r: r.run)
        values = [_factor_value(r, factor) for r in members]
        if len({str(v) for v in values}) < 2:
            continue
        found.append(RunGroup(label=f"{members[0].model or 'runs'} ({len(members)} {factor}s)",
                               runs=[r.run for r in members], values=values, stats=_stats(members), factor=factor))
    return found


def group_by_seed(runs: Sequence[Any]) -> list[RunGroup]:
    """Groups of two or more runs that differ only by seed (:func:`group_runs`)."""
    return group_runs(runs, "seed")


def group_by_fold(runs: Sequence[Any]) -> list[RunGroup]:
    """Groups of two or more folds of one k-fold cross-validation (:func:`group_runs`)."""
    return group_runs(runs, "fold")


def _number(name: str, value: float) -> str:
    if name.endswith("acc") or "/acc" in name:
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def markdown(groups: Sequence[RunGroup]) -> str:
    """One table per group: each metric's n, mean, std and 95% interval."""
    parts = []
    for group in groups:
        rows = ["| metric | n | mean | std | 95% interval |", "|---|---:|---:|---:|---|"]
        for name, s in group.stats.items():
            rows.append(f"| {name} | {s['n']} | {_number(name, s['mean'])} | {_number(name, s['std'])} | "
                        f"{_number(name, s['low'])} - {_number(name, s['high'])} |")
        values = ", ".join(str(v) for v in group.values)
        parts.append(f"### {group.label}: {group.factor}s {values}\n\nruns: {', '.join(group.runs)}\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"
