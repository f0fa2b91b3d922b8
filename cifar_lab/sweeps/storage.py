"""Where a study lives, and the storage object Optuna reads and writes it through.

``hydra.sweeper.storage``:

- ``null`` (default): an SQLite file, ``<sweep dir>/optuna.db`` (embedded, nothing to install);
- an RDB URL, e.g. ``postgresql://user:password@host/db`` for workers on many machines;
- ``journal:<file>``: Optuna's journal file storage, for a shared filesystem without a
  database server (``journal:`` alone: ``<sweep dir>/optuna.log``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna

from cifar_lab.errors import ConfigError

__all__ = ["JOURNAL_PREFIX", "resolve_storage", "open_storage", "dashboard_command"]

JOURNAL_PREFIX = "journal:"
DEFAULT_SQLITE = "optuna.db"
DEFAULT_JOURNAL = "optuna.log"


def resolve_storage(storage: str | None, sweep_dir: str | Path) -> str:
    """The storage setting with its defaults filled in and file paths made absolute."""
    if not storage:
        return f"sqlite:///{(Path(sweep_dir) / DEFAULT_SQLITE).resolve()}"
    storage = str(storage)
    if storage.startswith(JOURNAL_PREFIX):
        path = storage[len(JOURNAL_PREFIX):] or str(Path(sweep_dir) / DEFAULT_JOURNAL)
        return JOURNAL_PREFIX + str(Path(path).resolve())
    if "://" not in storage:
        raise ConfigError(f"hydra.sweeper.storage={storage!r} is neither an RDB URL (sqlite:///file.db, "
                          "postgresql://user@host/db) nor journal:<file>; or null for <sweep dir>/optuna.db")
    return storage


def _check_writable(path: Path, key: str) -> None:
    """A study file must be writable where it is (or can be created); refused in one line before any trial."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.exists() and not (path.is_file() and os.access(path, os.R_OK | os.W_OK)):
        raise ConfigError(f"hydra.sweeper.storage: {path} ({key}) is not a readable and writable file; fix its "
                          "permissions or choose another storage")
    if not path.exists() and not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise ConfigError(f"hydra.sweeper.storage: {path} ({key}) cannot be created in {folder}; choose a writable "
                          "place")


def _check_journal(path: Path) -> None:
    """An existing journal file must be one: its first line an Optuna journal record (nothing is appended
    to any other file)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise ConfigError(f"hydra.sweeper.storage=journal:{path}: that file exists and is not an Optuna journal; "
                          "nothing was written to it. Choose a new file, or journal: for <sweep dir>/optuna.log")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage for a resolved ``url`` (folders of file storages are created)."""
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):])
        _check_writable(path, "journal")
        _check_journal(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        _check_writable(Path(url[len("sqlite:///"):]), "SQLite")
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several worker processes write one file: wait for the lock rather than fail at once
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except (ImportError, ModuleNotFoundError) as err:
        raise ConfigError(f"hydra.sweeper.storage={url!r} needs a database driver: {err}") from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's connection errors, one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"hydra.sweeper.storage={url!r}: cannot open the study storage: {first}") from None


def dashboard_command(url: str) -> str:
    """The command that shows the study in a browser."""
    target = url[len(JOURNAL_PREFIX):] if url.startswith(JOURNAL_PREFIX) else url
    return f"optuna-dashboard {target}"
