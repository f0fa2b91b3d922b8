"""A run directory's integrity: one writer at a time, nothing written before a run is accepted.

A run directory is the record of a training run (see :mod:`cifar_lab.checkpoints`). Three
rules keep it intact:

* **One writer.** :class:`RunDirLock` holds an exclusive ``flock`` on the run directory for
  the whole run; a second process aiming at the same directory is refused at once with the
  holder's PID. The operating system drops the lock when its process dies (kill -9
  included), and taking it writes nothing.
* **No write through a link.** :func:`refuse_symlinks` refuses a directory holding a
  symbolic link before anything is written.
* **Nothing written before the run is accepted.** Hydra's own copies of the config
  (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``) are switched off
  (``hydra.output_subdir: null``) and written by :func:`save_hydra_files` once the config
  is valid, the resume is allowed and the lock is held; a refused command leaves an
  existing directory byte for byte as it was.
* **Portable.** Paths recorded inside the directory (``metrics.json``'s ``best_ckpt``) are
  relative to it (:func:`relative_to_run`), so a copied or moved run uses its own files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from omegaconf import DictConfig, OmegaConf

from cifar_lab.errors import UserError
from cifar_lab.fileio import atomic_write_text

__all__ = ["RunDirBusy", "DiskFull", "UnsafeRunDir", "RunDirLock", "is_locked", "holds_run", "refuse_symlinks",
           "save_hydra_files", "relative_to_run", "disk_full_error"]


class RunDirBusy(UserError):
    """Another process is writing the same run directory."""


class UnsafeRunDir(UserError):
    """A run directory that cannot be written safely (a symbolic link inside it)."""


class DiskFull(UserError):
    """A write failed for lack of space; the message names the path, the free space and what survived."""


def holds_run(run_dir: Path, results_only: bool = False) -> bool:
    """True when ``run_dir`` already holds (part of) a run: its config, checkpoints or metrics
    (``results_only``: a checkpoint file or metrics.json, what a new run would replace)."""
    run_dir = Path(run_dir)
    if results_only:
        return (run_dir / "metrics.json").exists() or any((run_dir / "checkpoints").glob("*.ckpt"))
    return any((run_dir / name).exists() for name in (".hydra/config.yaml", "checkpoints", "metrics.json"))


class RunDirLock:
    """An exclusive lock on a run directory for the life of this process (or until :meth:`release`).

    The lock is an ``flock`` on the directory itself, so taking it writes nothing: a command that
    is refused later leaves the directory as it was. The holder's PID, for the message a second
    writer gets, is read from ``/proc/locks``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _lock_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusy(
                f"run directory {self.run_dir} is in use by process {holder}; wait for that run to finish, or give "
                "this run its own directory (leave hydra.run.dir out, or choose another)"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def is_locked(run_dir: Path) -> bool:
    """Whether a process holds ``run_dir``'s lock (a run writing it now); takes nothing, writes nothing."""
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """The PID holding an flock on ``fd``'s file, from /proc/locks (Linux), else "unknown"."""
    inode = os.fstat(fd).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return fields[4]
    return "unknown"


def refuse_symlinks(run_dir: Path) -> None:
    """Refuse a run directory holding a symbolic link anywhere inside it (a write would follow it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for folder, dirs, files in os.walk(run_dir):
        for name in (*dirs, *files):
            path = Path(folder) / name
            if path.is_symlink():
                raise UnsafeRunDir(
                    f"{path} is a symbolic link (to {os.readlink(path)}); cifar-lab writes run directories only "
                    "through their own files. Remove the link, or use a new run directory"
                )


def save_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """Write ``.hydra/config.yaml``, ``overrides.yaml`` and ``hydra.yaml`` as Hydra would have.

    Called once a run has been accepted (see the module docstring); outside a Hydra job
    (a direct ``train(cfg)`` call) only the config is written.
    """
    from hydra.core.hydra_config import HydraConfig

    folder = Path(run_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create([str(o) for o in hydra_cfg.overrides.task])))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))


def relative_to_run(path: str | Path | None, run_dir: Path) -> str:
    """``path`` relative to ``run_dir`` when it lies inside it, else as given ("" for none)."""
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(path)


def _is_disk_full(err: BaseException) -> bool:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        # torch's zip writer reports a short write as "unexpected pos ..." (a full disk)
        if "No space left on device" in text or "unexpected pos" in text:
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def disk_full_error(err: BaseException, where: Path, last_good: str | None) -> DiskFull | None:
    """A :class:`DiskFull` for ``err`` when it is a full disk (else ``None``), naming path, space and survivor."""
    if not _is_disk_full(err):
        return None
    target = Path(getattr(err, "filename", None) or where)
    probe = target if target.exists() else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    survivor = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return DiskFull(
        f"no space left on the device while writing {target} ({free / 2**20:,.0f} MiB free on that filesystem); "
        f"{survivor}. Free some space, then resume with ckpt_path=last hydra.run.dir={where}"
    )
