"""Runs that differ only by their seed: grouped, with mean, standard deviation and a 95% interval per metric.

Two runs belong to one group when their saved configs (``config.yaml``) are equal once the
seed is left out: the top-level ``seed``, every ``*seed`` key that holds its run's seed in all
runs compared (``data.seed`` interpolates it), ``paths``/``hydra``, and values naming the run's
own directory (logger folders, checkpoint paths, run names). The interval is Student's t: ``mean +- t(0.975, n-1) *
std / sqrt(n)`` with the sample standard deviation (``n - 1`` in the denominator).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["config_leaves", "t_quantile", "summarize", "SeedGroup", "group_by_seed", "markdown"]

IGNORED_TOP = ("seed", "paths", "hydra")
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
class SeedGroup:
    """Runs with one config and different seeds, and the statistics of each metric over them."""

    label: str
    runs: list[str]
    seeds: list[Any]
    stats: dict[str, dict[str, float]] = field(default_factory=dict)


def group_by_seed(runs: Sequence[Any]) -> list[SeedGroup]:
    """Groups of two or more runs with different seeds (``extra["config"]``, ``["seed"]``, ``["metrics"]``)."""
    usable = [r for r in runs if r.extra.get("config") is not None and r.status != "failed"]
    # keys that hold each run's own seed in every run (data.seed: ${seed}, ...) are the seed too
    seed_keys = {k for r in usable for k in r.extra["config"] if k.rsplit(".", 1)[-1].endswith("seed")}
    follows = {k for k in seed_keys
               if all(r.extra["config"][k] == r.extra.get("seed") for r in usable if k in r.extra["config"])}
    groups: dict[str, list[Any]] = {}
    for run in usable:
        kept = {k: v for k, v in run.extra["config"].items() if k not in follows}
        groups.setdefault(json.dumps(kept, sort_keys=True, default=str), []).append(run)
    found = []
    for members in groups.values():
        members = sorted(members, key=lambda r: r.run)
        if len({str(r.extra.get("seed")) for r in members}) < 2:
            continue
        names = sorted({m for r in members for m in r.extra.get("metrics", {})})
        stats = {}
        for name in names:
            values = [float(r.extra["metrics"][name]) for r in members if name in r.extra.get("metrics", {})]
            values = [v for v in values if math.isfinite(v)]
            if values:
                stats[name] = summarize(values)
        found.append(SeedGroup(label=f"{members[0].model or 'runs'} ({len(members)} seeds)",
                               runs=[r.run for r in members], seeds=[r.extra.get("seed") for r in members],
                               stats=stats))
    return found


def _number(name: str, value: float) -> str:
    if name.endswith("acc") or "/acc" in name:
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def markdown(groups: Sequence[SeedGroup]) -> str:
    """One table per group: each metric's n, mean, std and 95% interval."""
    parts = []
    for group in groups:
        rows = ["| metric | n | mean | std | 95% interval |", "|---|---:|---:|---:|---|"]
        for name, s in group.stats.items():
            rows.append(f"| {name} | {s['n']} | {_number(name, s['mean'])} | {_number(name, s['std'])} | "
                        f"{_number(name, s['low'])} - {_number(name, s['high'])} |")
        seeds = ", ".join(str(s) for s in group.seeds)
        parts.append(f"### {group.label}: seeds {seeds}\n\nruns: {', '.join(group.runs)}\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"
