"""Compare finished runs: a table of models, hyperparameters and accuracies, and two plots.

    python -m cifar_lab.compare logs/train/runs/A logs/train/multiruns/B [--out compare.md] [--plot compare.png]

Every ``metrics.json`` found under the given folders (recursively, so a run directory, a
multirun sweep directory or all of ``logs/`` work) is one row. A run directory without one (a run
still going, stopped early, or refused before it started) is listed on stderr with the reason.
The data column is the data option and the train/val/test sizes (``val`` ``test``: validated on the
test set; ``0``: no validation), from ``metrics.json`` (else the config). Hyperparameters come from the
run's ``config.yaml`` (the resolved config saved next to ``metrics.json``). The table is
printed as Markdown and, with ``--out``, written to a file; ``--plot`` draws accuracy against
parameter count and against wall time.

Runs whose configs differ only by the seed (e.g. the jobs of ``python train.py -m seed=0,1,2``) are
also summarised under "Over seeds": each metric's n, mean, standard deviation and 95% t interval
(:mod:`cifar_lab.runs.seed_stats`). The folds of a k-fold cross-validation (``python train.py -m
data.folds=5 data.fold=0,1,2,3,4``: runs that differ only by ``data.fold``) are summarised the same
way under "Over folds".

``--tag X`` (repeatable) keeps the runs trained with ``tags=[X,...]``.

The wall time of a resumed run is its total over all segments (``wall_time_total_s``), marked
"(resumed)". A failed sweep job (``"status": "failed"``) shows "failed" in its accuracy cells,
with the first line of its error in a note under the table; it is left out of the plot.
"""

from __future__ import annotations

import argparse
import logging
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifar_lab.config.saved import load_yaml, plain_config
from cifar_lab.runs import seed_stats
from cifar_lab.runs.tags import has_tags, tags_of
from cifar_lab.runs.unfinished import skipped_dirs
from cifar_lab.errors import InputError, UserError

log = logging.getLogger(__name__)

COLUMNS: list[tuple[str, str]] = [
    ("run", "run"),
    ("model", "model"),
    ("params", "params"),
    ("optimizer", "optimizer"),
    ("lr", "lr"),
    ("batch_size", "batch size"),
    ("scheduler", "scheduler"),
    ("epochs", "epochs"),
    ("val_acc_best", "best val acc"),
    ("test_acc", "test acc"),
    ("wall_time_s", "wall time"),
    ("data", "data (train/val/test)"),
]
SORT_KEYS = [key for key, _ in COLUMNS]


@dataclass
class Run:
    path: Path
    run: str
    model: str = ""
    params: int | None = None
    optimizer: str = ""
    lr: float | None = None
    batch_size: int | None = None
    scheduler: str = ""
    epochs: int | None = None
    val_acc_best: float | None = None
    test_acc: float | None = None
    wall_time_s: float | None = None  # the run's total over all its segments when known
    task: str = "train"
    resumed: bool = False
    # True when wall_time_s covers the last segment only (a resumed run without a recorded total)
    partial_time: bool = False
    data: str = ""  # data option and split sizes, e.g. "cifar10 45000/5000/10000"
    status: str = ""  # "ok" or "failed" for sweep jobs, "" otherwise
    error: str = ""  # first line of a failed job's error
    tags: list[str] = field(default_factory=list)  # the run's tags (tags=[...])
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading


def find_metrics(paths: Sequence[str | Path]) -> list[Path]:
    """``metrics.json`` files under the given folders (or given directly), each once, in path order."""
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file() and path.name == "metrics.json":
            found[path.resolve()] = None
        elif path.is_dir():
            for file in sorted(path.rglob("metrics.json")):
                found[file.resolve()] = None
        else:
            raise InputError(f"{given}: no such run directory (or metrics.json file)")
    return list(found)


def _number(value: Any, kind: type) -> Any:
    try:
        return kind(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _short_target(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else ""


def _first_line(text: Any) -> str:
    """The first non-empty line of ``text`` ("" for none)."""
    for line in str(text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _saved_config(run_dir: Path) -> tuple[Any, DictConfig]:
    """The run's saved config as plain data, and as an OmegaConf node for dotted look-ups."""
    cfg: Any = {}
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        # A sweep job that failed before training started has only Hydra's copy of its config.
        config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        try:  # saved data: size and alias limits, no interpolation left (cifar_lab.config.saved)
            cfg = plain_config(load_yaml(config_file) or {}, str(config_file), strict=())
        except UserError as err:
            log.warning("%s: %s; its config is not shown", config_file, err)
            cfg = {}
    # Made once for the dotted look-ups. Any YAML value (a date, say) is kept as it is; a file that is not a
    # mapping, or has keys OmegaConf does not take, has nothing to look up.
    try:
        conf = OmegaConf.create(cfg if isinstance(cfg, dict) else {}, flags={"allow_objects": True})
    except OmegaConfBaseException:
        conf = OmegaConf.create({})
    return cfg, conf


def read_run(metrics_file: Path, label: str) -> Run:
    summary = json.loads(metrics_file.read_text())
    if not isinstance(summary, dict):
        raise ValueError("not a JSON object")
    run_dir = metrics_file.parent
    cfg, conf = _saved_config(run_dir)

    def select(dotted: str) -> Any:
        """The value at ``dotted`` (e.g. ``optimizer.lr``); None when any part is missing."""
        return OmegaConf.select(conf, dotted, default=None, throw_on_resolution_failure=False)

    choices = summary.get("choices") or {}
    metrics = summary.get("metrics") or {}
    scheduler_choice = choices.get("scheduler")
    scheduler = scheduler_choice or _short_target(select("scheduler.scheduler._target_"))
    # A resumed run's metrics.json carries its total time over all segments; one written before
    # that was recorded has this process's time only.
    resumed = bool(summary.get("resumed_from"))
    total = _number(summary.get("wall_time_total_s"), float)
    wall_time = total if total is not None else _number(summary.get("wall_time_s"), float)
    # each metric and the wall time, for the statistics over seeds
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if wall_time is not None:
        numbers["wall_time_s"] = wall_time
    mapping = cfg if isinstance(cfg, dict) else {}
    status = str(summary.get("status") or "")
    error = _first_line(summary.get("error"))
    if status == "failed" and not error:
        error = "no error message recorded"
    return Run(
        path=run_dir,
        run=label,
        task=str(summary.get("task", "train")),
        model=str(summary.get("model") or choices.get("model") or _short_target(select("model._target_"))),
        params=_number(summary.get("params"), int),
        optimizer=str(choices.get("optimizer") or _short_target(select("optimizer._target_"))),
        lr=_number(select("optimizer.lr"), float),
        batch_size=_number(select("data.batch_size"), int),
        scheduler=str(scheduler or ("none" if cfg and not select("scheduler.scheduler") else "")),
        epochs=_number(summary.get("epochs"), int),
        val_acc_best=_number(metrics.get("val/acc_best"), float),
        test_acc=_number(metrics.get("test/acc"), float),
        wall_time_s=wall_time,
        data=_data_cell(summary.get("data"), str(choices.get("data") or ""), select),
        resumed=resumed,
        partial_time=resumed and total is None,
        status=status,
        error=error,
        tags=tags_of(summary) if "tags" in summary else tags_of(mapping),
        extra={"config": seed_stats.config_leaves(mapping), "seed": summary.get("seed", mapping.get("seed")),
               "metrics": numbers},
    )


def _data_cell(recorded: Any, choice: str, select: Any) -> str:
    """``cifar10 45000/5000/10000`` from metrics.json's ``data``, else what the config says."""
    if isinstance(recorded, dict) and isinstance(recorded.get("splits"), dict):
        sizes = recorded["splits"]
        parts = [str(sizes[name]) for name in ("train", "val", "test") if name in sizes]
        return f"{recorded.get('source') or choice} {'/'.join(parts)}".strip()
    train, test = select("data.source.train_size"), select("data.source.test_size")
    if train is not None and test is not None:  # a generated source states its sizes
        val = select("data.val_size") or 0
        return f"{choice} {int(train) - int(val)}/{int(val) if val else 'test'}/{test}".strip()
    return choice


def _labels(files: Sequence[Path], roots: Sequence[str | Path]) -> list[str]:
    """Each run's folder relative to the folder it was found under (the folder name for a run dir)."""
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    labels = []
    for file in files:
        run_dir = file.parent
        label = run_dir.name
        for root in resolved_roots:
            root_dir = root.parent if root.is_file() else root
            if run_dir == root_dir:
                label = run_dir.name
                break
            if root_dir in run_dir.parents:
                label = f"{root_dir.name}/{run_dir.relative_to(root_dir)}"
                break
        labels.append(label)
    return labels


def collect(paths: Sequence[str | Path]) -> list[Run]:
    files = find_metrics(paths)
    skipped = skipped_dirs(paths)
    if skipped:
        print(f"skipped {len(skipped)} director{'y' if len(skipped) == 1 else 'ies'} without metrics.json:",
              file=sys.stderr)
        for run_dir, why in skipped.items():
            print(f"  {run_dir}: {why}", file=sys.stderr)
    runs = []
    for file, label in zip(files, _labels(files, paths)):
        try:
            runs.append(read_run(file, label))
        except (OSError, ValueError) as err:
            print(f"warning: skipping {file}: {err}", file=sys.stderr)
    if not runs:
        raise InputError(f"no readable metrics.json under {', '.join(str(p) for p in paths)}")
    return runs


def filter_tags(runs: list[Run], wanted: Sequence[str]) -> list[Run]:
    """The runs that carry every tag in ``wanted`` (all runs when none is wanted)."""
    kept = [run for run in runs if has_tags(run.tags, wanted)]
    if not kept:
        raise InputError(f"no run is tagged {' and '.join(wanted)} among {len(runs)} runs; drop --tag to see them all")
    return kept


# ----------------------------------------------------------------------------- table


def format_params(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


ACCURACY_KEYS = ("val_acc_best", "test_acc")


def _failed(run: Run) -> bool:
    return run.status == "failed"


def _cell(run: Run, key: str) -> str:
    value = getattr(run, key)
    if key == "params":
        return format_params(value)
    if key == "wall_time_s":
        text = format_duration(value)
        if run.resumed and value is not None:
            text += " (resumed, last part)" if run.partial_time else " (resumed)"
        return text
    if key in ACCURACY_KEYS:
        if _failed(run):  # whatever it logged before failing (a diverged loss, say) is no result
            return "failed"
        return "-" if value is None else f"{100 * value:.2f}%"
    if key == "lr":
        return "-" if value is None else f"{value:g}"
    if key == "run" and run.task != "train":
        return f"{value} ({run.task})"
    return "-" if value in (None, "") else str(value)


def sort_runs(runs: list[Run], key: str = "test_acc") -> list[Run]:
    """Best first for accuracies, largest first otherwise; runs lacking the value go last.

    For accuracies a failed run counts as lacking the value.
    """
    if key not in SORT_KEYS:
        raise InputError(f"--sort must be one of {', '.join(SORT_KEYS)}, got {key!r}")

    def has_value(run: Run) -> bool:
        if key in ACCURACY_KEYS and _failed(run):
            return False
        return getattr(run, key) not in (None, "")

    present = [r for r in runs if has_value(r)]
    missing = [r for r in runs if not has_value(r)]
    reverse = key not in ("run", "model", "optimizer", "scheduler")
    return sorted(present, key=lambda r: getattr(r, key), reverse=reverse) + missing


def markdown_table(runs: Sequence[Run]) -> str:
    """The runs as an aligned Markdown table (readable as plain text too).

    Failed runs are listed under the table with the first line of their error.
    """
    headers = [title for _, title in COLUMNS]
    rows = [[_cell(run, key) for key, _ in COLUMNS] for run in runs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    numeric = {i for i, (key, _) in enumerate(COLUMNS)
               if key in ("params", "lr", "batch_size", "epochs", "val_acc_best", "test_acc", "wall_time_s")}

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    table = "\n".join([line(headers), rule, *(line(r) for r in rows)]) + "\n"
    failed = [run for run in runs if _failed(run)]
    if not failed:
        return table
    notes = [f"- {run.run} failed: {run.error}" for run in failed]
    return table + "\nFailed runs:\n\n" + "\n".join(notes) + "\n"


# ----------------------------------------------------------------------------- plot


def _point_label(run: Run, width: int = 24) -> str:
    name = run.run.rsplit("/", 1)[-1]
    if len(name) > width:
        name = name[: width - 3] + "..."
    task = "" if run.task == "train" else f" ({run.task})"
    return f"{run.model}{task}\n{name}"


def plot_runs(runs: Sequence[Run], path: str | Path) -> Path:
    """Accuracy (test, else best validation) against parameter count and against wall time (PNG).

    Training runs are dots, other entries (e.g. evaluate jobs, whose wall time is the
    evaluation's) crosses. Failed runs are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5))
    runs = [run for run in runs if not _failed(run)]
    use_test = any(r.test_acc is not None for r in runs)
    metric = "test accuracy" if use_test else "best validation accuracy"
    for col, (attr, xlabel, log_x) in enumerate((("params", "parameters", True),
                                                 ("wall_time_s", "wall time (s)", False))):
        ax = fig.add_subplot(1, 2, col + 1)
        points = []
        for run in runs:
            acc = run.test_acc if use_test else run.val_acc_best
            x = getattr(run, attr)
            if acc is not None and x is not None and x > 0:
                points.append((x, 100 * acc, run))
        for x, y, run in points:
            marker = "o" if run.task == "train" else "x"
            ax.scatter([x], [y], s=30, marker=marker)
            ax.annotate(_point_label(run), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if log_x and points:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric.capitalize()} vs {xlabel.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no runs with both values", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cifar_lab.compare",
        description="Compare runs: finds metrics.json under each folder (run or sweep directories), "
                    "prints a Markdown table and optionally writes it and a plot.",
    )
    parser.add_argument("dirs", nargs="+", help="run directories, sweep directories or any folder above them")
    parser.add_argument("--out", help="write the table as Markdown to this file (e.g. compare.md)")
    parser.add_argument("--plot", help="write accuracy vs parameters / wall time to this PNG (e.g. compare.png)")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG",
                        help="keep only runs tagged TAG (tags=[...] when trained); repeat to require several")
    parser.add_argument("--sort", default="test_acc", choices=SORT_KEYS, help="column to sort by (default: test_acc)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = sort_runs(filter_tags(collect(args.dirs), args.tag), args.sort)
    except UserError as err:  # the same one-line report as every command, returned as the exit code
        print(f"Error: {err}", file=sys.stderr)
        return err.exit_code
    table = markdown_table(runs)
    for factor in seed_stats.FACTORS:  # runs that differ only by seed; folds of a cross-validation
        groups = seed_stats.group_runs(runs, factor)
        if groups:
            table += f"\n## Over {factor}s\n\n" + seed_stats.markdown(groups)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        failed = sum(_failed(run) for run in runs)
        count = f"{len(runs)} runs" + (f" ({failed} failed)" if failed else "")
        out.write_text(f"# Run comparison\n\n{count} from {', '.join(args.dirs)}\n\n{table}")
        print(f"Wrote {out}")
    if args.plot:
        print(f"Wrote {plot_runs(runs, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
