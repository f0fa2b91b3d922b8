"""Several worker processes for one sweep command, and the threads each may use.

``hydra.sweeper.n_workers=N``: the sweep command forks N-1 extra workers after it has opened the
study and filled its queue; each takes trials from the study until none is waiting (they share
nothing but the storage). Each worker's torch/OpenMP threads are limited to cores / (workers x
jobs per batch), so N workers on N cores do not oversubscribe the machine.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from cifar_lab.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["cpu_count", "limit_threads", "forked_workers"]

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def limit_threads(processes: int) -> int | None:
    """Give this process (and the job processes it starts) cores / ``processes`` threads; returns the count."""
    if processes <= 1:
        return None
    import torch

    threads = max(1, cpu_count() // processes)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    return threads


def _child(index: int, work: Callable[[int], None]) -> None:
    code = 0
    try:
        work(index)
    except BaseException:  # noqa: BLE001 - reported here; its trial is failed by its stale heartbeat
        log.exception("sweep worker %d stopped", index)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # not the parent's exit handlers (Hydra's end of the multirun)


@contextmanager
def forked_workers(n: int, work: Callable[[int], None]) -> Iterator[None]:
    """Run ``work(1)`` ... ``work(n)`` in forked processes around the block; waits for them at its end."""
    if n > 0 and "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigError("hydra.sweeper.n_workers > 1 needs fork (Linux or macOS); start one sweep "
                           "command per worker instead")
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_child, args=(i, work), name=f"sweep-worker-{i}") for i in range(1, n + 1)]
    for process in processes:
        process.start()
    try:
        yield
    finally:
        for process in processes:
            process.join()
            if process.exitcode:
                log.warning("sweep worker %s exited with code %s", process.pid, process.exitcode)
