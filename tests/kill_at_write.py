"""Run a command's script and SIGKILL the process at one of its file writes (a fault injector for tests).

    python tests/kill_at_write.py KIND PATTERN N SCRIPT [ARGS...]

runs ``SCRIPT ARGS`` in this interpreter (as ``python SCRIPT ARGS`` would) with an audit hook
(:func:`sys.addaudithook`) that watches the process's own file operations and kills it with SIGKILL
at the ``N``-th (1-based) operation of ``KIND`` whose path matches the glob ``PATTERN``:

    open      a file opened for writing (``open``/``os.open`` with a write mode or flag), killed
              before the open: the file is not created or truncated
    written   the same open, killed at the process's next audited operation after it (the file
              exists, created or truncated, and holds whatever was written before that point)
    rename    a rename/replace onto a matching path, killed before it (the temporary file is whole,
              the target still the previous one)
    renamed   the same rename, killed at the next audited operation after it (the target replaced)
    lock      an ``flock`` on a matching path's descriptor (a run directory's lock), killed before it
    interrupt the same point as ``written``, but SIGINT (Ctrl-C) instead of SIGKILL
    list      kill nothing: append every write-open, rename and flock to ``KILL_AT_WRITE_LOG``
    import    not a write: send SIGINT (Ctrl-C) when a module whose name matches starts importing

``SCRIPT`` may be ``-m MODULE`` (as ``python -m MODULE ARGS``).

With ``KILL_AT_WRITE_TARGET=children`` the kill at the point goes to the processes this one started that run
the same ``SCRIPT`` (a DDP run's other ranks: Lightning's launcher starts them as children of rank 0, with
``python SCRIPT ARGS`` and without this hook), not to this process, which goes on. Where none is running at
that point, nothing is killed and nothing logged.

The kill point is the product's own behaviour, observed from outside; nothing in the product knows
about it. When the hook kills, it first appends ``KIND PATTERN N path`` (and the pids killed, for children) to the file named by
``KILL_AT_WRITE_LOG`` (when set), so a test can tell the kill happened rather than the run finishing.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import runpy
import signal
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and flags >= 0 and bool(flags & WRITE_FLAGS)


def _fd_path(fd) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else ""
    except OSError:
        return ""


def _children_running(script: str) -> list[int]:
    """This process's children whose command runs ``script`` (started with exec, not forked helpers such as
    data loader workers, whose command line is this process's)."""
    pids = []
    for children in glob.glob("/proc/self/task/*/children"):
        try:
            with open(children) as f:  # noqa: PTH123
                pids += [int(pid) for pid in f.read().split()]
        except OSError:  # the thread ended
            continue
    running = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:  # noqa: PTH123
                argv = [os.fsdecode(a) for a in f.read().split(b"\0")]
        except OSError:  # it ended
            continue
        if script in argv[1:3]:  # python SCRIPT ... or python -m MODULE ...
            running.append(pid)
    return running


def main() -> None:
    kind, pattern, nth, script, *args = sys.argv[1:]
    nth = int(nth)
    seen = 0
    killing = False
    armed = False  # the matching operation passed: kill at the next audited operation
    log_path = os.environ.get("KILL_AT_WRITE_LOG")
    children = os.environ.get("KILL_AT_WRITE_TARGET") == "children"
    # the other ranks' command: Lightning's, an absolute script path or the module
    ranks_run = args[0] if script == "-m" else os.path.abspath(script)

    def kill(path: str) -> None:
        nonlocal killing
        killing = True  # one kill point: the hook watches nothing more (nor its own reads here)
        victims = _children_running(ranks_run) if children else [os.getpid()]
        if not victims:
            return
        if log_path:
            with open(log_path, "a") as f:  # noqa: PTH123 - inside the hook: no further audit matters
                pids = f" (pids {' '.join(map(str, victims))})" if children else ""
                f.write(f"{kind} {pattern} {nth} {path}{pids}\n")
        for pid in victims:
            os.kill(pid, signal.SIGINT if kind == "interrupt" else signal.SIGKILL)

    def matches(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and fnmatch.fnmatch(os.fsdecode(path), pattern)

    listing = open(log_path, "a") if kind == "list" and log_path else None  # noqa: SIM115

    def hook(event: str, event_args: tuple) -> None:
        nonlocal seen, armed
        if killing:
            return
        if listing is not None:
            if event == "open" and len(event_args) >= 3 and _writes(*event_args[1:3]):
                path = event_args[0]
                listing.write(f"open {path if isinstance(path, int) else os.fsdecode(path)}\n")
            elif event == "os.rename":
                listing.write(f"rename {os.fsdecode(event_args[1])}\n")
            elif event == "fcntl.flock":
                listing.write(f"lock {_fd_path(event_args[0])}\n")
            listing.flush()
            return
        if armed:
            armed = False
            kill("(after)")
        if event == "open" and len(event_args) >= 3:
            path, mode, flags = event_args[:3]
            if kind in ("open", "written", "interrupt") and matches(path) and _writes(mode, flags):
                seen += 1
                if seen == nth:
                    if kind == "open":
                        kill(os.fsdecode(path))
                    armed = True
        elif event == "import" and kind == "import" and fnmatch.fnmatch(str(event_args[0]), pattern):
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGINT)
        elif event == "os.rename" and kind in ("rename", "renamed") and matches(event_args[1]):
            seen += 1
            if seen == nth:
                if kind == "rename":
                    kill(os.fsdecode(event_args[1]))
                armed = True
        elif event == "fcntl.flock" and kind == "lock":
            path = _fd_path(event_args[0])
            if matches(path):
                seen += 1
                if seen == nth:
                    kill(path)

    if script == "-m":
        module, *args = args
        sys.argv = [module, *args]
        sys.path.insert(0, os.getcwd())
        sys.addaudithook(hook)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.addaudithook(hook)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
