"""Job states for ``hydra/launcher=slurm`` on clusters without accounting: squeue instead of a flood of sacct errors.

submitit asks ``sacct`` for the state of a sweep's jobs every few seconds. A cluster without accounting
storage (``AccountingStorageType=accounting_storage/none``, common on small clusters) answers each call
with an error, which submitit logs as a warning, so the sweep log fills with them. :class:`SlurmStatus`
(a Hydra callback in ``conf/hydra/default.yaml``) checks once, at the start of a SLURM sweep, whether
``sacct`` works; where it does not, submitit's job watcher asks ``squeue`` (slurmctld's own memory of
the jobs) instead and says so in one line. A job's result is read from its result file either way.
"""

from __future__ import annotations

import functools
import getpass
import logging
import shutil
import subprocess
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["SlurmStatus", "accounting_available", "use_squeue_without_accounting"]


def accounting_available() -> bool:
    """Whether ``sacct`` answers on this cluster (its accounting storage is configured)."""
    if shutil.which("sacct") is None:
        return False
    probe = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=60)
    return probe.returncode == 0


def use_squeue_without_accounting() -> bool:
    """Make submitit's SLURM job watcher use ``squeue`` when ``sacct`` does not work; True when it now does."""
    from submitit.slurm import slurm

    watcher = _squeue_watcher_class()
    if isinstance(slurm.SlurmJob.watcher, watcher) or accounting_available():
        return False
    slurm.SlurmJob.watcher = watcher(delay_s=slurm.SlurmJob.watcher._delay_s)
    return True


@functools.cache
def _squeue_watcher_class() -> type:
    """The watcher class, built on first use (submitit is imported only for SLURM sweeps)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):
        """submitit's watcher with ``squeue`` for ``sacct``: this user's jobs, finished ones included while
        slurmctld keeps them (MinJobAge), in sacct's ``JobID|State|NodeList`` layout."""

        def _make_command(self) -> list[str] | None:
            if super()._make_command() is None:
                return None
            return ["squeue", "-h", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%N"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)

    return SqueueWatcher


class SlurmStatus(Callback):
    """At the start of a sweep through ``hydra/launcher=slurm``: squeue for job states where sacct does not work."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if not target.endswith("SlurmLauncher"):
            return
        if use_squeue_without_accounting():
            log.info("this SLURM cluster keeps no accounting (sacct does not answer): job states come from squeue")
