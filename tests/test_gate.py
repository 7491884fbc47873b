"""The gate's protocol, in one process, against real PostgreSQL.

Several gates in one event loop use separate connections, so PostgreSQL sees
them as separate workers; tests with real worker processes live in
``test_workers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate import (
    DatabaseAheadError,
    DatabaseUnavailableError,
    FailFastError,
    InitFailedError,
    InitGate,
    Outcome,
    Settings,
    WaitTimeoutError,
)
from initgate.lock import LockKey
from initgate.migrate import Migrations
from tests.helpers import DatabaseAdmin, DdlLog, RoundTripProxy, free_port
from tests.project import Project, Revision, make_gate

# Every test here runs over asyncpg and over psycopg: the protocol is one,
# the drivers under it are two.
pytestmark = pytest.mark.usefixtures("gate_driver")

ITEMS = Revision.sql(
    "r1_items", "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)"
)
TAGS = Revision.sql("r2_tags", "CREATE TABLE tags (id int PRIMARY KEY)")


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A project with one revision creating ``items``."""
    return Project(tmp_path / "project").add(ITEMS)


def counting_seed(
    gate: InitGate, name: str, calls: list[str], version: int = 1
) -> None:
    """Register a seed step that inserts a row and counts its calls."""

    @gate.seed(name, version=version)
    async def seed(conn: AsyncConnection) -> None:
        calls.append(name)
        await conn.execute(
            text("INSERT INTO items VALUES (:id, :name)"),
            {"id": len(calls) * 100 + version, "name": name},
        )


async def runs(db: DatabaseAdmin) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM init_runs ORDER BY id")


async def test_cold_database_is_migrated_seeded_and_recorded(
    database_url: str, project: Project, db: DatabaseAdmin, ddl_log: DdlLog
) -> None:
    gate = make_gate(database_url, project)
    calls: list[str] = []
    counting_seed(gate, "items", calls)

    result = await gate.run()

    assert result.outcome is Outcome.RAN
    assert result.migrated == ("r1_items",)
    assert result.seeded == ("items v1",)
    assert calls == ["items"]
    assert await db.fetchval("SELECT count(*) FROM items") == 1
    assert await ddl_log.count("CREATE TABLE", "items") == 1
    [run] = await runs(db)
    assert run["status"] == "succeeded"
    assert run["revision_from"] is None
    assert run["revision_to"] == "r1_items"
    assert run["finished_at"] >= run["started_at"]
    assert run["target"] == result.target
    steps = await db.fetch(
        "SELECT kind, name, version, status FROM init_steps WHERE run_id = $1 "
        "ORDER BY id",
        run["id"],
    )
    assert [tuple(s) for s in steps] == [
        ("migration", "r1_items", None, "succeeded"),
        ("seed", "items", "1", "succeeded"),
    ]


async def test_warm_gate_is_one_round_trip_without_lock_or_write(
    database_url: str,
    database_name: str,
    project: Project,
    db: DatabaseAdmin,
    round_trip_proxy: RoundTripProxy,
) -> None:
    first = make_gate(database_url, project)
    counting_seed(first, "items", [])
    await first.run()
    writes_before = await db.fetchval(
        "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables "
        "WHERE relname = 'init_runs'"
    )

    warm = make_gate(round_trip_proxy.url_for(database_name), project)
    counting_seed(warm, "items", [])
    round_trip_proxy.reset()
    result = await warm.run()

    assert result.outcome is Outcome.UP_TO_DATE
    [session] = round_trip_proxy.sessions
    assert session.round_trips == 1, session.queries
    assert session.flushes == 0, "a prepare would wait on the network once more"
    assert not any("lock" in q.lower() for q in session.queries), session.queries
    assert len(await runs(db)) == 1
    await db.execute("SELECT pg_stat_force_next_flush()")
    writes_after = await db.fetchval(
        "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables "
        "WHERE relname = 'init_runs'"
    )
    assert writes_after == writes_before


async def test_namespaces_neither_block_each_other_nor_mix_histories(
    database_url: str, project: Project, db: DatabaseAdmin
) -> None:
    blocker = await asyncpg.connect(database_url)
    try:
        key = LockKey.for_namespace("shop")
        assert await blocker.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", key.classid, key.objid
        )
        other = make_gate(database_url, project, namespace="billing")
        result = await asyncio.wait_for(other.run(), timeout=20)
    finally:
        await blocker.close()

    assert result.outcome is Outcome.RAN
    shop = make_gate(database_url, project, namespace="shop")
    assert (await shop.run()).outcome is Outcome.RAN
    rows = await db.fetch("SELECT namespace, status FROM init_runs ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("billing", "succeeded"),
        ("shop", "succeeded"),
    ]
    assert (await shop.history())[0]["namespace"] == "shop"
    assert [r["namespace"] for r in await other.history()] == ["billing"]


async def test_waiter_passes_only_after_holder_committed(
    database_url: str, project: Project, db: DatabaseAdmin
) -> None:
    holder = make_gate(database_url, project)
    waiter = make_gate(database_url, project)

    @holder.seed("slow", version=1)
    async def slow(conn: AsyncConnection) -> None:
        await asyncio.sleep(1.5)
        await conn.execute(text("INSERT INTO items VALUES (1, 'slow')"))

    @waiter.seed("slow", version=1)
    async def never(conn: AsyncConnection) -> None:
        raise AssertionError("the waiter must not run the seed")

    holding = asyncio.create_task(holder.run())
    await asyncio.sleep(0.3)  # Let the holder take the lock first.
    waiting = asyncio.create_task(waiter.run())
    waited = await asyncio.wait_for(waiting, timeout=20)
    visible = await db.fetchval("SELECT count(*) FROM items")
    holder_result = await holding

    assert holder_result.outcome is Outcome.RAN
    assert waited.outcome is Outcome.WAITED
    assert waited.waited_ms > 500
    assert visible == 1, "the waiter passed before the holder's seed committed"


async def test_wait_timeout_names_the_holder(
    database_url: str, project: Project
) -> None:
    gate = make_gate(database_url, project, wait_timeout=1.5, poll_interval=0.2)
    blocker = await asyncpg.connect(
        database_url, server_settings={"application_name": "web-2 stuck holder"}
    )
    try:
        key = gate.gate.key
        await blocker.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", key.classid, key.objid
        )
        started = time.monotonic()
        with pytest.raises(WaitTimeoutError) as raised:
            await gate.run()
        elapsed = time.monotonic() - started
        message = str(raised.value)
        assert "web-2 stuck holder" in message
        assert str(blocker.get_server_pid()) in message
        assert "INITGATE_WAIT_TIMEOUT" in message
        assert "\n" not in message
        assert 1.4 < elapsed < 10
    finally:
        await blocker.close()


async def test_failing_migration_is_recorded_and_raised(
    database_url: str, tmp_path: Path, db: DatabaseAdmin
) -> None:
    project = Project(tmp_path / "p").add(ITEMS)
    project.add(Revision.sql("r2_broken", "CREATE TABLE tags (id int)", "SELECT 1/0"))
    gate = make_gate(database_url, project)

    with pytest.raises(InitFailedError) as raised:
        await gate.run()

    message = str(raised.value)
    assert "migration r2_broken failed" in message
    assert "division by zero" in message
    assert "\n" not in message
    steps = await db.fetch("SELECT name, status, error FROM init_steps ORDER BY id")
    assert [(s["name"], s["status"]) for s in steps] == [
        ("r1_items", "succeeded"),
        ("r2_broken", "failed"),
    ]
    assert "division by zero" in steps[1]["error"]
    [run] = await runs(db)
    assert run["status"] == "failed"
    assert "division by zero" in run["error"]
    assert "Traceback" in run["traceback"]
    # One transaction per revision: r1 committed, r2 rolled back whole.
    assert run["revision_to"] == "r1_items"
    assert await db.fetchval("SELECT to_regclass('tags')") is None
    assert await db.fetchval("SELECT version_num FROM alembic_version") == "r1_items"


async def test_failing_seed_rolls_back_its_effects_and_is_recorded(
    database_url: str, project: Project, db: DatabaseAdmin
) -> None:
    gate = make_gate(database_url, project)

    @gate.seed("half", version=3)
    async def half(conn: AsyncConnection) -> None:
        await conn.execute(text("INSERT INTO items VALUES (1, 'half')"))
        raise RuntimeError("reference file is missing")

    with pytest.raises(InitFailedError, match="seed step half v3 failed"):
        await gate.run()

    assert await db.fetchval("SELECT count(*) FROM items") == 0
    [run] = await runs(db)
    assert run["status"] == "failed"
    assert "reference file is missing" in run["error"]
    step = await db.fetchrow("SELECT * FROM init_steps WHERE kind = 'seed'")
    assert step is not None
    assert (step["name"], step["version"], step["status"]) == ("half", "3", "failed")


async def test_deterministic_failure_fails_fast_after_max_attempts(
    database_url: str, project: Project, db: DatabaseAdmin
) -> None:
    calls: list[int] = []

    def broken_gate() -> InitGate:
        gate = make_gate(database_url, project, max_attempts=2)

        @gate.seed("broken", version=1)
        async def broken(conn: AsyncConnection) -> None:
            calls.append(1)
            raise ValueError("bad row 42")

        return gate

    for _ in range(2):
        with pytest.raises(InitFailedError):
            await broken_gate().run()
    with pytest.raises(FailFastError) as raised:
        await broken_gate().run()

    assert len(calls) == 2
    assert "bad row 42" in str(raised.value)
    assert "failed 2 times" in str(raised.value)
    statuses = [r["status"] for r in await runs(db)]
    assert statuses == ["failed", "failed"]

    # A fix changes the target, so it runs at once.
    fixed = make_gate(database_url, project, max_attempts=2)
    counting_seed(fixed, "broken", [], version=2)
    assert (await fixed.run()).outcome is Outcome.RAN


async def test_database_ahead_of_the_code_refuses_unless_allowed(
    database_url: str, tmp_path: Path, db: DatabaseAdmin
) -> None:
    newer = Project(tmp_path / "new").add(ITEMS).add(TAGS)
    await make_gate(database_url, newer).run()
    older = Project(tmp_path / "old").add(ITEMS)

    with pytest.raises(DatabaseAheadError, match="r2_tags"):
        await make_gate(database_url, older).run()
    allowed = make_gate(database_url, older, allow_unknown_revisions=True)
    assert (await allowed.run()).outcome is Outcome.DATABASE_AHEAD

    assert await db.fetchval("SELECT version_num FROM alembic_version") == "r2_tags"
    assert len(await runs(db)) == 1


async def test_new_revision_migrates_once_from_old_head_then_is_warm(
    database_url: str, tmp_path: Path, db: DatabaseAdmin, ddl_log: DdlLog
) -> None:
    project = Project(tmp_path / "p").add(ITEMS)
    calls: list[str] = []
    first = make_gate(database_url, project)
    counting_seed(first, "items", calls)
    await first.run()

    project.add(TAGS)
    second = make_gate(database_url, project)
    counting_seed(second, "items", calls)
    result = await second.run()
    third = make_gate(database_url, project)
    counting_seed(third, "items", calls)
    restart = await third.run()

    assert result.outcome is Outcome.RAN
    assert result.migrated == ("r2_tags",)
    assert result.seeded == ()
    assert restart.outcome is Outcome.UP_TO_DATE
    assert calls == ["items"]
    assert await ddl_log.count("CREATE TABLE", "tags") == 1
    last = (await runs(db))[-1]
    assert (last["revision_from"], last["revision_to"]) == ("r1_items", "r2_tags")


async def test_seed_version_bump_reruns_only_that_step(
    database_url: str, project: Project
) -> None:
    calls: list[str] = []
    gate = make_gate(database_url, project)
    counting_seed(gate, "a", calls)
    counting_seed(gate, "b", calls)
    await gate.run()

    bumped = make_gate(database_url, project)
    counting_seed(bumped, "a", calls)
    counting_seed(bumped, "b", calls, version=2)
    result = await bumped.run()

    assert calls == ["a", "b", "b"]
    assert result.seeded == ("b v2",)


async def test_terminated_holder_is_taken_over_and_marked_abandoned(
    database_url: str, tmp_path: Path, db: DatabaseAdmin, ddl_log: DdlLog
) -> None:
    # The statement sleeps until the test creates `resume`: the first holder
    # is stuck in it, the one taking over runs straight through.
    await db.execute("CREATE TABLE gate_test_marker (id int)")
    project = Project(tmp_path / "p").add(
        Revision.sql(
            "r1_slow",
            "SELECT pg_sleep(CASE WHEN to_regclass('resume') IS NULL "
            "THEN 60 ELSE 0 END)",
            "CREATE TABLE items (id int PRIMARY KEY, name text)",
        )
    )
    first = make_gate(database_url, project)
    second = make_gate(database_url, project, poll_interval=0.5)
    holding = asyncio.create_task(first.run())
    backend = None
    for _ in range(100):
        backend = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(CASE%' "
            "AND pid <> pg_backend_pid()"
        )
        if backend:
            break
        await asyncio.sleep(0.1)
    assert backend, "the holder never reached its slow statement"
    waiting = asyncio.create_task(second.run())
    await asyncio.sleep(0.5)
    await db.execute("CREATE TABLE resume (id int)")
    killed_at = time.monotonic()
    await db.fetchval("SELECT pg_terminate_backend($1)", backend)

    result = await asyncio.wait_for(waiting, timeout=30)
    takeover = time.monotonic() - killed_at
    # The first gate lost its session under it: it fails, or enters the
    # gate again on a new session and finds the work done; never both run.
    [first] = await asyncio.gather(
        asyncio.wait_for(holding, timeout=30), return_exceptions=True
    )

    if isinstance(first, BaseException):
        assert result.outcome is Outcome.RAN
    else:
        outcomes = sorted([result.outcome, first.outcome])
        assert outcomes == [Outcome.RAN, Outcome.WAITED]
    assert takeover < 3, f"takeover took {takeover:.2f} s"
    statuses = [r["status"] for r in await runs(db)]
    assert statuses == ["abandoned", "succeeded"]
    assert await ddl_log.count("CREATE TABLE", "items") == 1


async def test_env_py_with_its_own_engine_works_with_a_warning(
    database_url: str,
    tmp_path: Path,
    db: DatabaseAdmin,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sync_url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    monkeypatch.setenv("TEST_PROJECT_SYNC_URL", sync_url)
    project = Project(tmp_path / "p", own_engine=True).add(ITEMS)
    gate = make_gate(database_url, project)

    with caplog.at_level(logging.WARNING, logger="initgate"):
        result = await gate.run()

    assert result.outcome is Outcome.RAN
    assert await db.fetchval("SELECT to_regclass('items')::text") == "items"
    assert any("outside the lock's session" in r.message for r in caplog.records)


async def test_long_wait_logs_a_warning_naming_the_holder(
    database_url: str, project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    gate = make_gate(
        database_url,
        project,
        wait_timeout=1.2,
        poll_interval=0.1,
        long_wait_warning=0.4,
    )
    blocker = await asyncpg.connect(
        database_url, server_settings={"application_name": "slow-holder"}
    )
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

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 3
    assert all("slow-holder" in r.getMessage() for r in warnings)
    assert any("waiting" in r.getMessage() for r in caplog.records)


async def test_unreachable_database_fails_after_the_connect_deadline() -> None:
    url = f"postgresql://app:{'hunter2-secret'}@127.0.0.1:{free_port()}/app"
    gate = InitGate(
        Settings(database_url=url, alembic_config=None, connect_timeout=1.0)
    )
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as raised:
        await gate.run()
    elapsed = time.monotonic() - started

    assert 0.9 < elapsed < 5
    assert "hunter2-secret" not in str(raised.value)
    assert "INITGATE_CONNECT_TIMEOUT" in str(raised.value)


async def test_lifespan_composes_with_the_apps_own(
    database_url: str, project: Project
) -> None:
    gate = make_gate(database_url, project)
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def own(app: object) -> AsyncIterator[dict[str, str]]:
        order.append(f"own starts after gate: {gate.result is not None}")
        yield {"engine": "ready"}
        order.append("own stops")

    async with gate.lifespan_with(own)(object()) as state:
        assert state == {"engine": "ready"}
    assert order == ["own starts after gate: True", "own stops"]


def logs_its_import(project: Project, revision: str, log: Path) -> None:
    """Make a revision file append a line to ``log`` whenever it is imported."""
    path = project.versions / f"{revision}.py"
    path.write_text(
        f"open({str(log)!r}, 'a').write('imported\\n')\n" + path.read_text()
    )


def test_heads_are_read_from_source_then_cached_and_follow_file_changes(
    tmp_path: Path,
) -> None:
    imports = tmp_path / "imports.log"
    project = Project(tmp_path / "p").add(Revision("r1", "pass"))
    logs_its_import(project, "r1", imports)

    assert Migrations(project.ini).heads() == ("r1",)
    assert (project.versions / "__pycache__" / "initgate-heads.json").exists()
    assert Migrations(project.ini).heads() == ("r1",)
    project.add(Revision.sql("r2", "SELECT 1"))
    assert Migrations(project.ini).heads() == ("r2",)
    assert not imports.exists(), "the heads took importing a revision file"


def test_revisions_without_literal_ids_are_imported_once_then_cached(
    tmp_path: Path,
) -> None:
    imports = tmp_path / "imports.log"
    project = Project(tmp_path / "p").add(Revision("r1", "pass"))
    path = project.versions / "r1.py"
    path.write_text(path.read_text().replace("revision = 'r1'", "revision = 'r' + '1'"))
    logs_its_import(project, "r1", imports)

    assert Migrations(project.ini).heads() == ("r1",)
    assert Migrations(project.ini).heads() == ("r1",)
    assert imports.read_text().count("imported") == 1


async def test_revision_committed_by_a_dead_holder_keeps_its_step_row(
    database_url: str, tmp_path: Path, db: DatabaseAdmin
) -> None:
    project = (
        Project(tmp_path / "p")
        .add(ITEMS)
        .add(
            Revision.sql(
                "r2_slow",
                "SELECT pg_sleep(CASE WHEN to_regclass('resume') IS NULL "
                "THEN 60 ELSE 0 END)",
            )
        )
    )
    first = make_gate(database_url, project)
    holding = asyncio.create_task(first.run())
    backend = None
    for _ in range(100):
        backend = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(CASE%' "
            "AND pid <> pg_backend_pid()"
        )
        if backend:
            break
        await asyncio.sleep(0.1)
    assert backend, "the holder never reached its slow statement"
    await db.execute("CREATE TABLE resume (id int)")
    await db.fetchval("SELECT pg_terminate_backend($1)", backend)
    await asyncio.gather(holding, return_exceptions=True)
    await make_gate(database_url, project).run()

    rows = await db.fetch(
        "SELECT r.status AS run, s.name, s.status FROM init_steps s "
        "JOIN init_runs r ON r.id = s.run_id ORDER BY s.id"
    )
    assert [tuple(r) for r in rows] == [
        ("abandoned", "r1_items", "succeeded"),
        ("succeeded", "r2_slow", "succeeded"),
    ]
