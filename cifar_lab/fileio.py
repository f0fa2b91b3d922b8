"""Safe file I/O: atomic writes (a reader or a crash never sees half a checkpoint or cache), and
pickles read without running code."""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the target's folder, fsync, then rename over the target.

    On any failure (a full disk, a read-only folder) the temporary file is removed, the target is
    left as it was, and the error is raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:  # never leave half a file behind; a failure to remove it must not hide the cause
            Path(tmp).unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


class RefusedPickle(pickle.UnpicklingError):
    """A pickle names something other than arrays and plain values."""


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings, bytes and numpy arrays, and nothing else.

    A pickle names the functions that rebuild its objects, and unpickling calls them: a
    crafted file runs any code it likes. Refusing every global but numpy's array
    reconstruction keeps a data file (a CIFAR batch, an input to predict) a data file.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise RefusedPickle(f"refusing to load {module}.{name} (only arrays and plain values are read)")


def load_array_pickle(raw: bytes) -> Any:
    """The object a pickle holds, read with :class:`ArrayUnpickler`.

    Raises :class:`RefusedPickle` for a pickle of other objects, ``pickle.UnpicklingError``
    (or another error) for one that is malformed.
    """
    return ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
