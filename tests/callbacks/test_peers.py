"""A DDP run whose process died ends with the main thread's one message, not killed by Lightning's watcher."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.strategies.launchers import subprocess_script

from cifar_lab.callbacks import peers


class _Dead:
    """A child process that was killed (what Popen.poll reports)."""

    pid = 12345
    returncode = -9

    def poll(self) -> int:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        _Dead.signalled = signum


def test_the_watcher_waits_for_the_main_thread_before_killing(monkeypatch) -> None:
    """The watcher finds the dead process, then gives the main thread the collective timeout's grace to
    end the run with its message; only a run still alive after it is killed, as Lightning's watcher would."""
    events: list = []
    monkeypatch.setattr(subprocess_script, "_launch_process_observer", subprocess_script._launch_process_observer)
    peers.let_the_main_thread_report(grace_s=360.0)
    started = []
    monkeypatch.setattr("threading.Thread.start", lambda self: started.append(self))
    subprocess_script._launch_process_observer([_Dead()])
    (observer,) = started
    monkeypatch.setattr("time.sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(os, "kill", lambda pid, signum: events.append(("kill", pid, signum)))
    assert observer._run() is True  # it found the dead child and "terminated all"
    assert events == [("sleep", 360.0), ("kill", os.getpid(), signal.SIGKILL)]
    assert _Dead.signalled == signal.SIGKILL
