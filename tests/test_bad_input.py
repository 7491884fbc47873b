"""Bad input: each mistake gives one clear line, no password, nothing half-written.

Malformed URLs, a closed port, a failing migration or seed step and hostile
namespace or schema names are covered in ``test_settings.py`` and
``test_gate.py``; this module covers the rest. Cases that need password
authentication, or roles with fewer rights than the session server's
superuser, use a PostgreSQL 15 of their own with SCRAM (skipped without the
binaries), whose roles all carry the canary password.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate import (
    ConfigurationError,
    DatabaseUnavailableError,
    InitGate,
    InitGateError,
    Settings,
)
from tests.drills.servers import CANARY, DrillPostgres, drill_postgres
from tests.helpers import DatabaseAdmin
from tests.project import Project, Revision, make_gate

# Each case over asyncpg and over psycopg: each driver words its errors in
# its own way, and the gate must turn both into the same clear line.
pytestmark = pytest.mark.usefixtures("gate_driver")

ITEMS = Revision.sql("r1_items", "CREATE TABLE items (id int)")


def assert_one_clear_line(error: BaseException, *expected: str) -> str:
    """The error is initgate's, one line, names what is wrong, shows no secret."""
    message = str(error)
    assert isinstance(error, InitGateError), f"{type(error).__name__}: {message}"
    assert "\n" not in message, message
    assert CANARY not in message
    for part in expected:
        assert part in message, message
    return message


@pytest.fixture(scope="module")
def scram_server() -> Iterator[DrillPostgres]:
    with drill_postgres() as server:
        yield server


@pytest.fixture(scope="module")
async def scram_roles(scram_server: DrillPostgres) -> DrillPostgres:
    """Roles ``drill`` (owns databases), ``reader`` (no CREATE), ``replica``."""
    await scram_server.create_role()
    await scram_server.create_role("reader", CANARY)
    await scram_server.create_role("replica", CANARY)
    # What a hot standby's sessions look like to a client: every
    # transaction read-only.
    await DatabaseAdmin(scram_server.admin_url).execute(
        "ALTER ROLE replica SET default_transaction_read_only = on"
    )
    return scram_server


@pytest.fixture
async def scram_database(scram_roles: DrillPostgres) -> AsyncIterator[str]:
    name = await scram_roles.create_database(f"bad_{uuid.uuid4().hex[:12]}")
    yield name
    await DatabaseAdmin(scram_roles.admin_url).execute(
        f'DROP DATABASE "{name}" WITH (FORCE)'
    )


async def nothing_written(server: DrillPostgres, database: str) -> bool:
    admin = DatabaseAdmin(server.admin_url_for(database))
    tables = await admin.fetchval(
        "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
        "('pg_catalog', 'information_schema')"
    )
    return bool(tables == 0)


async def test_wrong_password_is_a_configuration_error_without_the_password(
    scram_roles: DrillPostgres, scram_database: str, tmp_path: Path
) -> None:
    url = scram_roles.role_url(scram_database, password="not-" + CANARY)
    gate = make_gate(url, Project(tmp_path / "p").add(ITEMS))

    with pytest.raises(ConfigurationError) as raised:
        await asyncio.wait_for(gate.run(), 30)

    assert_one_clear_line(raised.value, "password authentication failed", "***")
    assert await nothing_written(scram_roles, scram_database)


async def test_missing_database_is_named(scram_roles: DrillPostgres) -> None:
    gate = make_gate(scram_roles.role_url("no_such_db"), None)

    with pytest.raises(ConfigurationError) as raised:
        await asyncio.wait_for(gate.run(), 30)

    assert_one_clear_line(raised.value, "no_such_db", "does not exist")


async def test_unknown_host_fails_after_the_connect_deadline() -> None:
    url = f"postgresql://app:{CANARY}@no-such-host.invalid:5432/app"
    gate = InitGate(Settings(database_url=url, alembic_config=None, connect_timeout=1))

    with pytest.raises(DatabaseUnavailableError) as raised:
        await asyncio.wait_for(gate.run(), 30)

    assert_one_clear_line(raised.value, "no-such-host.invalid", "CONNECT_TIMEOUT")


class GarbageServer:
    """A TCP server that answers anything with bytes PostgreSQL never sends."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                client.recv(1024)
                client.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\nnot postgres\r\n")

    def close(self) -> None:
        self.sock.close()


async def test_a_port_that_is_not_postgresql_fails_in_one_line() -> None:
    garbage = GarbageServer()
    try:
        url = f"postgresql://app:{CANARY}@127.0.0.1:{garbage.port}/app"
        gate = InitGate(
            Settings(database_url=url, alembic_config=None, connect_timeout=2)
        )
        with pytest.raises(InitGateError) as raised:
            await asyncio.wait_for(gate.run(), 30)
    finally:
        garbage.close()

    assert_one_clear_line(raised.value, f"127.0.0.1:{garbage.port}")


async def test_missing_alembic_ini_is_named_before_connecting(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "alembic.ini"
    with pytest.raises(ConfigurationError) as raised:
        await make_gate(f"postgresql://u:{CANARY}@127.0.0.1:1/db", missing).run()

    assert_one_clear_line(raised.value, str(missing), "INITGATE_ALEMBIC_CONFIG")


async def test_wrong_script_location_is_named(
    database_url: str, tmp_path: Path, db: DatabaseAdmin
) -> None:
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {tmp_path / 'no_migrations'}\n")

    with pytest.raises(ConfigurationError) as raised:
        await make_gate(database_url, ini).run()

    assert_one_clear_line(raised.value, "no_migrations")
    assert await db.fetchval("SELECT to_regclass('init_runs')") is None


async def test_migration_with_a_syntax_error_is_named(
    database_url: str, tmp_path: Path, db: DatabaseAdmin
) -> None:
    project = Project(tmp_path / "p").add(ITEMS)
    (project.versions / "r1_items.py").write_text("def upgrade(:\n    pass\n")

    with pytest.raises(ConfigurationError) as raised:
        await make_gate(database_url, project).run()

    assert_one_clear_line(raised.value, "SyntaxError")
    assert await db.fetchval("SELECT to_regclass('init_runs')") is None


def test_two_seed_steps_with_one_name_are_refused_at_registration() -> None:
    gate = InitGate(Settings(database_url="postgresql://u@h/db", alembic_config=None))

    @gate.seed("countries", version=1)
    async def first(conn: AsyncConnection) -> None: ...

    with pytest.raises(ConfigurationError) as raised:

        @gate.seed("countries", version=2)
        async def second(conn: AsyncConnection) -> None: ...

    assert_one_clear_line(raised.value, "two seed steps are named 'countries'")


async def test_role_without_create_rights_fails_in_one_line_writing_nothing(
    scram_roles: DrillPostgres, scram_database: str, tmp_path: Path
) -> None:
    url = scram_roles.role_url(scram_database, role="reader")
    gate = make_gate(url, Project(tmp_path / "p").add(ITEMS))

    with pytest.raises(InitGateError) as raised:
        await asyncio.wait_for(gate.run(), 30)

    assert_one_clear_line(raised.value, "permission denied")
    assert await nothing_written(scram_roles, scram_database)


async def test_read_only_session_fails_in_one_line_writing_nothing(
    scram_roles: DrillPostgres, scram_database: str, tmp_path: Path
) -> None:
    url = scram_roles.role_url(scram_database, role="replica")
    gate = make_gate(url, Project(tmp_path / "p").add(ITEMS))

    with pytest.raises(InitGateError) as raised:
        await asyncio.wait_for(gate.run(), 30)

    assert_one_clear_line(raised.value, "read-only")
    assert await nothing_written(scram_roles, scram_database)
