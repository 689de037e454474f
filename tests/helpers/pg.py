"""A real PostgreSQL 15 server for the tests, started once per session in a temporary folder.

    from helpers.pg import postgres_url, new_database  # noqa: F401
    def test_x(postgres_url):
        url = new_database(postgres_url)       # a fresh, empty database on that server
        ...
        drop_database(postgres_url, url)       # optional; saves the server flushing it at shutdown

initdb + pg_ctl from /usr/lib/postgresql/15/bin (run as the `postgres` user when the tests run as root),
trust authentication for the user `tandem`, a free port on 127.0.0.1, stopped with `-m fast` at the end.
Skipped only when PostgreSQL 15 is not installed (Debian package `postgresql`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("TANDEM_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """postgresql://tandem@127.0.0.1:PORT/postgres of a server that lives for the whole session."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN / 'initdb'} missing; apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="tandem-pg-"))  # not pytest's tmp: its parents are private to root
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "db", root / "log"
    try:
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "tandem",
                                     "--no-sync", "-E", "UTF8", "--locale=C"]),
                       check=True, capture_output=True, timeout=60)
        started, proc = None, None
        for _ in range(3):  # the port may be taken between picking and binding it
            port = _free_port()
            proc = subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "30",
                                                "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]),
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                started = port
                break
        if started is None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{proc.stdout}{proc.stderr}\n{tail}")
        try:
            yield f"postgresql://tandem@127.0.0.1:{started}/postgres"
        finally:
            subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"]),
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def new_database(postgres_url: str, name: str | None = None) -> str:
    """Create an empty database on the session's server; returns its URL."""
    import psycopg

    name = name or f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_url.rsplit("/", 1)[0] + "/" + name


def drop_database(postgres_url: str, url: str) -> None:
    """Drop a database made by new_database, even with sessions still connected."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
