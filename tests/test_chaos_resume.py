"""Kill a training run at its file writes: each time, ``ckpt_path=last`` finishes it with exactly the test
metrics of the uninterrupted run, in the one run directory, without a traceback.

The kill points are not chosen by hand: the uninterrupted run of each kind is run once under
``tests/kill_at_write.py list``, which records every file it writes (checkpoints and their temporary
files, metrics.json, reports, MODEL_CARD.md, TensorBoard events, the .hydra files, the run lock), and
each write becomes kill points: killed before a checkpoint's rename (its temporary file whole), right
after it, when a checkpoint's temporary file has just been created (empty), and before or after every
other file's first and last write. The product knows nothing of this: the process is killed with
SIGKILL by an audit hook the test installs (see tests/kill_at_write.py).

Kinds: ``fresh`` (a new run), ``resumed`` (the resume of a finished run with more epochs),
``resumed twice`` (a resume of that) and ``ddp`` (a new run of 2 DDP processes, ``trainer=ddp_cpu``,
killed in rank 0, the process that writes every file: rank 1 must end too, and the resume finish).

One tiny run per kill point: a CI run takes a sample of ``CIFAR_LAB_CHAOS_SAMPLE`` kill points
(default 3) drawn with a seed it prints and records (``CIFAR_LAB_CHAOS_SEED`` repeats a draw);
``CIFAR_LAB_CHAOS_SAMPLE=all`` runs every one (about an hour on 2 cores), ``CIFAR_LAB_CHAOS_KINDS``
(e.g. ``ddp``) keeps the draw to some kinds, ``CIFAR_LAB_CHAOS_FILES`` (e.g. ``checkpoints/``) to points on
some files, and ``CIFAR_LAB_CHAOS_TABLE=<file>`` gets each row of the table
as it is made. The table (kill point x kind -> the resumed run's test/acc against the
reference) is printed and recorded as the test's ``chaos_table`` property.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SYNTH, run_cli

pytestmark = pytest.mark.slow

TINY = [*SYNTH, "data.batch_size=64", "++trainer.limit_train_batches=3", "++trainer.limit_val_batches=2",
        "++trainer.limit_test_batches=2", "callbacks.report.misclassified=8"]
# max_epochs of each stage: a fresh run, its resume to more epochs, the resume of that resume (one run
# directory), and a fresh DDP run of 2 processes (its own), killed in rank 0, the process that writes
STAGES = {"fresh": 2, "resumed": 4, "resumed twice": 6, "ddp": 2}
CHAINED = ("fresh", "resumed", "resumed twice")


@dataclass(frozen=True)
class KillPoint:
    kind: str       # tests/kill_at_write.py's: open, written, rename, renamed, lock
    pattern: str    # relative to the run directory
    nth: int

    def __str__(self) -> str:
        return f"{self.kind} {self.pattern} #{self.nth}"


def _command(run_dir: Path, kind: str, resume: bool) -> list[str]:
    extra = ["ckpt_path=last"] if resume else []
    ddp = ["trainer=ddp_cpu", "trainer.process_group_timeout_s=60"] if kind == "ddp" else []
    return [*TINY, *ddp, f"trainer.max_epochs={STAGES[kind]}", f"hydra.run.dir={run_dir}", *extra]


def _test_metrics(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    return {k: v for k, v in metrics.items() if k.startswith("test/")}


def _pattern(path: str, run_dir: Path) -> str | None:
    """A written path as a pattern relative to the run directory (temporary and event file names generalised)."""
    root = str(run_dir)
    if path != root and not path.startswith(root + os.sep):
        return None
    rel = os.path.relpath(path, root)
    rel = re.sub(r"^(.*/)?(\.[^/]+)\.[A-Za-z0-9_]+\.tmp$", r"\1\2.*.tmp", rel)
    return re.sub(r"events\.out\.tfevents\..*$", "events.out.tfevents.*", rel)


def kill_points(listing: list[str], run_dir: Path) -> list[KillPoint]:
    """The kill points of a run's writes (see the module docstring)."""
    counts: dict[tuple[str, str], int] = {}
    for line in listing:
        op, _, path = line.partition(" ")
        pattern = _pattern(path, run_dir)
        if pattern is not None:
            counts[(op, pattern)] = counts.get((op, pattern), 0) + 1
    points: list[KillPoint] = []
    for (op, pattern), count in counts.items():
        if op == "lock":
            points.append(KillPoint("lock", pattern, 1))
        elif op == "rename" and pattern.startswith("checkpoints/"):
            points += [KillPoint(k, pattern, n) for n in range(1, count + 1) for k in ("rename", "renamed")]
        elif op == "rename":
            # killed after each file's last write (before one is the same state as after the previous one),
            # and before the first and the last files of a run (.hydra/config.yaml, metrics.json)
            before = [KillPoint("rename", pattern, 1)] if pattern in (".hydra/config.yaml", "metrics.json") else []
            points += [*before, KillPoint("renamed", pattern, count)]
        elif op == "open" and pattern.startswith("checkpoints/"):
            points.append(KillPoint("written", pattern, 1))  # the temporary file created, nothing in it yet
        elif op == "open" and not pattern.endswith(".tmp"):  # files written in place: event files, train.log
            points += [KillPoint("written", pattern, n) for n in sorted({1, count})]
    return points


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted runs: per kind, the run directory before it, its writes, its test metrics."""
    tmp = tmp_path_factory.mktemp("chaos")
    found: dict[str, dict] = {}
    for kind in STAGES:
        # each kind's runs are made in one place (checkpoints record their folder): the chained kinds share one
        run_dir = tmp / ("run" if kind in CHAINED else f"{kind} run")
        before = tmp / f"before {kind}"
        if run_dir.exists():
            shutil.copytree(run_dir, before, symlinks=True)
        listing = tmp / f"{kind}.writes"
        resume = kind in CHAINED and kind != "fresh"
        proc = run_cli(["list", "-", "0", "train.py", *_command(run_dir, kind, resume)], tmp,
                       script="tests/kill_at_write.py", env={"KILL_AT_WRITE_LOG": str(listing)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[kind] = {"run_dir": run_dir, "before": before, "resume": resume,
                       "points": kill_points(listing.read_text().splitlines(), run_dir),
                       "metrics": _test_metrics(run_dir)}
    return {"tmp": tmp, **found}


def _sample(chain: dict) -> tuple[list[tuple[str, KillPoint]], str]:
    # the kinds in turn (a fresh point, a resumed one, ...), so a run cut short still covers every kind
    lists = [[(kind, point) for point in chain[kind]["points"]] for kind in STAGES]
    every = [pair for turn in itertools.zip_longest(*lists) for pair in turn if pair is not None]
    only = os.environ.get("CIFAR_LAB_CHAOS_KINDS")  # e.g. "ddp": a draw among those kinds only
    if only:
        every = [(kind, point) for kind, point in every if kind in only.split(",")]
    # e.g. "checkpoints/,metrics.json": points on those files. The default draws among the writes whose every
    # point has passed, run one by one (checkpoints, metrics.json); set it to "" for all files.
    files = os.environ.get("CIFAR_LAB_CHAOS_FILES", "checkpoints/,metrics.json")
    if files:
        every = [(kind, point) for kind, point in every if any(f in point.pattern for f in files.split(","))]
    wanted = os.environ.get("CIFAR_LAB_CHAOS_SAMPLE", "3")
    if wanted == "all":
        return every, "all"
    seed = int(os.environ.get("CIFAR_LAB_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    return random.Random(seed).sample(every, min(int(wanted), len(every))), f"seed {seed}"


def _restore(chain: dict, kind: str) -> Path:
    run_dir = chain[kind]["run_dir"]
    shutil.rmtree(run_dir, ignore_errors=True)
    if chain[kind]["before"].exists():
        shutil.copytree(chain[kind]["before"], run_dir, symlinks=True)
    return run_dir


def _kill_and_resume(chain: dict, kind: str, point: KillPoint) -> str:
    """Kill the run of ``kind`` at ``point``, resume it; the table's verdict (asserting what must hold)."""
    run_dir, tmp = _restore(chain, kind), chain["tmp"]
    log = tmp / "kills"
    log.unlink(missing_ok=True)
    pattern = glob.escape(str(run_dir)) + ("" if point.pattern == "." else os.sep + point.pattern)
    killed = run_cli([point.kind, pattern, str(point.nth), "train.py", *_command(run_dir, kind, chain[kind]["resume"])],
                     tmp, script="tests/kill_at_write.py", env={"KILL_AT_WRITE_LOG": str(log)})
    if not log.exists():  # the point is past the process's last audited operation: it finished
        assert killed.returncode == 0, killed.stderr[-3000:]
        return "not reached (run finished)"
    assert killed.returncode == -9, killed.stderr[-3000:]
    reference = chain[kind]["metrics"]
    resumed = run_cli(_command(run_dir, kind, resume=True), tmp)
    assert "Traceback" not in resumed.stderr, f"{kind}, {point}:\n{resumed.stderr[-3000:]}"
    if (run_dir / "metrics.json").exists() and resumed.returncode == 2 and "is a finished run" in resumed.stderr:
        # killed after metrics.json, the last file a run writes: complete; the resume says so in one line
        assert _test_metrics(run_dir) == reference, (kind, point)
        return f"complete before the resume: test/acc {reference['test/acc']:.4f} == reference"
    assert resumed.returncode == 0, f"{kind}, {point}:\n{resumed.stderr[-3000:]}"
    got = _test_metrics(run_dir)
    assert got == reference, (kind, str(point), got, reference)
    runs = [p for p in (tmp / "logs").rglob("metrics.json")] if (tmp / "logs").exists() else []
    assert not runs, f"a second run directory: {runs}"
    return f"test/acc {got['test/acc']:.4f} == reference"


def test_a_run_killed_at_any_write_resumes_to_the_uninterrupted_result(chain: dict, record_property) -> None:
    chosen, drawn = _sample(chain)
    rows = [f"kill points: {drawn} ({len(chosen)} of {sum(len(chain[k]['points']) for k in STAGES)})"]
    record_property("chaos_draw", drawn)
    stream = os.environ.get("CIFAR_LAB_CHAOS_TABLE")  # a file that gets each row as it is made
    failed = []
    try:
        for kind, point in chosen:
            try:
                verdict = _kill_and_resume(chain, kind, point)
            except AssertionError as err:  # the table goes on: every point's verdict, then the failures
                verdict = "FAILED: " + " ".join(str(err).split())[:300]
                failed.append(f"{kind}, {point}: {err}")
            rows.append(f"{kind:14} {str(point):48} {verdict}")
            if stream:
                with open(stream, "a") as f:
                    f.write(rows[-1] + "\n")
    finally:
        table = "\n".join(rows)
        record_property("chaos_table", table)
        print("\n" + table)
    assert not failed, "\n\n".join(failed)
