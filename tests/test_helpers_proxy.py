"""The round-trip proxy counts what a real client sends to a real server.

These tests pin down asyncpg's own behaviour as well, since round-trip
budgets for initgate are stated in terms of these counts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import asyncpg
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from tests.helpers import RoundTripProxy


async def connect(proxy: RoundTripProxy, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.url_for(database))


async def test_connecting_costs_no_round_trip_after_authentication(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    conn = await connect(round_trip_proxy, database_name)
    await conn.close()

    [session] = round_trip_proxy.sessions
    assert session.user == round_trip_proxy.upstream.user
    assert session.database == database_name
    assert session.round_trips == 0
    assert session.queries == []
    assert session.closed


async def test_simple_query_is_one_round_trip(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    conn = await connect(round_trip_proxy, database_name)
    try:
        await conn.execute("SELECT 1")
    finally:
        await conn.close()

    [session] = round_trip_proxy.sessions
    assert session.round_trips == 1
    assert session.flushes == 0
    assert session.queries == ["SELECT 1"]


async def test_first_parameterised_query_waits_twice_but_syncs_once(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    conn = await connect(round_trip_proxy, database_name)
    try:
        assert await conn.fetchval("SELECT $1::int", 1) == 1
        first = round_trip_proxy.sessions[0]
        round_trip_proxy.reset()
        assert await conn.fetchval("SELECT $1::int", 2) == 2
        again = round_trip_proxy.sessions[0]
    finally:
        await conn.close()

    # asyncpg prepares an uncached statement with Parse, Describe and Flush,
    # waits for the parameter and row descriptions, and only then sends
    # Bind, Execute and Sync. One Sync, so one round trip by the Q + S
    # count, but two waits on the network.
    assert first.round_trips == 1
    assert first.flushes == 1
    assert first.network_round_trips == 2
    assert first.queries == ["SELECT $1::int"]
    assert set(first.message_types) == {"P", "D", "H", "B", "E", "S"}

    # The statement cache then serves it: Bind, Execute, Sync and no Parse.
    assert again.round_trips == 1
    assert again.flushes == 0
    assert again.queries == []


async def test_transaction_block_adds_a_round_trip_each_for_begin_and_commit(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    conn = await connect(round_trip_proxy, database_name)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1")
    finally:
        await conn.close()

    [session] = round_trip_proxy.sessions
    assert session.round_trips == 3
    assert session.queries == ["BEGIN;", "SELECT 1", "COMMIT;"]


async def test_executemany_pipelines_under_one_sync(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    conn = await connect(round_trip_proxy, database_name)
    try:
        await conn.execute("CREATE TABLE t (n int)")
        round_trip_proxy.reset()
        await conn.executemany("INSERT INTO t VALUES ($1)", [(1,), (2,), (3,)])
    finally:
        await conn.close()

    [session] = round_trip_proxy.sessions
    assert session.round_trips == 1
    assert session.message_types["E"] == 3


async def test_each_client_connection_is_counted_on_its_own(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    first = await connect(round_trip_proxy, database_name)
    second = await connect(round_trip_proxy, database_name)
    try:
        await first.execute("SELECT 1")
        await second.execute("SELECT 2")
        await second.execute("SELECT 3")
    finally:
        await first.close()
        await second.close()

    sessions = round_trip_proxy.sessions
    assert [s.round_trips for s in sessions] == [1, 2]
    assert [s.queries for s in sessions] == [["SELECT 1"], ["SELECT 2", "SELECT 3"]]
    assert round_trip_proxy.round_trips == 3


async def test_proxy_refuses_encryption_so_it_can_read_the_stream(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    # Over TCP asyncpg defaults to sslmode=prefer and asks first; the proxy
    # says no. With sslmode=disable in the DSN it does not even ask.
    preferring = await connect(round_trip_proxy, database_name)
    disabled = await asyncpg.connect(
        round_trip_proxy.url_for(database_name) + "?sslmode=disable"
    )
    await preferring.close()
    await disabled.close()

    assert [s.encryption_refused for s in round_trip_proxy.sessions] == [1, 0]


async def test_messages_larger_than_one_read_are_parsed_whole(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    literal = "x" * 300_000
    conn = await connect(round_trip_proxy, database_name)
    try:
        assert await conn.fetchval(f"SELECT length('{literal}')") == len(literal)
    finally:
        await conn.close()

    [session] = round_trip_proxy.sessions
    assert session.queries == [f"SELECT length('{literal}')"]


async def test_cancel_request_is_its_own_connection(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    conn = await connect(round_trip_proxy, database_name)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("SELECT pg_sleep(30)", timeout=0.2)
    finally:
        await conn.close()

    cancels = [c for c in round_trip_proxy.connections if c.cancel]
    assert len(cancels) == 1
    assert cancels[0].round_trips == 0
    assert len(round_trip_proxy.sessions) == 1


async def test_sqlalchemy_asyncpg_engine_works_through_the_url(
    round_trip_proxy: RoundTripProxy, database_name: str
) -> None:
    url = round_trip_proxy.url_for(database_name)
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with engine.connect() as conn:
            round_trip_proxy.reset()
            result = await conn.execute(sqlalchemy.text("SELECT 41 + 1"))
            assert result.scalar() == 42
    finally:
        await engine.dispose()

    # SQLAlchemy opens a transaction implicitly (simple-query BEGIN), then
    # runs the statement through asyncpg's prepared path.
    [session] = round_trip_proxy.sessions
    assert session.queries[:2] == ["BEGIN;", "SELECT 41 + 1"]


def test_proxy_keeps_forwarding_while_the_test_blocks(
    round_trip_proxy: RoundTripProxy,
) -> None:
    # This test blocks its thread, as a test waiting on a subprocess would.
    # The proxy runs its own loop in a thread, so the client still gets
    # through.
    async def query() -> int:
        conn = await asyncpg.connect(round_trip_proxy.url_for("postgres"))
        try:
            value: int = await conn.fetchval("SELECT 7")
            return value
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(asyncio.run, query()).result(timeout=30) == 7
    assert round_trip_proxy.sessions[0].database == "postgres"
