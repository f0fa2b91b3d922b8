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
``resumed twice`` (a resume of that), ``ddp`` (a new run of 2 DDP processes, ``trainer=ddp_cpu``,
killed in rank 0, the process that writes every file: rank 1 must end too, and the resume finish) and
``ddp rank 1`` (the same run and kill points, rank 1 killed instead, while rank 0 goes on: rank 0 ends with
one ``Error:`` line, its exit code and no temporary file left, or finishes the run when the kill came
after its last collective; Lightning's launcher starts rank 1 only when fitting starts, so the points before
it kill nothing and are "not reached").

One tiny run per kill point: a CI run takes a sample of ``CIFAR_LAB_CHAOS_SAMPLE`` kill points
(default 3) drawn with a seed it prints and records (``CIFAR_LAB_CHAOS_SEED`` repeats a draw);
``CIFAR_LAB_CHAOS_SAMPLE=all`` runs every one (about an hour on 2 cores), ``CIFAR_LAB_CHAOS_KINDS``
(e.g. ``ddp``) keeps the draw to some kinds (and runs only the uninterrupted runs they need),
``CIFAR_LAB_CHAOS_FILES`` (e.g. ``checkpoints/``) to points on some files, ``CIFAR_LAB_CHAOS_EXCEPT`` (e.g.
``checkpoints/``) to points on other files, and ``CIFAR_LAB_CHAOS_TABLE=<file>`` gets each row of the table
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
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cifar_lab.errors import PeerLost
from conftest import SYNTH, run_cli

pytestmark = pytest.mark.slow

TINY = [*SYNTH, "data.batch_size=64", "++trainer.limit_train_batches=3", "++trainer.limit_val_batches=2",
        "++trainer.limit_test_batches=2", "callbacks.report.misclassified=8"]
# max_epochs of each stage: a fresh run, its resume to more epochs, the resume of that resume (one run
# directory), and a fresh DDP run of 2 processes (its own), killed in rank 0, the process that writes
STAGES = {"fresh": 2, "resumed": 4, "resumed twice": 6, "ddp": 2}
CHAINED = ("fresh", "resumed", "resumed twice")
# a kind that kills rank 1 of the ddp run at the ddp run's kill points (rank 0's writes): no run of its own
RANK_1 = "ddp rank 1"
KINDS = (*STAGES, RANK_1)


@dataclass(frozen=True)
class KillPoint:
    kind: str       # tests/kill_at_write.py's: open, written, rename, renamed, lock
    pattern: str    # relative to the run directory
    nth: int

    def __str__(self) -> str:
        return f"{self.kind} {self.pattern} #{self.nth}"


def _command(run_dir: Path, kind: str, resume: bool) -> list[str]:
    run = "ddp" if kind == RANK_1 else kind  # the uninterrupted run whose command it is
    extra = ["ckpt_path=last"] if resume else []
    ddp = ["trainer=ddp_cpu", "trainer.process_group_timeout_s=60"] if run == "ddp" else []
    return [*TINY, *ddp, f"trainer.max_epochs={STAGES[run]}", f"hydra.run.dir={run_dir}", *extra]


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


def _kinds() -> list[str]:
    """The kinds whose points are drawn (``CIFAR_LAB_CHAOS_KINDS``, default all)."""
    only = os.environ.get("CIFAR_LAB_CHAOS_KINDS")
    kinds = only.split(",") if only else list(KINDS)
    unknown = [kind for kind in kinds if kind not in KINDS]
    assert not unknown, f"CIFAR_LAB_CHAOS_KINDS: unknown kinds {unknown}; the kinds are {', '.join(KINDS)}"
    return kinds


def _runs_needed(kinds: list[str]) -> list[str]:
    """The uninterrupted runs those kinds' points come from: a chained kind needs the runs before it."""
    last_chained = max((CHAINED.index(kind) for kind in kinds if kind in CHAINED), default=-1)
    ddp = ["ddp"] if "ddp" in kinds or RANK_1 in kinds else []
    return [*CHAINED[:last_chained + 1], *ddp]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted runs: per kind, the run directory before it, its writes, its test metrics."""
    tmp = tmp_path_factory.mktemp("chaos")
    found: dict[str, dict] = {}
    for kind in _runs_needed(_kinds()):
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
    if "ddp" in found:
        found[RANK_1] = found["ddp"]
    return {"tmp": tmp, **found}


def _sample(chain: dict) -> tuple[list[tuple[str, KillPoint]], str]:
    # the kinds in turn (a fresh point, a resumed one, ...), so a run cut short still covers every kind
    lists = [[(kind, point) for point in chain[kind]["points"]] for kind in _kinds()]
    every = [pair for turn in itertools.zip_longest(*lists) for pair in turn if pair is not None]
    # e.g. "checkpoints/,metrics.json": points on those files (the default draws among all; every point of every
    # kind passed, run one by one with CIFAR_LAB_CHAOS_SAMPLE=all)
    files = os.environ.get("CIFAR_LAB_CHAOS_FILES")
    if files:
        every = [(kind, point) for kind, point in every if any(f in point.pattern for f in files.split(","))]
    skipped = os.environ.get("CIFAR_LAB_CHAOS_EXCEPT")  # e.g. "checkpoints/": points on other files only
    if skipped:
        every = [(kind, point) for kind, point in every if not any(f in point.pattern for f in skipped.split(","))]
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
    target = {"KILL_AT_WRITE_TARGET": "children"} if kind == RANK_1 else {}
    killed = run_cli([point.kind, pattern, str(point.nth), "train.py", *_command(run_dir, kind, chain[kind]["resume"])],
                     tmp, script="tests/kill_at_write.py", env={"KILL_AT_WRITE_LOG": str(log), **target})
    reference = chain[kind]["metrics"]
    if not log.exists():  # the point is past the process's last audited operation (or rank 1's life): it finished
        assert killed.returncode == 0, killed.stderr[-3000:]
        return "not reached (rank 1 not running then; run finished)" if kind == RANK_1 else "not reached (run finished)"
    if kind == RANK_1:
        (rank_1,) = re.findall(r"\(pids (\d+)\)", log.read_text())  # the one other rank, killed
        finished = _rank_0_after_rank_1_died(run_dir, killed, reference, int(rank_1))
        if finished:
            return finished
    else:
        assert killed.returncode == -9, killed.stderr[-3000:]
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


def _rank_0_after_rank_1_died(run_dir: Path, rank_0: subprocess.CompletedProcess, reference: dict,
                              rank_1: int) -> str | None:
    """Assert how rank 0 ended once rank 1 was killed: the run finished (the kill came after the last collective;
    the verdict), else one Error line, its exit code, no traceback and no temporary file left (None: resume it)."""
    errors = [line for line in rank_0.stderr.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in rank_0.stderr, rank_0.stderr[-3000:]
    if rank_0.returncode == 0:
        assert not errors, errors
        assert _test_metrics(run_dir) == reference
        return f"rank 1 killed after the last collective: the run finished, test/acc {reference['test/acc']:.4f} == reference"
    assert rank_0.returncode == PeerLost.exit_code, rank_0.stderr[-3000:]
    assert len(errors) == 1, rank_0.stderr[-3000:]
    assert errors[0].startswith(f"Error: rank 1 (pid {rank_1}, killed by signal 9) of the 2 processes"), errors[0]
    left = [p for p in run_dir.rglob(".*.tmp")]
    assert not left, f"temporary files left by rank 0, which ended through its error: {left}"
    assert not (run_dir / "metrics.json").exists(), "a run that ended with an error wrote metrics.json"
    return None


def test_a_run_killed_at_any_write_resumes_to_the_uninterrupted_result(chain: dict, record_property) -> None:
    chosen, drawn = _sample(chain)
    rows = [f"kill points: {drawn} ({len(chosen)} of {sum(len(chain[k]['points']) for k in _kinds())})"]
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


# A script that writes a file, starts another process running itself (as Lightning's launcher starts rank 1)
# and one running something else (as a helper), writes a file, then reports how each ended.
_LAUNCHER = """
import os, subprocess, sys
here = os.path.dirname(sys.argv[0])
if sys.argv[1:] == ["rank 1"]:
    sys.stdin.read()  # until killed, or until the parent closes the pipe
    sys.exit(0)
with open(os.path.join(here, "before.txt"), "w") as f:
    f.write("no other process yet")
rank_1 = subprocess.Popen([sys.executable, sys.argv[0], "rank 1"], stdin=subprocess.PIPE)
helper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
with open(os.path.join(here, "written.txt"), "w") as f:
    f.write("rank 0 went on")
rank_1.stdin.close(), helper.stdin.close()
print(rank_1.wait(), helper.wait())
"""


def test_the_injector_kills_the_ranks_started_by_the_process_and_nothing_else(tmp_path: Path) -> None:
    script = tmp_path / "launcher.py"
    script.write_text(_LAUNCHER)
    log = tmp_path / "kills"
    env = {"KILL_AT_WRITE_LOG": str(log), "KILL_AT_WRITE_TARGET": "children"}
    proc = run_cli(["open", glob.escape(str(tmp_path / "written.txt")), "1", str(script)], tmp_path, script="tests/kill_at_write.py",
                   env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-9", "0"]  # rank 1 killed, the helper not; this process went on
    assert (tmp_path / "written.txt").read_text() == "rank 0 went on"
    assert re.fullmatch(r"open \S+ 1 \S+written.txt \(pids \d+\)\n", log.read_text())
    # a kill point where no rank is running yet: nothing killed, nothing logged
    log.unlink()
    proc = run_cli(["open", glob.escape(str(tmp_path / "before.txt")), "1", str(script)], tmp_path, script="tests/kill_at_write.py",
                   env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["0", "0"], proc.stderr
    assert not log.exists()
