"""Commands started from an interpreter that has already imported torch, Lightning and Hydra.

Every ``python train.py ...`` a test starts pays about 4 s (2-core AMD EPYC, quiet) of imports
before it does any work, and the suite starts a few hundred. A zygote is one such interpreter
per test process: it imports the heavy libraries once, never runs a tensor operation (so no
OpenMP pool exists to be broken by ``fork``), starts no thread, and forks a child per command. The
child is a real process of its own, with its own pid, working directory, environment,
``sys.argv``, ``sys.path`` (``PYTHONPATH`` included), standard streams and exit status; it runs the
entry point as ``python`` would (``runpy``, ``__main__``) and ends through the interpreter's normal
exit (atexit handlers, flushed streams, an uncaught exception printed with exit status 1, death
by a signal reported as a negative return code).

What a child does not get again: import-time work. A test about start-up itself (Ctrl-C while
importing, what ``--help`` imports) starts a fresh interpreter; so does any command that is not
``python SCRIPT`` or ``python -m MODULE``. ``tests/test_zygote.py`` runs commands both ways and
compares what they print, write and return.

Protocol (the zygote's stdin and stdout, one JSON object a line): a request ``{"argv", "cwd",
"env", "stdout", "stderr"}`` is answered by ``{"pid": n}`` once forked and ``{"returncode": n}``
once the child has exited.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# What every command imports before it does any work (the entry points themselves are not: a
# module run with -m must not be imported beforehand, as in a fresh interpreter).
PRELOAD = ("torch", "lightning", "hydra", "omegaconf", "torchmetrics", "torchvision", "cifar_lab.cli.train",
           "cifar_lab.cli.evaluate", "cifar_lab.cli.predict", "cifar_lab.cli.export", "cifar_lab.cli.tune",
           "cifar_lab.cli.compare")


def runnable(argv: list[str]) -> bool:
    """Whether ``argv`` is ``python SCRIPT ...`` or ``python -m MODULE ...`` of this interpreter."""
    if len(argv) < 2 or argv[0] != sys.executable:
        return False
    if argv[1] == "-m":
        return len(argv) > 2
    return not argv[1].startswith("-") and argv[1].endswith(".py")


# ----------------------------------------------------------------------------- the zygote's side
class _Command(BaseException):
    """Raised in a forked child to leave the serving loop: the command runs at the top level."""

    def __init__(self, request: dict) -> None:
        super().__init__()
        self.request = request


def _serve() -> None:
    import gc
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # The imported heap (a few hundred thousand objects) goes to the collector's permanent generation: a
    # child's collections skip it instead of walking it and writing to every page of it (copy-on-write
    # faults). A tiny forked run (simple_cnn, 2 batches of 8, one thread): 5.2 s without, 4.0 s with (medians
    # of 6, side by side; 2-core Zen 3).
    gc.freeze()
    own_path = list(sys.path)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        request["_own_path"] = own_path
        pid = os.fork()
        if pid == 0:
            replies.close()
            raise _Command(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


def _python_path(env: dict[str, str]) -> list[str]:
    return [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def _become(request: dict) -> tuple[str, str]:
    """Turn this forked child into the requested process; returns (kind, target) to run."""
    import random

    argv, env = request["argv"], request["env"]
    os.chdir(request["cwd"])
    own_pythonpath = _python_path(dict(os.environ))
    os.environ.clear()
    os.environ.update(env)
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                           (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    line_buffered = 1 if env.get("PYTHONUNBUFFERED") else -1
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=line_buffered, closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)
    kind, target = ("module", argv[2]) if argv[1] == "-m" else ("script", os.path.abspath(argv[1]))
    first = os.getcwd() if kind == "module" else os.path.dirname(target)
    site = [p for p in request["_own_path"][1:] if p not in own_pythonpath]
    sys.path[:] = [first, *_python_path(env), *site]
    sys.argv = [target if kind == "script" else argv[2], *argv[3 if kind == "module" else 2:]]
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    random.seed()
    return kind, target


def _run(request: dict) -> None:
    import runpy

    kind, target = _become(request)
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")


# ----------------------------------------------------------------------------- the test's side
class Zygote:
    """One zygote per test process, started on first use; :meth:`run` is ``subprocess.run`` for
    ``python SCRIPT``/``python -m MODULE`` commands (output captured as text)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._pending = b""  # what the zygote has replied past the last whole line
        self._started: Started | None = None  # the last command popen started

    def _start(self) -> subprocess.Popen:
        if self._started is not None and self._started.returncode is None:  # left running (a failed test)
            self._started.kill()
            self._started.wait()
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, str(HERE / "zygote.py")], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True,
                                          bufsize=1)
            self._pending = b""
        return self._proc

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)

    def _reply(self, proc: subprocess.Popen, timeout: float | None) -> dict | None:
        """The zygote's next reply, or None after ``timeout`` seconds. Its replies are read straight from the
        pipe (both of a quick command's replies can arrive in one read: a buffered reader would hold the
        second where ``select`` does not look)."""
        fd = proc.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the zygote ended unexpectedly")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: str | os.PathLike, env: dict[str, str],
            timeout: float | None = None) -> subprocess.CompletedProcess:
        proc = self._start()
        with tempfile.TemporaryDirectory(prefix="zygote_") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            out.touch()
            err.touch()
            proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd), "env": dict(env),
                                         "stdout": str(out), "stderr": str(err)}) + "\n")
            started = self._reply(proc, None)  # the first request waits for the imports
            pid = started["pid"]
            finished = self._reply(proc, timeout)
            if finished is None:
                os.kill(pid, signal.SIGKILL)
                self._reply(proc, None)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(argv, finished["returncode"], out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def popen(self, argv: list[str], cwd: str | os.PathLike, env: dict[str, str],
              stdout: int | str | os.PathLike = subprocess.DEVNULL,
              stderr: int | str | os.PathLike = subprocess.DEVNULL) -> "Started":
        """``subprocess.Popen(argv, text=True)`` for one command at a time: ``stdout``/``stderr`` are
        ``subprocess.PIPE`` (a named pipe read as text; ``stderr=subprocess.STDOUT`` joins it), ``DEVNULL``
        or a file's path. The command is running when this returns; :class:`Started` ends it."""
        proc = self._start()
        folder = tempfile.mkdtemp(prefix="zygote_")
        paths = {}
        for name, where in (("stdout", stdout), ("stderr", stderr)):
            if where == subprocess.PIPE:
                paths[name] = os.path.join(folder, name)
                if name == "stdout":  # streamed: a named pipe
                    os.mkfifo(paths[name])
                else:  # read once the command has ended (a second pipe could fill while the first is read)
                    Path(paths[name]).touch()
            elif where == subprocess.STDOUT:
                paths[name] = paths["stdout"]
            elif where == subprocess.DEVNULL:
                paths[name] = os.devnull
            else:  # a file the command writes from its start
                paths[name] = os.fspath(where)
                Path(where).write_bytes(b"")
        proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd), "env": dict(env),
                                     **paths}) + "\n")
        # the command opens its standard streams first thing: the named pipe opens once both ends are there
        stream = open(paths["stdout"], errors="replace") if stdout == subprocess.PIPE else None
        started = self._reply(proc, None)
        errors = paths["stderr"] if stderr == subprocess.PIPE else None
        self._started = Started(self, argv, started["pid"], stream, errors, folder)
        return self._started


class Started:
    """A command :meth:`Zygote.popen` started: ``pid``, ``stdout`` (a text stream where piped), ``poll``,
    ``wait``, ``communicate``, ``send_signal``, ``kill`` and ``returncode`` as in ``subprocess.Popen``."""

    def __init__(self, zygote: Zygote, argv: list[str], pid: int, stdout, stderr_file: str | None,
                 folder: str) -> None:
        self.args, self.pid, self.returncode, self.stdout = argv, pid, None, stdout
        self._zygote, self._stderr_file, self._folder = zygote, stderr_file, folder

    def poll(self) -> int | None:
        if self.returncode is None:
            self._ended(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """The rest of stdout where piped, then the exit, then stderr where piped."""
        out = self.stdout.read() if self.stdout is not None else None
        self.wait(timeout)
        err = Path(self._stderr_file).read_text(errors="replace") if self._stderr_file else None
        shutil.rmtree(self._folder, ignore_errors=True)
        return out, err

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _ended(self, timeout: float | None) -> bool:
        finished = self._zygote._reply(self._zygote._proc, timeout)
        if finished is not None:
            self.returncode = finished["returncode"]
        return finished is not None


if __name__ == "__main__":
    forked = None
    try:
        _serve()
    except _Command as command:
        forked = command.request
    if forked is not None:  # this process is now the command: its exceptions and exit are the interpreter's own
        _run(forked)
