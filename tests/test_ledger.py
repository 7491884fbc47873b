"""The ledger's tables: versioned DDL, checksums, retry rows and retention.

Runs the gate in this process against real PostgreSQL and reads the tables
from a session of its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate import (
    FailFastError,
    InitFailedError,
    InitGate,
    Outcome,
    RunStatus,
    ledger,
)
from tests.helpers import DatabaseAdmin
from tests.project import Project, Revision, make_gate

ITEMS = Revision.sql(
    "r1_items", "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)"
)
TAGS = Revision.sql("r2_tags", "CREATE TABLE tags (id int PRIMARY KEY)")

# The ledger as initgate 0.1.0 created it (ledger version 1), verbatim.
V1_LEDGER = """
CREATE TABLE init_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace text NOT NULL,
    target text NOT NULL,
    status text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed',
                                           'abandoned')),
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    hostname text NOT NULL,
    pid integer NOT NULL,
    backend_pid integer NOT NULL,
    revision_from text,
    revision_to text,
    code_version text,
    error text,
    traceback text
);
CREATE INDEX init_runs_namespace_id_idx ON init_runs (namespace, id DESC);
CREATE TABLE init_steps (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id bigint NOT NULL REFERENCES init_runs (id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('migration', 'seed')),
    name text NOT NULL,
    version text,
    description text,
    status text NOT NULL CHECK (status IN ('succeeded', 'failed')),
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    duration_ms double precision NOT NULL,
    error text
);
CREATE INDEX init_steps_run_id_idx ON init_steps (run_id);
CREATE TABLE init_ledger (version integer NOT NULL);
INSERT INTO init_ledger VALUES (1);
"""


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path / "project").add(ITEMS)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def insert_run(
    db: DatabaseAdmin,
    namespace: str,
    status: str,
    *,
    target: str = "t",
    age: dt.timedelta = dt.timedelta(0),
) -> int:
    """A run row as a holder of ``namespace`` would leave it; returns its id."""
    run_id: int = await db.fetchval(
        "INSERT INTO init_runs (namespace, target, status, started_at, "
        "finished_at, hostname, pid, backend_pid) VALUES ($1, $2, $3, "
        "now() - $4::interval, now() - $4::interval, 'web-1', 41, 4141) "
        "RETURNING id",
        namespace,
        target,
        status,
        age,
    )
    return run_id


async def insert_seed_step(db: DatabaseAdmin, run_id: int, name: str) -> None:
    await db.execute(
        "INSERT INTO init_steps (run_id, kind, name, version, status, started_at, "
        "finished_at, duration_ms) VALUES ($1, 'seed', $2, '1', 'succeeded', "
        "now(), now(), 1)",
        run_id,
        name,
    )


async def create_ledger(database_url: str) -> None:
    """Create the current ledger tables, as a holder would."""
    gate = make_gate(database_url, None)
    await gate.run()


# -- versioned DDL ------------------------------------------------------------


async def test_v1_ledger_is_upgraded_to_v2_keeping_its_runs(
    database_url: str, project: Project, db: DatabaseAdmin
) -> None:
    await db.execute(V1_LEDGER)
    old = await insert_run(db, "elsewhere:public", "failed")

    result = await make_gate(database_url, project).run()

    assert result.outcome is Outcome.RAN
    assert await db.fetchval("SELECT version FROM init_ledger") == 2
    assert await db.fetchval("SELECT count(*) FROM init_ledger") == 1
    statuses = await db.fetch("SELECT id, status FROM init_runs ORDER BY id")
    assert [tuple(row) for row in statuses] == [(old, "failed"), (old + 1, "succeeded")]
    checksum = await db.fetchval(
        "SELECT checksum FROM init_steps WHERE name = 'r1_items'"
    )
    assert checksum == sha256(project.versions / "r1_items.py")
    # The check constraint now allows 'retry', and still nothing unknown.
    await insert_run(db, "elsewhere:public", RunStatus.RETRY)
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_run(db, "elsewhere:public", "paused")
    constraints = await db.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'init_runs'::regclass "
        "AND contype = 'c'"
    )
    assert constraints == 1


async def test_ledger_needs_only_create_on_an_existing_schema(
    database_url: str, db: DatabaseAdmin
) -> None:
    role = f"app_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await db.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
        url = make_url(database_url).set(username=role, password=None)

        result = await make_gate(url.render_as_string(hide_password=False), None).run()

        assert result.outcome is Outcome.RAN
        assert await db.fetchval("SELECT version FROM init_ledger") == 2
    finally:
        await db.execute(f"DROP OWNED BY {role}")
        await db.execute(f"DROP ROLE {role}")


# -- checksums and changed revision files ---------------------------------------


async def test_each_applied_revision_records_its_files_sha256(
    database_url: str, project: Project, db: DatabaseAdmin
) -> None:
    await make_gate(database_url, project).run()
    project.add(TAGS)
    await make_gate(database_url, project).run()

    rows = await db.fetch(
        "SELECT name, checksum FROM init_steps WHERE kind = 'migration' ORDER BY id"
    )
    assert [tuple(row) for row in rows] == [
        ("r1_items", sha256(project.versions / "r1_items.py")),
        ("r2_tags", sha256(project.versions / "r2_tags.py")),
    ]


async def test_a_revision_file_changed_after_it_was_applied_warns_on_the_cold_path(
    database_url: str, project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    await make_gate(database_url, project).run()
    path = project.versions / "r1_items.py"
    path.write_text(path.read_text() + "\n# edited after it was applied\n")
    project.add(TAGS)

    with caplog.at_level(logging.WARNING, logger="initgate"):
        result = await make_gate(database_url, project).run()

    assert result.outcome is Outcome.RAN
    [warning] = [r for r in caplog.records if "has changed since" in r.getMessage()]
    message = warning.getMessage()
    assert "revision r1_items was applied by run 1" in message
    assert str(path) in message
    assert "r2_tags" not in message


async def test_the_warm_path_reads_no_checksum(
    database_url: str, project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    await make_gate(database_url, project).run()
    path = project.versions / "r1_items.py"
    # Same size, same mtime: the heads cache still matches, so the warm path
    # is taken, and it must not look at revision files at all.
    stat = path.stat()
    path.write_text(path.read_text().replace("test revision", "test revisioN"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    with caplog.at_level(logging.WARNING, logger="initgate"):
        result = await make_gate(database_url, project).run()

    assert result.outcome is Outcome.UP_TO_DATE
    assert not [r for r in caplog.records if "has changed since" in r.getMessage()]


# -- retry rows and the fail-fast count -------------------------------------------


def failing_gate(database_url: str, project: Project, calls: list[int]) -> InitGate:
    gate = make_gate(database_url, project, max_attempts=1)

    @gate.seed("broken", version=1)
    async def broken(conn: AsyncConnection) -> None:
        calls.append(1)
        await conn.execute(text("SELECT 1"))
        raise ValueError("bad row 42")

    return gate


async def test_a_retry_row_lifts_fail_fast_for_the_same_target(
    database_url: str, database_name: str, project: Project, db: DatabaseAdmin
) -> None:
    calls: list[int] = []
    with pytest.raises(InitFailedError):
        await failing_gate(database_url, project, calls).run()
    with pytest.raises(FailFastError):
        await failing_gate(database_url, project, calls).run()

    await insert_run(db, f"{database_name}:public", RunStatus.RETRY)
    with pytest.raises(InitFailedError) as raised:
        await failing_gate(database_url, project, calls).run()

    assert not isinstance(raised.value, FailFastError)
    assert calls == [1, 1]
    with pytest.raises(FailFastError):
        await failing_gate(database_url, project, calls).run()
    statuses = [r["status"] for r in await db.fetch("SELECT status FROM init_runs")]
    assert statuses == ["failed", "retry", "failed"]


async def test_unreset_failures_are_those_after_the_last_success_or_retry(
    database_url: str, db: DatabaseAdmin
) -> None:
    await create_ledger(database_url)
    ns = "app:public"
    await insert_run(db, ns, "failed")
    await insert_run(db, ns, "retry")
    second = await insert_run(db, ns, "failed", target="a")
    third = await insert_run(db, ns, "failed", target="b")
    await insert_run(db, "other:public", "failed")

    conn = await asyncpg.connect(database_url)
    try:
        failures = await ledger.unreset_failures(conn, "public", ns)
        state = await ledger.read_state(conn, "public", ns, "a")
    finally:
        await conn.close()

    assert [f["id"] for f in failures] == [second, third]
    assert (state.failures, state.last_failed_id) == (1, second)


# -- retention --------------------------------------------------------------------


async def prune(database_url: str, **options: Any) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        return await ledger.prune_runs(conn, "public", "app:public", **options)
    finally:
        await conn.close()


async def test_prune_keeps_the_newest_runs_and_what_the_gate_still_needs(
    database_url: str, db: DatabaseAdmin
) -> None:
    await create_ledger(database_url)
    await db.execute("DELETE FROM init_runs")
    ns = "app:public"
    seeded = await insert_run(db, ns, "succeeded")
    await insert_seed_step(db, seeded, "countries")
    old_failure = await insert_run(db, ns, "failed")
    latest_ok = await insert_run(db, ns, "succeeded")
    running = await insert_run(db, ns, "running")
    abandoned = await insert_run(db, ns, "abandoned")
    newest = await insert_run(db, ns, "failed")
    other = await insert_run(db, "other:public", "failed")

    would = await prune(database_url, keep=1, dry_run=True)
    assert await db.fetchval("SELECT count(*) FROM init_runs") == 7
    deleted = await prune(database_url, keep=1)

    assert would == deleted == [old_failure, abandoned]
    left = [r["id"] for r in await db.fetch("SELECT id FROM init_runs ORDER BY id")]
    assert left == [seeded, latest_ok, running, newest, other]
    assert await db.fetchval("SELECT count(*) FROM init_steps") == 1


async def test_prune_older_than_deletes_by_age_with_its_steps(
    database_url: str, db: DatabaseAdmin
) -> None:
    await create_ledger(database_url)
    await db.execute("DELETE FROM init_runs")
    ns = "app:public"
    month_old = await insert_run(db, ns, "failed", age=dt.timedelta(days=30))
    await insert_seed_step(db, month_old, "failed-attempt")
    await db.execute("UPDATE init_steps SET status = 'failed'")
    week_old = await insert_run(db, ns, "succeeded", age=dt.timedelta(days=7))
    await insert_run(db, ns, "succeeded")

    deleted = await prune(
        database_url, before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    )

    assert deleted == [month_old, week_old]
    assert await db.fetchval("SELECT count(*) FROM init_steps") == 0
