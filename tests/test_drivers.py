"""The driver interface under the gate, on each driver, against real PostgreSQL.

The protocol's own tests run over both drivers (the ``gate_driver`` fixture);
these pin down the few promises of :mod:`initgate.drivers` that the protocol
relies on without showing them.
"""

from __future__ import annotations

import asyncpg
import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import text

from initgate import Settings, connection
from initgate.drivers import (
    Driver,
    PsycopgSession,
    Record,
    Session,
    errors,
    sqlalchemy_connection,
    sqlstate,
)
from tests.helpers import DatabaseAdmin


async def open_session(database_url: str, driver: str) -> Session:
    settings = Settings(database_url=database_url, alembic_config=None)
    session: Session = await connection.connect(settings, driver=Driver(driver))
    return session


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_reads_take_dollar_parameters_and_rows_answer_by_name_and_index(
    database_url: str, driver: str
) -> None:
    session = await open_session(database_url, driver)
    try:
        row = await session.fetchrow(
            "SELECT $1::int AS a, $2::text AS b, $1 + 1", 4, "x"
        )
        rows = await session.fetch("SELECT g FROM generate_series(1, 3) g")
        tag = await session.execute("SELECT 1 WHERE false")
        assert await session.fetchval("SELECT pg_backend_pid()") == (
            session.get_server_pid()
        )
    finally:
        await session.close()

    assert (row[0], row["b"], row[2]) == (4, "x", 5)
    assert dict(row) == {"a": 4, "b": "x", "?column?": 5}
    assert [r["g"] for r in rows] == [1, 2, 3]
    assert tag == "SELECT 0"
    assert session.is_closed()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_idle_returns_at_a_notify_and_times_out_without_one(
    database_url: str, db: DatabaseAdmin, driver: str
) -> None:
    session = await open_session(database_url, driver)
    try:
        await session.listen("initgate_test")
        assert not await session.idle(0.2)
        await db.execute("NOTIFY initgate_test")
        assert await session.idle(10)
        # One sent during another query is not lost either.
        await db.execute("NOTIFY initgate_test")
        await session.fetchval("SELECT pg_sleep(0.2)")
        assert await session.idle(10)
    finally:
        await session.close()


async def test_psycopg_reads_between_sqlalchemy_transactions_leave_none_open(
    database_url: str, db: DatabaseAdmin
) -> None:
    session = await open_session(database_url, "psycopg")
    assert isinstance(session, PsycopgSession)
    try:
        async with sqlalchemy_connection(session) as sa:
            await sa.execute(text("CREATE TABLE t (id int)"))
            await sa.commit()
            # What the holder does between Alembic's transactions.
            assert await session.fetchval("SELECT count(*) FROM t") == 0
            status = session.connection.info.transaction_status
            assert status == TransactionStatus.IDLE
            await sa.execute(text("INSERT INTO t VALUES (1)"))
            await sa.rollback()
        assert session.connection.autocommit
        await session.execute("INSERT INTO t VALUES (2)")
    finally:
        await session.close()

    assert [r["id"] for r in await db.fetch("SELECT id FROM t")] == [2]


def test_errors_match_each_loaded_drivers_class_for_a_sqlstate() -> None:
    missing = errors("42P01")

    assert asyncpg.UndefinedTableError in missing
    assert psycopg.errors.UndefinedTable in missing
    assert sqlstate(psycopg.errors.UndefinedTable("no")) == "42P01"


def test_record_is_a_tuple_with_names() -> None:
    record = Record((1, "a"), {"id": 0, "name": 1})

    assert record == (1, "a")
    assert record["name"] == "a"
    assert record.get("missing", 7) == 7
    assert record.items() == [("id", 1), ("name", "a")]
