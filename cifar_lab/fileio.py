"""Safe file I/O: atomic writes (a reader or a crash never sees half a checkpoint or cache), and
pickles read without running code."""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the body has written it, rename it over ``path``.

    A reader, a crash or ``kill -9`` never sees half a file: until the rename the previous file is
    intact, and on any failure (a full disk, an error while writing, Ctrl-C) the temporary file is
    removed and the target left as it was. The rename replaces a symbolic link at ``path`` rather
    than writing through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
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


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files :func:`atomic_output` left in ``folder`` and its subfolders when its process
    was killed (``.<name>.<random>.tmp``); only for a folder no other process writes (its run lock held)."""
    removed = []
    for tmp in Path(folder).rglob(".*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_output` (a checkpoint is whole or absent)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def check_output(out: str | Path, inputs: tuple[str | Path | None, ...] = (), example: str = "out.csv") -> Path:
    """Refuse an output path that cannot be written or that is one of the command's ``inputs``,
    before any work is done; returns it as a Path."""
    from cifar_lab.errors import InputError

    out = Path(str(out)).expanduser()
    if out.is_dir():
        raise InputError(f"output={out} is a directory; give a file name, e.g. output={out / example}")
    for given in inputs:
        if given and (same_file(out, given) or out.resolve() == Path(str(given)).expanduser().resolve()):
            raise InputError(f"output={out} is this command's input {given}; writing it would destroy the input: "
                             "choose another output path")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output={out}: {parent} is a file, not a directory; choose another output path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output={out}: the directory {parent} is not writable; choose another output path")
    return out


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one existing file (through links and relative parts)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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
