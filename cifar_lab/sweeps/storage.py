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
import tempfile
import urllib.parse
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


def _check_creatable(folder: Path, what: str, setting: str) -> None:
    """Files can be created in ``folder`` (a journal's lock file goes beside it): tried with a temporary file,
    since permissions do not tell (root; /proc and other virtual filesystems)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".cifar_lab_probe.", dir=folder)
    except OSError as err:
        raise ConfigError(f"hydra.sweeper.storage={setting}: {what} needs files created in {folder}, which refuses "
                          f"them ({err.strerror or err}); choose a file in a writable folder") from None
    os.close(fd)
    os.unlink(probe)


def _check_journal(path: Path) -> None:
    """An existing journal file must be one: a regular file whose first line is an Optuna journal record
    (nothing is appended to any other file; a virtual file such as /proc's reports size 0 and is read)."""
    if not path.exists():
        return
    if not path.is_file():
        raise ConfigError(f"hydra.sweeper.storage=journal:{path}: that is not a regular file; choose a new file, "
                          "or journal: for <sweep dir>/optuna.log")
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    if not first:
        return
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
        _check_creatable(path.parent, "a journal (and its lock file)", url)
        try:
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        except OSError as err:
            raise ConfigError(f"hydra.sweeper.storage={url}: cannot open the journal: {err.strerror or err} "
                              f"({err.filename or path}); choose a file in a writable folder") from None
    engine_kwargs = {}
    if url.startswith("sqlite:"):
        database = sqlite_file(url)
        if database is not None:
            _check_writable(database, "SQLite")
            database.parent.mkdir(parents=True, exist_ok=True)
        # several worker processes write one file: wait for the lock rather than fail at once
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except (ImportError, ModuleNotFoundError) as err:
        raise ConfigError(f"hydra.sweeper.storage={url!r} needs a database driver: {err}") from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's connection errors, one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"hydra.sweeper.storage={url!r}: cannot open the study storage: {first}") from None
    if url.startswith("sqlite:") and sqlite_file(url) is not None:  # (an in-memory database has one process)
        _write_locked_transactions(storage.engine)
    return storage


def _write_locked_transactions(engine) -> None:
    """Every transaction on this SQLite engine starts with ``BEGIN IMMEDIATE`` (the write lock).

    Optuna reads a trial and then changes it in one transaction (``SELECT ... FOR UPDATE``, which SQLite
    ignores): a worker taking a WAITING trial reads WAITING, then writes RUNNING. Under SQLite's default
    deferred transactions two workers both read WAITING before either writes, and both take the trial
    (9 of 60 trials taken twice by 4 racing workers, tests/sweeps/test_trial_claims.py). With the lock
    taken at the start, the second worker reads RUNNING. PostgreSQL honours FOR UPDATE; Optuna's
    journal storage orders its operations itself. (SQLAlchemy's recipe for pysqlite: its own implicit
    BEGIN off, the BEGIN emitted at the start of each transaction.)"""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, connection_record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made while Optuna set the storage up: reopened with the listeners


def sqlite_file(url: str) -> Path | None:
    """The file an ``sqlite:`` URL names, parsed as SQLAlchemy and SQLite parse it (None: in memory).

    ``sqlite:///relative.db``, ``sqlite:////absolute.db``, and SQLite URI filenames
    (``sqlite:///file:path.db?mode=rwc&uri=true``: the file is the URI's path, not a folder named
    ``file:``). A study needs to write: ``mode=ro`` and ``immutable`` are refused, as is a URI naming
    another host.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as err:
        raise ConfigError(f"hydra.sweeper.storage={url!r} is not a valid URL ({err}); e.g. sqlite:///optuna.db"
                          ) from None
    database = parsed.database or ""
    options = {k: str(v[-1] if isinstance(v, (tuple, list)) else v) for k, v in parsed.query.items()}
    if database.startswith("file:") and options.get("uri", "").lower() in ("true", "1", "yes", "on"):
        uri = urllib.parse.urlsplit(database)
        if uri.netloc not in ("", "localhost"):
            raise ConfigError(f"hydra.sweeper.storage={url!r}: an SQLite URI names a file on this machine "
                              f"(file:/path or file:path), not on {uri.netloc!r}")
        options.update({k: v[-1] for k, v in urllib.parse.parse_qs(uri.query).items()})
        database = urllib.parse.unquote(uri.path)
    if options.get("mode") == "ro" or options.get("immutable", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"hydra.sweeper.storage={url!r} opens the study read-only, and a sweep writes its "
                          "trials there: drop mode=ro/immutable from the URL")
    if options.get("mode") == "memory" or database in ("", ":memory:"):
        return None
    return Path(database).expanduser()


def dashboard_command(url: str) -> str:
    """The command that shows the study in a browser."""
    target = url[len(JOURNAL_PREFIX):] if url.startswith(JOURNAL_PREFIX) else url
    return f"optuna-dashboard {target}"
