"""The PostgreSQL fixtures give each test its own database and count its DDL."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import pytest

from tests import conftest
from tests.helpers import DatabaseAdmin, DdlLog, SystemPostgres, find_pg_bindir

# Shared between the two cases of the isolation test below, in run order.
_seen_databases: list[str] = []
_left_open: list[asyncpg.Connection] = []


@pytest.mark.parametrize("case", ["first", "second"])
async def test_each_test_gets_a_fresh_empty_database(
    case: str,
    pg_server: conftest.PgServer,
    database_name: str,
    database_url: str,
    db: DatabaseAdmin,
) -> None:
    assert database_url.startswith("postgresql://")
    assert await db.fetchval("SELECT current_database()") == database_name
    tables = await db.fetchval(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
    )
    assert tables == 0

    # Databases of earlier tests are gone, even the one whose session this
    # test left open on purpose: teardown drops WITH (FORCE).
    assert database_name not in _seen_databases
    admin = DatabaseAdmin(pg_server.admin_url)
    leftovers = await admin.fetchval(
        "SELECT count(*) FROM pg_database WHERE datname = ANY($1::text[])",
        _seen_databases,
    )
    assert leftovers == 0
    for conn in _left_open:
        conn.terminate()
    _left_open.clear()

    _seen_databases.append(database_name)
    await db.execute("CREATE TABLE leftover (n int)")
    if case == "first":
        _left_open.append(await asyncpg.connect(database_url))


async def test_ddl_log_counts_a_create_table_once(
    ddl_log: DdlLog, db: DatabaseAdmin
) -> None:
    await db.execute("CREATE TABLE items (id int PRIMARY KEY)")

    assert await ddl_log.count("CREATE TABLE", "items") == 1
    assert await ddl_log.count("CREATE TABLE", "public.items") == 1
    assert await ddl_log.count("CREATE TABLE", "other") == 0
    # The primary key's index is a command of its own, logged as such.
    assert await ddl_log.count("CREATE INDEX") == 1


async def test_ddl_log_skips_ddl_that_was_rolled_back(
    ddl_log: DdlLog, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("CREATE TABLE doomed (n int)")
        await transaction.rollback()
    finally:
        await conn.close()

    assert await ddl_log.count("CREATE TABLE", "doomed") == 0


async def test_ddl_log_sees_create_index_concurrently(
    ddl_log: DdlLog, db: DatabaseAdmin, database_url: str
) -> None:
    await db.execute("CREATE TABLE items (n int)")
    # CONCURRENTLY refuses to run in a transaction block, so this goes
    # through the simple-query path of a plain connection.
    conn = await asyncpg.connect(database_url)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("CREATE INDEX CONCURRENTLY items_n ON items (n)")
    finally:
        await conn.close()

    assert await ddl_log.count("CREATE INDEX", "items_n") == 1
    [entry] = [e for e in await ddl_log.entries() if e.command_tag == "CREATE INDEX"]
    assert entry.object_type == "index"
    assert entry.backend_pid == pid


async def test_ddl_log_keeps_the_order_and_backend_of_each_command(
    ddl_log: DdlLog, db: DatabaseAdmin
) -> None:
    await db.execute("CREATE TABLE a (n int)")
    await db.execute("ALTER TABLE a ADD COLUMN m int")
    await db.execute("DROP TABLE a")

    entries = await ddl_log.entries()
    assert [e.command_tag for e in entries] == ["CREATE TABLE", "ALTER TABLE"]
    # DROP is reported by sql_drop, not by pg_event_trigger_ddl_commands(),
    # so it does not show up here: the log is for what gets created or
    # changed.
    assert entries[0].backend_pid != entries[1].backend_pid
    assert entries[0].logged_at < entries[1].logged_at


def test_environment_guard_hides_stray_database_settings() -> None:
    for name in ("DATABASE_URL", "PGHOST", "PGPASSWORD", "INITGATE_DATABASE_URL"):
        assert conftest._STRAY_VARIABLES.match(name), name
        assert name not in os.environ
    for name in ("INITGATE_TEST_PG", "INITGATE_TEST_DATABASE_URL", "PATH"):
        assert not conftest._STRAY_VARIABLES.match(name), name


async def test_system_postgres_15_starts_and_answers() -> None:
    bindir = find_pg_bindir("15")
    if bindir is None:
        pytest.skip("no PostgreSQL 15 server binaries on this machine")
    server = SystemPostgres(bindir)
    base_dir: Path = server.base_dir
    try:
        server.start()
        conn = await asyncpg.connect(server.admin_url)
        try:
            version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
    finally:
        server.stop()

    assert version.startswith("15.")
    assert not base_dir.exists()
