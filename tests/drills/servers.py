"""PostgreSQL servers that a drill may stop, restart, starve or cut off.

The session's server (``pg_server``) is shared by every test, so nothing may
break it. Drills that restart PostgreSQL, limit its connections, make it
listen on a network namespace's link or need password authentication get a
:class:`DrillPostgres` of their own, built from the machine's PostgreSQL 15
binaries like ``INITGATE_TEST_PG=15`` does.

Authentication on such a server: the superuser ``postgres`` is trusted from
127.0.0.1 only (the drill's own admin connections); every other role logs in
with a SCRAM password from anywhere, so a wrong password really fails and a
right one really travels the wire.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from tests.helpers import SystemPostgres, find_pg_bindir, free_port, with_database

__all__ = [
    "CANARY",
    "DRILL_ROLE",
    "DrillPostgres",
    "drill_postgres",
    "require_pg_bindir",
]

DRILL_MAJOR = "15"

CANARY = "Canary-7Qx!pw#drill"
"""The drill role's password: no log, message, output or stored row may hold it.

Its ``#`` and ``!`` make it need quoting in a URL, which is where leaks
through hand-built strings usually show.
"""

DRILL_ROLE = "drill"
"""A login role without superuser rights that owns the drills' databases."""


def require_pg_bindir() -> Path:
    """The PostgreSQL 15 binaries, or skip the test saying what is missing."""
    bindir = find_pg_bindir(DRILL_MAJOR)
    if bindir is None:
        pytest.skip(
            f"needs PostgreSQL {DRILL_MAJOR} server binaries "
            f"(/usr/lib/postgresql/{DRILL_MAJOR}/bin; apt-get install "
            f"postgresql-{DRILL_MAJOR}) for a server it may stop and restart"
        )
    return bindir


class DrillPostgres(SystemPostgres):
    """A :class:`SystemPostgres` a drill owns: extra settings, restarts, SCRAM.

    Args:
        bindir: The server binaries.
        listen: Addresses to listen on; 127.0.0.1 is always among them.
        settings: Extra ``postgresql.conf`` lines, e.g. ``{"max_connections":
            "50"}``.
    """

    def __init__(
        self,
        bindir: Path,
        *,
        listen: Sequence[str] = (),
        settings: dict[str, str] | None = None,
    ) -> None:
        super().__init__(bindir)
        self.listen = ["127.0.0.1", *listen]
        self.settings = dict(settings or {})

    def _configure(self, port: int) -> None:
        super()._configure(port)
        lines = [f"listen_addresses = '{','.join(self.listen)}'"]
        lines += [f"{name} = {value}" for name, value in self.settings.items()]
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n".join(lines) + "\n")
        # First match wins: the admin is trusted on loopback, anyone else
        # must present a SCRAM password, from wherever it connects.
        (self.data_dir / "pg_hba.conf").write_text(
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 0.0.0.0/0 scram-sha-256\n"
        )

    def prepare(self) -> int:
        """Run initdb and configure a port, without starting; return the port.

        For drills where workers start before PostgreSQL does. Call
        :meth:`launch` to start it.
        """
        if self._owner is not None:
            os.chown(self.base_dir, self._owner.pw_uid, self._owner.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        port = free_port()
        self._configure(port)
        self.port = port
        return port

    def launch(self) -> None:
        """Start the server on its configured port; return once it accepts."""
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path))
        self._wait_until_accepting(60.0)

    def shutdown(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data directory, so it can start again.

        Args:
            mode: ``fast`` (terminate sessions, clean shutdown) or
                ``immediate`` (no shutdown checkpoint, like a crash).
        """
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w")

    def _wait_until_accepting(self, timeout: float) -> None:
        # pg_ctl -w would do, but it waits with 1 s sleeps; a drill that
        # measures recovery wants to know within a few milliseconds.
        deadline = time.monotonic() + timeout
        while True:
            result = self._try_pg_isready()
            if result:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL did not accept connections within {timeout} s;"
                    f" its log:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def _try_pg_isready(self) -> bool:
        try:
            self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1")
        except RuntimeError:
            return False
        return True

    def role_url(
        self, database: str, role: str = DRILL_ROLE, password: str = CANARY
    ) -> str:
        """A URL for ``role`` with its password on ``database``."""
        assert self.port is not None
        return (
            f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}"
            f"@127.0.0.1:{self.port}/{quote(database)}"
        )

    def admin_url_for(self, database: str) -> str:
        """The trusted superuser's URL for ``database``."""
        return with_database(self.admin_url, database)

    async def create_role(
        self, role: str = DRILL_ROLE, password: str = CANARY, *, extra: str = ""
    ) -> None:
        """Create a login role with a SCRAM password (quoted safely)."""
        conn = await asyncpg.connect(self.admin_url)
        try:
            literal = "'" + password.replace("'", "''") + "'"
            await conn.execute(
                f'CREATE ROLE "{role}" LOGIN PASSWORD {literal} {extra}'.strip()
            )
        finally:
            await conn.close()

    async def create_database(self, name: str, owner: str = DRILL_ROLE) -> str:
        """Create ``name`` owned by ``owner``; return its name."""
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        finally:
            await conn.close()
        return name


@contextlib.contextmanager
def drill_postgres(
    *, listen: Sequence[str] = (), settings: dict[str, str] | None = None
) -> Iterator[DrillPostgres]:
    """A started :class:`DrillPostgres`, stopped and deleted afterwards."""
    server = DrillPostgres(require_pg_bindir(), listen=listen, settings=settings)
    try:
        server.start()
        yield server
    finally:
        server.stop()
