"""Run directories without a ``metrics.json``, and the likeliest reason their files show.

``python -m cifar_lab.compare`` lists them (a run still going, stopped early, or refused with an
error) instead of leaving them out without a word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cifar_lab.runs.directory import is_locked

__all__ = ["skipped_dirs"]


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _why_no_metrics(run_dir: Path) -> str:
    """Why a run directory has no metrics.json (the likeliest reason its files show)."""
    if (run_dir / "error.txt").is_file():
        return f"stopped with an error: {_first_line((run_dir / 'error.txt').read_text(errors='replace'))}"
    if is_locked(run_dir):
        return "still running (its lock is held)"
    if (run_dir / "checkpoints").is_dir():
        return ("stopped before the end (checkpoints, no metrics.json); resume it with "
                f"python train.py hydra.run.dir={run_dir} ckpt_path=last")
    return "no metrics.json: the run did not finish (or never started)"


def _looks_like_a_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in (".hydra", "config.yaml", "checkpoints", "error.txt"))


def skipped_dirs(paths: Sequence[str | Path]) -> dict[Path, str]:
    """Run directories under (or given as) ``paths`` that have no metrics.json, with the reason."""
    skipped: dict[Path, str] = {}
    for given in paths:
        path = Path(given).expanduser()
        if not path.is_dir():
            continue
        candidates = [path] + [p.parent for p in path.rglob(".hydra")] + [
            p.parent for p in path.rglob("config.yaml") if p.parent.name != ".hydra"]
        for run_dir in candidates:
            if run_dir in skipped or (run_dir / "metrics.json").is_file():
                continue
            if run_dir == path and any(path.rglob("metrics.json")):
                continue  # a folder above runs, not a run
            if not _looks_like_a_run(run_dir):
                if run_dir == path:  # named on the command line: say what it is
                    skipped[run_dir] = "not a run directory (no config, checkpoints or metrics.json: a predict or "\
                                       "export job's folder, say)"
                continue
            skipped[run_dir] = _why_no_metrics(run_dir)
    return skipped
