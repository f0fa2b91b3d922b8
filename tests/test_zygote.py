"""A command forked from the zygote (tests/zygote.py) behaves as the same command in a fresh interpreter:
the same output, files, exit status, environment, paths and end, for every way a command can end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, SYNTH, run_command, start_command
from zygote import runnable

pytestmark = pytest.mark.slow  # every test starts commands

PROBE = textwrap.dedent("""
    import atexit, json, os, sys
    import helper_pkg
    atexit.register(lambda: print("atexit ran"))
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": os.environ.get("PROBE_VALUE"),
                      "unset": os.environ.get("PROBE_UNSET"), "path0": sys.path[0], "helper": helper_pkg.NAME,
                      "main": __name__, "stdin": sys.stdin.read()}))
    print("to stderr", file=sys.stderr)
    how = sys.argv[1]
    if how == "raise":
        1 / 0
    if how == "signal":
        sys.stdout.flush()
        os.kill(os.getpid(), 15)
    sys.exit(int(how))
""")


def _both(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, ...]:
    return (run_command(argv, cwd, env, timeout=300, fresh=True), run_command(argv, cwd, env, timeout=300))


@pytest.fixture
def probe(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A script and a package on PYTHONPATH (none of it imported by the zygote)."""
    (tmp_path / "lib" / "helper_pkg").mkdir(parents=True)
    (tmp_path / "lib" / "helper_pkg" / "__init__.py").write_text("NAME = 'helper'\n")
    (tmp_path / "lib" / "helper_pkg" / "probe.py").write_text(PROBE)
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "work").mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PROBE_UNSET"}, "PROBE_VALUE": "given",
           "PYTHONPATH": str(tmp_path / "lib")}
    return tmp_path, env


@pytest.mark.parametrize("how", ["0", "3", "raise", "signal"])
@pytest.mark.parametrize("form", ["script", "module"])
def test_a_forked_command_ends_as_a_fresh_one(probe, how: str, form: str) -> None:
    """Exit codes, an uncaught exception (status 1, the traceback on stderr), death by a signal; the
    environment given (not the zygote's), the working directory, sys.argv, sys.path[0], PYTHONPATH,
    __main__, an empty stdin, atexit handlers and flushed output."""
    folder, env = probe
    os.environ["PROBE_UNSET"] = "the test process has it, the command's environment does not"
    try:
        target = [str(folder / "probe.py")] if form == "script" else ["-m", "helper_pkg.probe"]
        fresh, forked = _both([sys.executable, *target, how], folder / "work", env)
    finally:
        del os.environ["PROBE_UNSET"]
    assert forked.returncode == fresh.returncode == {"0": 0, "3": 3, "raise": 1, "signal": -15}[how]
    assert forked.stdout == fresh.stdout
    seen = json.loads(forked.stdout.splitlines()[0])
    assert seen == {"argv": [how], "cwd": str(folder / "work"), "env": "given", "unset": None,
                    "path0": str(folder if form == "script" else folder / "work"), "helper": "helper",
                    "main": "__main__", "stdin": ""}
    assert forked.stderr.startswith("to stderr\n") and fresh.stderr.startswith("to stderr\n")
    if how == "raise":
        assert forked.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
        assert fresh.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    else:
        assert forked.stderr == fresh.stderr
    assert ("atexit ran" in forked.stdout) == (how not in ("signal",))


def test_a_command_over_its_time_is_killed_and_the_next_one_runs(tmp_path: Path) -> None:
    (tmp_path / "forever.py").write_text("import signal\nsignal.pause()\n")
    (tmp_path / "ok.py").write_text("print('next')\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, str(tmp_path / "forever.py")], tmp_path, dict(os.environ), timeout=1)
    after = run_command([sys.executable, str(tmp_path / "ok.py")], tmp_path, dict(os.environ))
    assert after.returncode == 0 and after.stdout == "next\n"
    assert not runnable([sys.executable, "-c", "print(1)"]) and runnable([sys.executable, "ok.py"])


def test_the_project_commands_print_and_fail_alike(tmp_path: Path) -> None:
    env = {**os.environ, "CIFAR_LAB_LOGS": str(tmp_path / "logs"), "COLUMNS": "200"}
    for args in (["train.py", "--cfg", "job", "model=simple_cnn", "data=synthetic"],
                 ["train.py", "model=no_such_model"],
                 ["train.py", "data=synthetic", "optimizer.lr=-1"],
                 ["-m", "cifar_lab.compare", str(tmp_path / "missing")],
                 ["-m", "cifar_lab.evaluate", "ckpt_path=" + str(tmp_path / "missing")]):
        fresh, forked = _both([sys.executable, *args], ROOT, env)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr), args
    assert fresh.returncode != 0 and "missing" in fresh.stderr


def test_a_training_run_gives_the_same_results(tmp_path: Path) -> None:
    """The whole path (Hydra, Lightning, torch's threads and random numbers, the files written): the
    same metrics, to the last digit, as a fresh interpreter's run."""
    env = {**os.environ, "CIFAR_LAB_LOGS": str(tmp_path / "logs"), "COLUMNS": "200"}
    metrics = []
    for way, fresh in (("fresh", True), ("forked", False)):
        run_dir = tmp_path / way
        args = [sys.executable, "train.py", *SYNTH, "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
                "+trainer.limit_val_batches=2", f"hydra.run.dir={run_dir}"]
        proc = run_command(args, ROOT, env, timeout=300, fresh=fresh)
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics.append(json.loads((run_dir / "metrics.json").read_text())["metrics"])
        assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert metrics[0] == metrics[1] and "test/acc" in metrics[0]


STREAMING = textwrap.dedent("""
    import os, select, signal, sys
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(10))  # SIGINT ends it as Ctrl-C would, SIGKILL kills it
    # Each signal also writes a byte to this pipe, so the wait below sees a signal that came before it began
    # (signal.pause() would sleep through one sent between the last check and the pause: a lost wake-up)
    wake, woken = os.pipe()
    os.set_blocking(woken, False)
    signal.set_wakeup_fd(woken)
    print("to stderr", file=sys.stderr, flush=True)
    print("ready", flush=True)  # last: a signal sent once this is read finds all of the above done
    while sys.argv[1] == "wait":  # until a signal's handler ends it
        select.select([wake], [], [])
        os.read(wake, 64)
    sys.exit(int(sys.argv[1]))
""")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1, signal.SIGKILL])
def test_a_started_command_streams_its_output_and_ends_by_its_signal_as_a_fresh_one(tmp_path: Path,
                                                                                    signum: int) -> None:
    """``start_command`` against ``subprocess.Popen``: the first line read while it runs, a signal sent to its pid,
    the rest of its output and the exit status it gives (stderr piped, joined to stdout, or to a file)."""
    (tmp_path / "streaming.py").write_text(STREAMING)
    argv, env = [sys.executable, str(tmp_path / "streaming.py"), "wait"], {**os.environ, "PYTHONUNBUFFERED": "1"}
    seen = {}
    for way in ("fresh", "forked"):
        for joined in ("piped", "joined", "file"):
            errors = tmp_path / f"{way}-{joined}.txt"
            stderr = {"piped": subprocess.PIPE, "joined": subprocess.STDOUT, "file": errors}[joined]
            if way == "fresh":
                proc = subprocess.Popen(argv, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                        stderr=open(errors, "w") if joined == "file" else stderr)
            else:
                proc = start_command(argv, tmp_path, env, stdout=subprocess.PIPE, stderr=stderr)
            first = "".join(iter(lambda: "" if (line := proc.stdout.readline()) == "ready\n" else line, ""))
            os.kill(proc.pid, signum)  # once it printed "ready"
            out, err = proc.communicate(timeout=60)
            err = errors.read_text() if joined == "file" else err
            # a KeyboardInterrupt's traceback names the frames that ran the script: only its last line compares
            seen[way, joined] = (first, out.splitlines()[:1], (err or "").splitlines()[:1],
                                 (err or out).rstrip().splitlines()[-1:], proc.returncode)
    assert [seen["fresh", j] for j in ("piped", "joined", "file")] == [seen["forked", j] for j in
                                                                      ("piped", "joined", "file")]
    assert seen["fresh", "piped"][:3] == ("", [], ["to stderr"]) and seen["fresh", "joined"][0] == "to stderr\n"
    assert seen["fresh", "piped"][4] == {signal.SIGINT: -signal.SIGINT, signal.SIGUSR1: 10,
                                         signal.SIGKILL: -signal.SIGKILL}[signum]


def test_a_started_command_polls_waits_and_the_next_one_runs(tmp_path: Path) -> None:
    (tmp_path / "streaming.py").write_text(STREAMING)
    env = dict(os.environ)
    proc = start_command([sys.executable, str(tmp_path / "streaming.py"), "wait"], tmp_path, env)
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.1)
    # left running: the next command ends it first
    after = start_command([sys.executable, str(tmp_path / "streaming.py"), "3"], tmp_path, env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == -signal.SIGKILL
    assert after.communicate(timeout=60) == ("ready\n", "to stderr\n") and after.wait() == after.poll() == 3
    done = run_command([sys.executable, str(tmp_path / "streaming.py"), "0"], tmp_path, env)
    assert (done.returncode, done.stdout) == (0, "ready\n")
