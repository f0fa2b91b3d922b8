"""A throw-away PostgreSQL server for tests: initdb into a temporary folder, start it, stop and delete it."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["postgres_bin", "postgres_server"]


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").is_file():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Yield the URL of a new server's ``postgres`` database (a Unix socket; no password).

    PostgreSQL refuses to run as root: as root the server runs as ``nobody`` in a folder it owns.
    """
    root = Path(tempfile.mkdtemp(prefix="cifar_lab_pg_"))
    as_root = os.geteuid() == 0
    user = "nobody" if as_root else None
    prefix = ["runuser", "-u", user, "--"] if as_root else []
    data, sockets = root / "data", root / "sock"
    try:
        sockets.mkdir()
        if as_root:
            root.chmod(0o755)
            shutil.chown(sockets, user)
            data.mkdir()
            shutil.chown(data, user)
        port = _free_port()
        run = dict(check=True, capture_output=True, text=True, timeout=120)
        subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "optuna"], **run)
        options = f"-p {port} -k {sockets} -c listen_addresses=''"
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                        str(sockets / "server.log"), "-w", "start"], **run)
        try:
            # the README's URL form (no driver named): SQLAlchemy picks psycopg 3, which the [optuna] extra installs
            yield f"postgresql://optuna@/postgres?host={sockets}&port={port}"
        finally:
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
