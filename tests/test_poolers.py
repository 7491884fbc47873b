"""PgBouncer in front of PostgreSQL: which pooling modes the gate can work through.

A session-level advisory lock lives in one backend. PgBouncer in session mode
gives each client one backend for its whole connection, so the lock holds; in
transaction mode the client's backend changes between transactions, and the
backend that took the lock goes back to the pool still holding it. The gate
must work through the first, refuse the second with a clear
UnsupportedConnectionError before writing anything, and work when only the
app's traffic goes through the pooler while ``INITGATE_GATE_DATABASE_URL``
points at PostgreSQL itself.

Every test runs a real PgBouncer (Debian's ``pgbouncer`` package) in front of
a PostgreSQL 15 server of this module's own; without either, they are skipped
and say what to install.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from initgate import (
    InitGate,
    Outcome,
    Settings,
    UnsupportedConnectionError,
    WaitTimeoutError,
)
from tests.conftest import SpawnPython, StartUvicorn
from tests.deployment import ListeningPostgres, PgBouncer, find_pgbouncer
from tests.helpers import (
    REPO_ROOT,
    DatabaseAdmin,
    DdlLog,
    UvicornServer,
    find_pg_bindir,
)
from tests.test_workers import PASS_DEMO_GATE, assert_demo_initialised_once

PG_MAJOR = "15"


@pytest.fixture(scope="module")
def bouncer_executable() -> str:
    found = find_pgbouncer()
    if found is None:
        pytest.skip("needs PgBouncer (apt-get install pgbouncer)")
    return found


@pytest.fixture(scope="module")
def upstream() -> Iterator[ListeningPostgres]:
    """The PostgreSQL server behind every PgBouncer in this module."""
    bindir = find_pg_bindir(PG_MAJOR)
    if bindir is None:
        pytest.skip(
            f"needs PostgreSQL {PG_MAJOR} server binaries "
            f"(apt-get install postgresql-{PG_MAJOR})"
        )
    server = ListeningPostgres(bindir, settings={"max_connections": "200"})
    try:
        server.start()
        yield server
    finally:
        server.stop()


# Over asyncpg and over psycopg: PgBouncer refuses some startup parameters
# of each, in its own way.
pytestmark = pytest.mark.usefixtures("gate_driver")

MakeBouncer = Callable[[str], PgBouncer]


@pytest.fixture
def pgbouncer(
    bouncer_executable: str, upstream: ListeningPostgres
) -> Iterator[MakeBouncer]:
    """A factory: ``pgbouncer("transaction")`` starts one in that pool mode."""
    started: list[PgBouncer] = []

    def make(pool_mode: str) -> PgBouncer:
        assert upstream.port is not None
        bouncer = PgBouncer(bouncer_executable, upstream.port, pool_mode)
        started.append(bouncer)
        bouncer.start()
        return bouncer

    yield make
    for bouncer in started:
        bouncer.stop()


@pytest.fixture
async def fresh_database(upstream: ListeningPostgres) -> AsyncIterator[str]:
    """A new, empty database on the upstream server; its name."""
    name = f"p_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(upstream.url("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield name
    admin = await asyncpg.connect(upstream.url("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def direct_db(upstream: ListeningPostgres, fresh_database: str) -> DatabaseAdmin:
    """SQL on the fresh database, straight to PostgreSQL (no pooler)."""
    return DatabaseAdmin(upstream.url(fresh_database))


@pytest.fixture
async def direct_ddl_log(direct_db: DatabaseAdmin) -> DdlLog:
    log = DdlLog(direct_db)
    await log.install()
    return log


async def assert_nothing_written(db: DatabaseAdmin, ddl_log: DdlLog) -> None:
    """No DDL reached the database, and the ledger was never created."""
    assert await ddl_log.entries() == []
    assert await db.fetchval("SELECT to_regclass('init_runs')") is None


def demo_gate(database_url: str, **settings: object) -> tuple[InitGate, list[str]]:
    """A gate on the demo's migrations with one seed step that records its runs."""
    gate = InitGate(
        Settings(
            database_url=database_url,
            alembic_config=REPO_ROOT / "alembic.ini",
            **{"wait_timeout": 30, **settings},
        )
    )
    ran: list[str] = []

    @gate.seed("marker", version=1)
    async def marker(conn: object) -> None:
        ran.append("marker")

    return gate, ran


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
@pytest.mark.parametrize(
    ("declared_session_mode", "expected"),
    [
        # Any pooler is refused unless declared to pool sessions.
        (False, "INITGATE_ALLOW_SESSION_POOLER"),
        # Declared wrongly: the probes of a quiet pool still catch it.
        (True, "does not keep one PostgreSQL session"),
    ],
)
async def test_transaction_pooling_is_refused_before_anything_is_written(
    pgbouncer: MakeBouncer,
    fresh_database: str,
    direct_db: DatabaseAdmin,
    direct_ddl_log: DdlLog,
    pool_mode: str,
    declared_session_mode: bool,
    expected: str,
) -> None:
    bouncer = pgbouncer(pool_mode)
    gate, ran = demo_gate(
        bouncer.url_for(fresh_database), allow_session_pooler=declared_session_mode
    )

    with pytest.raises(UnsupportedConnectionError) as raised:
        await gate.run()

    message = str(raised.value)
    assert expected in message
    assert "pool_mode=" in message
    assert "INITGATE_GATE_DATABASE_URL" in message
    assert ran == []
    await assert_nothing_written(direct_db, direct_ddl_log)
    # The lock was given back: nothing still holds it in the pool's backends.
    key = gate.gate.key
    assert not await direct_db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND classid::bigint = $1 AND objid::bigint = $2",
        key.classid & 0xFFFFFFFF,
        key.objid & 0xFFFFFFFF,
    )


async def test_every_worker_through_transaction_pooling_fails_clearly(
    pgbouncer: MakeBouncer,
    fresh_database: str,
    direct_db: DatabaseAdmin,
    direct_ddl_log: DdlLog,
    spawn_python: SpawnPython,
    tmp_path: Path,
) -> None:
    bouncer = pgbouncer("transaction")
    trace = tmp_path / "seeds.trace"
    herd = spawn_python(
        PASS_DEMO_GATE,
        n=8,
        env={
            "DATABASE_URL": bouncer.url_for(fresh_database),
            "APP_SEED_TRACE_FILE": str(trace),
            "INITGATE_WAIT_TIMEOUT": "60",
        },
        preload=["asyncpg", "app.gate", "app.seeds"],
        ready_timeout=120,
    )
    herd.release()
    results = herd.wait_all(timeout=120)

    assert all(r.returncode != 0 for r in results), [r.describe() for r in results]
    errors = collections.Counter(
        "UnsupportedConnectionError" in r.stderr for r in results
    )
    assert errors == {True: len(results)}, [r.stderr[-800:] for r in results]
    assert not trace.exists()
    await assert_nothing_written(direct_db, direct_ddl_log)


async def test_session_pooling_is_refused_unless_declared(
    pgbouncer: MakeBouncer,
    fresh_database: str,
    direct_db: DatabaseAdmin,
    direct_ddl_log: DdlLog,
) -> None:
    bouncer = pgbouncer("session")
    gate, ran = demo_gate(bouncer.url_for(fresh_database))

    with pytest.raises(UnsupportedConnectionError) as raised:
        await gate.run()

    message = str(raised.value)
    assert "goes through a connection pooler" in message
    assert "INITGATE_ALLOW_SESSION_POOLER=true" in message
    assert ran == []
    await assert_nothing_written(direct_db, direct_ddl_log)


async def test_session_pooling_keeps_the_lock_and_records_the_real_backend(
    pgbouncer: MakeBouncer,
    fresh_database: str,
    direct_db: DatabaseAdmin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bouncer = pgbouncer("session")
    gate, ran = demo_gate(bouncer.url_for(fresh_database), allow_session_pooler=True)

    with caplog.at_level(logging.INFO, logger="initgate"):
        result = await gate.run()

    assert result.outcome is Outcome.RAN
    assert ran == ["marker"]
    said = [r.getMessage() for r in caplog.records if "pooler" in r.getMessage()]
    assert any("keeps the session" in line for line in said), said
    # PgBouncer hands its clients a made-up backend key; the run must name
    # the backend that really held the lock.
    backend = int(re.findall(r"backend pid (\d+)", " ".join(said))[-1])
    row = await direct_db.fetchrow("SELECT status, backend_pid FROM init_runs")
    assert row is not None
    assert (row["status"], row["backend_pid"]) == ("succeeded", backend)


async def test_a_waiter_through_session_pooling_listens_in_its_own_backend(
    pgbouncer: MakeBouncer,
    upstream: ListeningPostgres,
    fresh_database: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bouncer = pgbouncer("session")
    gate, ran = demo_gate(
        bouncer.url_for(fresh_database), wait_timeout=2, allow_session_pooler=True
    )
    blocker = await asyncpg.connect(upstream.url(fresh_database))
    try:
        key = gate.gate.key
        await blocker.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", key.classid, key.objid
        )
        with (
            caplog.at_level(logging.INFO, logger="initgate"),
            pytest.raises(WaitTimeoutError),
        ):
            await gate.run()
    finally:
        await blocker.close()

    # It waited as a waiter should: its session and its LISTEN passed the
    # checks, and only the holder's silence ended the wait.
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "keeps the session" in said
    assert "waiting" in said
    assert ran == []


async def test_session_pooling_inits_exactly_once_under_uvicorn_workers(
    pgbouncer: MakeBouncer,
    fresh_database: str,
    direct_db: DatabaseAdmin,
    direct_ddl_log: DdlLog,
    run_uvicorn: StartUvicorn,
    tmp_path: Path,
) -> None:
    bouncer = pgbouncer("session")
    trace = tmp_path / "seeds.trace"
    server = serve_demo(
        run_uvicorn,
        trace,
        DATABASE_URL=bouncer.url_for(fresh_database),
        INITGATE_ALLOW_SESSION_POOLER="true",
    )
    countries = json.loads(server.wait_until_ok("/countries"))

    assert countries
    await assert_demo_initialised_once(direct_db, direct_ddl_log, trace)


async def test_app_on_transaction_pooling_with_a_direct_gate_url(
    pgbouncer: MakeBouncer,
    upstream: ListeningPostgres,
    fresh_database: str,
    direct_db: DatabaseAdmin,
    direct_ddl_log: DdlLog,
    run_uvicorn: StartUvicorn,
    tmp_path: Path,
) -> None:
    bouncer = pgbouncer("transaction")
    trace = tmp_path / "seeds.trace"
    server = serve_demo(
        run_uvicorn,
        trace,
        DATABASE_URL=bouncer.url_for(fresh_database),
        INITGATE_GATE_DATABASE_URL=upstream.url(fresh_database),
    )

    assert "Application startup failed" not in server.log()
    await assert_demo_initialised_once(direct_db, direct_ddl_log, trace)
    # The app's own queries go through the transaction pooler. (An app of
    # many processes there should name its prepared statements uniquely, as
    # SQLAlchemy documents for asyncpg behind PgBouncer; a few requests do.)
    for _ in range(4):
        assert json.loads(server.wait_until_ok("/countries"))


def serve_demo(run_uvicorn: StartUvicorn, trace: Path, **env: str) -> UvicornServer:
    """The demo app under uvicorn with 4 workers; returns once every one started.

    ``env`` is the workers' environment (``DATABASE_URL`` and the like); the
    seed steps record their runs in ``trace``.
    """
    server = run_uvicorn(workers=4, env={**env, "APP_SEED_TRACE_FILE": str(trace)})
    server.wait_until_ok("/health/ready", timeout=120)
    wait_for_startups(server, 4)
    return server


def wait_for_startups(server: UvicornServer, count: int) -> None:
    """Wait until ``count`` uvicorn workers have finished their startup."""
    deadline = time.monotonic() + 60
    while server.log().count("Application startup complete.") < count:
        assert time.monotonic() < deadline, server.log()[-4000:]
        assert server.process.poll() is None, server.log()[-4000:]
        time.sleep(0.1)
