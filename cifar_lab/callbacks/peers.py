"""A DDP process that died (kill -9, out of memory, a lost node) ends the whole run with one message.

When one process of a DDP run dies, the others fail in their next collective: at once when its
connections close (gloo: "Connection closed by peer"), or after the process group's timeout when it
stops answering without closing them (a frozen process, a network partition). That timeout is
``trainer.process_group_timeout_s`` in ``conf/trainer/ddp.yaml`` and ``ddp_cpu.yaml`` (300 s; torch's
default would be 30 minutes), applied by ``builders.build_trainer``. :func:`peer_lost_error` turns such a
failure into a :class:`~cifar_lab.errors.PeerLost` naming the dead rank, where it is known, and the
command that resumes the run from its last checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from cifar_lab.errors import PeerLost

__all__ = ["peer_lost_error", "let_the_main_thread_report"]

# what torch's gloo and NCCL backends and its store say when a peer process is gone or silent
_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|timed out|Timed out|"
                   r"Socket Timeout|remote worker crash|NCCL communicator was aborted|DistNetworkError")


def _is_peer_failure(err: BaseException) -> bool:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in ("DistBackendError", "DistNetworkError") or (
                isinstance(err, RuntimeError) and _LOST.search(str(err))):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def _dead_ranks(trainer: Any) -> list[str]:
    """The ranks known to have died: children of Lightning's launcher that exited, else the one other rank."""
    launcher = getattr(trainer.strategy, "launcher", None)
    devices = max(int(getattr(trainer, "num_devices", 1) or 1), 1)
    dead = []
    for local_rank, proc in enumerate(getattr(launcher, "procs", []) or [], start=1):
        code = proc.poll()
        if code is not None:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            dead.append(f"rank {trainer.node_rank * devices + local_rank} (pid {proc.pid}, {how})")
    if not dead and trainer.world_size == 2:
        dead.append(f"rank {1 - trainer.global_rank}")
    return dead


def peer_lost_error(err: BaseException, trainer: Any, run_dir: Path, last_good: str | None) -> PeerLost | None:
    """A :class:`PeerLost` for ``err`` when it is a failed collective of a multi-process run, else None."""
    if trainer is None or getattr(trainer, "world_size", 1) <= 1 or not _is_peer_failure(err):
        return None
    dead = _dead_ranks(trainer)
    who = " and ".join(dead) if dead else "another process"
    reason = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\]\s*", "", " ".join(str(err).split()))  # no source locations
    reason = reason.split(". This is typically")[0][:160]
    kept = f"the last checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return PeerLost(
        f"{who} of the {trainer.world_size} processes of this run stopped ({reason}); rank {trainer.global_rank} "
        f"stopped too instead of waiting; {kept}. Resume every process with the same command plus "
        f"ckpt_path=last hydra.run.dir={run_dir}"
    )


def let_the_main_thread_report(grace_s: float) -> None:
    """Lightning's launcher watches the processes it started, and within 5 s of one dying it SIGKILLs
    the others and itself. That races the main thread, whose next collective fails at once when the
    dead process's connections close and ends the run with :func:`peer_lost_error`'s message: under
    load the watcher won and the run ended killed, without a word. Here the watcher still finds the
    dead process but kills only a run whose main thread has not ended within ``grace_s`` (the
    collective timeout and a margin: a frozen process)."""
    import time

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    from lightning.pytorch.strategies.launchers import subprocess_script

    class PatientObserver(_ChildProcessObserver):
        def _terminate_all(self) -> None:
            time.sleep(grace_s)  # a daemon thread: it ends with the process when the main thread ends the run
            super()._terminate_all()

    def launch_observer(child_processes: list) -> None:
        PatientObserver(main_pid=os.getpid(), child_processes=child_processes).start()

    subprocess_script._launch_process_observer = launch_observer
