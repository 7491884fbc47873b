"""The gate's own tables: DDL, the warm check, run and step rows.

``init_runs`` holds one row per holder attempt; ``init_steps`` one row per
migration revision applied and per seed step run. Operators read both with
plain SQL (the README has example queries).

Two kinds of connection come in here. Reads take the gate's session (an
asyncpg connection, or psycopg behind the same interface: see
:mod:`initgate.drivers`), so that a waiter never pays for SQLAlchemy's
dialect setup and the warm check stays one round trip. Writes take the
holder's SQLAlchemy ``AsyncConnection``, the same session that holds the
lock, inside the caller's transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate.drivers import errors
from initgate.states import RunStatus, StepKind, StepStatus

__all__ = [
    "LEDGER_VERSION",
    "GateState",
    "RecordedChecksum",
    "RunStatus",
    "StepKind",
    "StepStatus",
    "abandon_running",
    "ensure_schema",
    "fetch_run",
    "fetch_runs",
    "finish_run",
    "insert_retry",
    "insert_run",
    "insert_step",
    "is_warm",
    "prune_runs",
    "quote_ident",
    "quote_literal",
    "read_checksums",
    "read_ledger_version",
    "read_revisions",
    "read_state",
    "step_insert",
    "unreset_failures",
]

logger = logging.getLogger(__name__)

LEDGER_VERSION = 2
"""Version of the DDL below; ``ensure_schema`` upgrades older ledgers.

1. ``init_runs``, ``init_steps`` and ``init_ledger``.
2. ``init_steps.checksum``; run status ``retry``.
"""


def quote_ident(name: str) -> str:
    """Quote an SQL identifier, doubling embedded double quotes."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal.

    Safe because every gate session sets ``standard_conforming_strings=on``
    at connect, so backslashes carry no meaning inside ``'...'``.
    """
    if "\x00" in value:
        raise ValueError("a NUL character cannot appear in an SQL literal")
    return "'" + value.replace("'", "''") + "'"


def _check(enum_type: type[enum.StrEnum]) -> str:
    return ", ".join(quote_literal(member.value) for member in enum_type)


# Statuses the version 1 check constraint allowed; version 2 added 'retry'.
_V1_RUN_STATUSES = ("running", "succeeded", "failed", "abandoned")


def _ddl_v1(schema: str) -> list[str]:
    s = quote_ident(schema)
    v1_statuses = ", ".join(quote_literal(status) for status in _V1_RUN_STATUSES)
    return [
        f"""CREATE TABLE IF NOT EXISTS {s}.init_runs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            namespace text NOT NULL,
            target text NOT NULL,
            status text NOT NULL CHECK (status IN ({v1_statuses})),
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
        )""",
        f"""CREATE INDEX IF NOT EXISTS init_runs_namespace_id_idx
            ON {s}.init_runs (namespace, id DESC)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.init_steps (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id bigint NOT NULL REFERENCES {s}.init_runs (id) ON DELETE CASCADE,
            kind text NOT NULL CHECK (kind IN ({_check(StepKind)})),
            name text NOT NULL,
            version text,
            description text,
            status text NOT NULL CHECK (status IN ({_check(StepStatus)})),
            started_at timestamptz NOT NULL,
            finished_at timestamptz NOT NULL,
            duration_ms double precision NOT NULL,
            error text
        )""",
        f"CREATE INDEX IF NOT EXISTS init_steps_run_id_idx ON {s}.init_steps (run_id)",
        f"""CREATE TABLE IF NOT EXISTS {s}.init_ledger (
            version integer NOT NULL
        )""",
        f"COMMENT ON TABLE {s}.init_runs IS "
        "'initgate: one row per init attempt by the worker holding the lock'",
        f"COMMENT ON TABLE {s}.init_steps IS "
        "'initgate: one row per migration revision or seed step a run applied'",
    ]


def _ddl_v2(schema: str) -> list[str]:
    s = quote_ident(schema)
    # init_runs_status_check is the name PostgreSQL gave version 1's inline
    # constraint; re-adding it under that name keeps one constraint either way.
    return [
        f"ALTER TABLE {s}.init_steps ADD COLUMN IF NOT EXISTS checksum text",
        f"""ALTER TABLE {s}.init_runs
            DROP CONSTRAINT IF EXISTS init_runs_status_check,
            ADD CONSTRAINT init_runs_status_check
                CHECK (status IN ({_check(RunStatus)}))""",
        f"COMMENT ON COLUMN {s}.init_steps.checksum IS "
        "'initgate: sha256 of the revision file when it was applied'",
    ]


# The DDL of each ledger version, applied in order from the one a database
# has; a version's statements must work on a ledger of the version before.
_LEDGER_DDL = {1: _ddl_v1, 2: _ddl_v2}

_MISSING = ("42P01", "3F000")
"""SQLSTATEs undefined_table, invalid_schema_name: a database the gate never
ran against, so a read finds nothing."""
_UNDEFINED_COLUMN = "42703"
"""A ledger of an older version lacks the column."""

assert sorted(_LEDGER_DDL) == list(range(1, LEDGER_VERSION + 1))


# Held for the few milliseconds of DDL, so that holders of two namespaces
# sharing a schema do not race on CREATE TABLE IF NOT EXISTS (which is not
# safe against concurrent creators). Transaction-scoped and short: no
# CREATE INDEX CONCURRENTLY can be waiting on it.
_DDL_LOCK_OBJID = 0


async def ensure_schema(conn: AsyncConnection, schema: str, classid: int) -> None:
    """Create or upgrade the ledger tables; idempotent; caller commits."""
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(:c, :o)"),
        {"c": classid, "o": _DDL_LOCK_OBJID},
    )
    table = f"{quote_ident(schema)}.init_ledger"
    version = 0
    if await conn.scalar(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}):
        version = int(await conn.scalar(text(f"SELECT max(version) FROM {table}")) or 0)
    if version >= LEDGER_VERSION:
        return
    # Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the
    # database even when the schema exists, which an app role often lacks.
    if not await conn.scalar(
        text("SELECT to_regnamespace(:s) IS NOT NULL"), {"s": quote_ident(schema)}
    ):
        await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}"))
    for number in range(version + 1, LEDGER_VERSION + 1):
        for statement in _LEDGER_DDL[number](schema):
            await conn.execute(text(statement))
    await conn.execute(text(f"DELETE FROM {quote_ident(schema)}.init_ledger"))
    await conn.execute(
        text(f"INSERT INTO {quote_ident(schema)}.init_ledger VALUES (:v)"),
        {"v": LEDGER_VERSION},
    )
    logger.info(
        "ledger tables in schema %r upgraded from version %d to %d",
        schema,
        version,
        LEDGER_VERSION,
    )


async def read_ledger_version(conn: Any, schema: str) -> int:
    """The ledger version in ``schema``; 0 when it has no ledger tables.

    Args:
        conn: The gate's session or an asyncpg connection.
    """
    table = f"{quote_ident(schema)}.init_ledger"
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
        return 0
    version = await conn.fetchval(f"SELECT max(version) FROM {table}")
    return int(version or 0)


def warm_check_sql(
    schema: str,
    namespace: str,
    target: str,
    heads: Sequence[str] | None,
    version_table: str,
) -> str:
    """The warm check as one self-contained statement.

    It returns one row exactly when the last succeeded run of the namespace
    reached ``target`` and (with migrations) ``alembic_version`` holds
    ``heads``. Values are inlined so that it can go as a simple-protocol query:
    one round trip, where a parameterised one costs a prepare first.
    """
    sql = (
        f"SELECT 1 WHERE (SELECT target FROM {quote_ident(schema)}.init_runs "
        f"WHERE namespace = {quote_literal(namespace)} AND status = 'succeeded' "
        f"ORDER BY id DESC LIMIT 1) = {quote_literal(target)}"
    )
    if heads is not None:
        wanted = ", ".join(quote_literal(h) for h in sorted(heads))
        sql += (
            " AND (SELECT coalesce(array_agg(version_num::text ORDER BY "
            f"version_num::text), '{{}}') FROM {_table(version_table)}) = "
            f"ARRAY[{wanted}]::text[]"
        )
    return sql


def _table(name: str) -> str:
    return ".".join(quote_ident(part) for part in name.split("."))


async def is_warm(conn: Any, warm_sql: str) -> bool:
    """Run the warm check; a missing table (a fresh database) means cold."""
    try:
        status: str = await conn.execute(warm_sql)
    except errors(*_MISSING):
        return False
    return status == "SELECT 1"


@dataclasses.dataclass(frozen=True)
class GateState:
    """What a waiter or a fresh holder needs to decide its next move."""

    failures: int
    """Failed runs for the target since the namespace's last success or retry."""
    last_error: str | None
    """Error of the latest of those failed runs."""
    last_failed_id: int | None
    """Its ``init_runs.id``."""
    running: dict[str, Any] | None
    """The latest ``running`` row (hostname, pid, started_at), if any."""


_STATE_SQL = """
WITH last_reset AS (
    SELECT coalesce(max(id), 0) AS reset_id FROM {s}.init_runs
    WHERE namespace = $1 AND status IN ('succeeded', 'retry')
), failed AS (
    SELECT id, error FROM {s}.init_runs, last_reset
    WHERE namespace = $1 AND target = $2 AND status = 'failed' AND id > reset_id
)
SELECT
    (SELECT count(*) FROM failed) AS failures,
    (SELECT error FROM failed ORDER BY id DESC LIMIT 1) AS last_error,
    (SELECT max(id) FROM failed) AS last_failed_id,
    (SELECT json_build_object('id', id, 'hostname', hostname, 'pid', pid,
                              'backend_pid', backend_pid, 'started_at', started_at)
     FROM {s}.init_runs WHERE namespace = $1 AND status = 'running'
     ORDER BY id DESC LIMIT 1)::text AS running
"""
# A 'retry' row resets the count like a success does, but only a success
# counts as init done (the warm check looks at 'succeeded' rows alone).


async def read_state(conn: Any, schema: str, namespace: str, target: str) -> GateState:
    """Read failure count and the running run; empty on a fresh database."""
    try:
        row = await conn.fetchrow(
            _STATE_SQL.format(s=quote_ident(schema)), namespace, target
        )
    except errors(*_MISSING):
        return GateState(0, None, None, None)
    running = json.loads(row["running"]) if row["running"] else None
    return GateState(row["failures"], row["last_error"], row["last_failed_id"], running)


async def unreset_failures(
    conn: Any, schema: str, namespace: str
) -> list[dict[str, Any]]:
    """Failed runs of any target since the namespace's last success or retry.

    Oldest first, with ``id``, ``target``, ``started_at`` and ``error``;
    empty on a database the gate never ran against. These are the failures
    that ``initgate retry`` lifts.
    """
    s = quote_ident(schema)
    try:
        rows = await conn.fetch(
            f"SELECT id, target, started_at, error FROM {s}.init_runs "
            "WHERE namespace = $1 AND status = 'failed' AND id > (SELECT "
            f"coalesce(max(id), 0) FROM {s}.init_runs WHERE namespace = $1 "
            "AND status IN ('succeeded', 'retry')) ORDER BY id",
            namespace,
        )
    except errors(*_MISSING):
        return []
    return [dict(row) for row in rows]


@dataclasses.dataclass(frozen=True)
class RecordedChecksum:
    """The checksum a revision file had when a run applied it."""

    revision: str
    checksum: str
    run_id: int
    applied_at: dt.datetime


async def read_checksums(
    conn: Any, schema: str, namespace: str
) -> list[RecordedChecksum]:
    """The latest recorded checksum of each applied revision, by revision.

    Empty on a database without a ledger, or with a version 1 ledger, which
    recorded no checksums.
    """
    s = quote_ident(schema)
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT ON (s.name) s.name, s.checksum, s.run_id, "
            f"s.finished_at FROM {s}.init_steps s JOIN {s}.init_runs r "
            "ON r.id = s.run_id WHERE r.namespace = $1 AND s.kind = 'migration' "
            "AND s.status = 'succeeded' AND s.checksum IS NOT NULL "
            "ORDER BY s.name, s.id DESC",
            namespace,
        )
    except errors(*_MISSING, _UNDEFINED_COLUMN):
        return []
    return [
        RecordedChecksum(r["name"], r["checksum"], r["run_id"], r["finished_at"])
        for r in rows
    ]


async def read_revisions(conn: Any, version_table: str) -> list[str]:
    """The revisions ``alembic_version`` holds; empty when it does not exist."""
    try:
        rows = await conn.fetch(f"SELECT version_num FROM {_table(version_table)}")
    except errors(*_MISSING):
        return []
    return sorted(str(r["version_num"]) for r in rows)


async def read_done_seeds(
    conn: Any, schema: str, namespace: str
) -> set[tuple[str, str]]:
    """(name, version) of every seed step that succeeded in this namespace."""
    s = quote_ident(schema)
    try:
        rows = await conn.fetch(
            f"SELECT DISTINCT s.name, s.version FROM {s}.init_steps s "
            f"JOIN {s}.init_runs r ON r.id = s.run_id "
            "WHERE r.namespace = $1 AND s.kind = 'seed' AND s.status = 'succeeded'",
            namespace,
        )
    except errors(*_MISSING):
        return set()
    return {(r["name"], r["version"]) for r in rows}


async def abandon_running(
    conn: AsyncConnection, schema: str, namespace: str
) -> list[dict[str, Any]]:
    """Mark the namespace's ``running`` rows ``abandoned``; return them.

    Only the lock holder calls this, so any such row's holder is gone.
    """
    result = await conn.execute(
        text(
            f"UPDATE {quote_ident(schema)}.init_runs SET status = 'abandoned', "
            "finished_at = clock_timestamp(), error = coalesce(error, "
            "'holder session ended before the run finished') "
            "WHERE namespace = :ns AND status = 'running' "
            "RETURNING id, hostname, pid, started_at"
        ),
        {"ns": namespace},
    )
    return [dict(row._mapping) for row in result]


async def insert_run(conn: AsyncConnection, schema: str, **values: Any) -> int:
    """Insert a ``running`` run; return its id."""
    columns = ", ".join(values)
    params = ", ".join(f":{name}" for name in values)
    run_id = await conn.scalar(
        text(
            f"INSERT INTO {quote_ident(schema)}.init_runs (status, {columns}) "
            f"VALUES ('running', {params}) RETURNING id"
        ),
        values,
    )
    assert isinstance(run_id, int)
    return run_id


async def insert_retry(conn: AsyncConnection, schema: str, **values: Any) -> int:
    """Record an operator's retry: a finished ``retry`` row; return its id.

    Takes the columns of :func:`insert_run`. The caller holds the init lock,
    so no holder is counting failures meanwhile.
    """
    columns = ", ".join(values)
    params = ", ".join(f":{name}" for name in values)
    run_id = await conn.scalar(
        text(
            f"INSERT INTO {quote_ident(schema)}.init_runs (status, finished_at, "
            f"{columns}) VALUES ('retry', clock_timestamp(), {params}) RETURNING id"
        ),
        values,
    )
    assert isinstance(run_id, int)
    return run_id


async def finish_run(
    conn: AsyncConnection,
    schema: str,
    run_id: int,
    status: RunStatus,
    *,
    channel: str,
    revision_to: str | None = None,
    error: str | None = None,
    traceback: str | None = None,
) -> None:
    """Close a run with its outcome and NOTIFY the waiters (at commit)."""
    await conn.execute(
        text(
            f"UPDATE {quote_ident(schema)}.init_runs SET status = :status, "
            "finished_at = clock_timestamp(), revision_to = :rev, "
            "error = :error, traceback = :tb WHERE id = :id"
        ),
        {
            "status": status.value,
            "rev": revision_to,
            "error": error,
            "tb": traceback,
            "id": run_id,
        },
    )
    await conn.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": channel, "payload": f"{status.value} {run_id}"},
    )


def step_insert(
    schema: str,
    run_id: int,
    kind: StepKind,
    name: str,
    version: str | None,
    status: StepStatus,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    error: str | None = None,
    description: str | None = None,
    checksum: str | None = None,
) -> tuple[TextClause, dict[str, Any]]:
    """The INSERT of one step row, for a sync or an async connection."""
    statement = text(
        f"INSERT INTO {quote_ident(schema)}.init_steps (run_id, kind, name, "
        "version, description, status, started_at, finished_at, duration_ms, "
        "error, checksum) VALUES (:run_id, :kind, :name, :version, "
        ":description, :status, :started, :finished, :ms, :error, :checksum)"
    )
    return statement, {
        "run_id": run_id,
        "kind": kind.value,
        "name": name,
        "version": version,
        "status": status.value,
        "started": started_at,
        "finished": finished_at,
        "ms": (finished_at - started_at).total_seconds() * 1000,
        "error": error,
        "description": description,
        "checksum": checksum,
    }


async def insert_step(conn: AsyncConnection, *args: Any, **kwargs: Any) -> None:
    """Record one step of a run; arguments as for :func:`step_insert`."""
    await conn.execute(*step_insert(*args, **kwargs))


async def fetch_runs(
    conn: Any,
    schema: str,
    namespace: str | None,
    limit: int = 20,
    statuses: Iterable[str] = (),
    since: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """The latest runs, newest first, each with its steps under ``"steps"``.

    Args:
        namespace: Only this namespace's runs; None for every namespace.
        limit: At most this many runs.
        statuses: Only runs with one of these statuses; empty for all.
        since: Only runs started at or after this instant.

    Returns an empty list on a database the gate never ran against.
    """
    s = quote_ident(schema)
    statuses = list(statuses)
    try:
        runs = await conn.fetch(
            f"SELECT * FROM {s}.init_runs WHERE ($1::text IS NULL OR namespace = $1) "
            "AND (cardinality($2::text[]) = 0 OR status = ANY($2::text[])) "
            "AND ($4::timestamptz IS NULL OR started_at >= $4) "
            "ORDER BY id DESC LIMIT $3",
            namespace,
            statuses,
            limit,
            since,
        )
        steps = await conn.fetch(
            f"SELECT * FROM {s}.init_steps WHERE run_id = ANY($1::bigint[]) "
            "ORDER BY id",
            [r["id"] for r in runs],
        )
    except errors(*_MISSING):
        return []
    by_run: dict[int, list[dict[str, Any]]] = {}
    for step in steps:
        by_run.setdefault(step["run_id"], []).append(dict(step))
    return [dict(run) | {"steps": by_run.get(run["id"], [])} for run in runs]


async def fetch_run(conn: Any, schema: str, run_id: int) -> dict[str, Any] | None:
    """One run by id, whatever its namespace, with its steps; None if absent."""
    s = quote_ident(schema)
    try:
        run = await conn.fetchrow(f"SELECT * FROM {s}.init_runs WHERE id = $1", run_id)
        steps = await conn.fetch(
            f"SELECT * FROM {s}.init_steps WHERE run_id = $1 ORDER BY id", run_id
        )
    except errors(*_MISSING):
        return None
    if run is None:
        return None
    return dict(run) | {"steps": [dict(step) for step in steps]}


# Runs that retention never deletes, whatever their age or rank:
# - the latest succeeded run of each namespace: the warm check reads it;
# - 'running' runs: a live holder is still writing steps under them;
# - for each seed step version, the run that last recorded it succeeding:
#   the holder skips a seed step only while such a row exists, so deleting
#   it would run the step again.
# A 'retry' row may go: every failure it lifted is older, so goes too.
_PRUNE_SQL = """
WITH ranked AS (
    SELECT id, status, started_at,
           row_number() OVER (PARTITION BY namespace ORDER BY id DESC) AS rank
    FROM {s}.init_runs WHERE $1::text IS NULL OR namespace = $1
), kept AS (
    SELECT max(id) AS id FROM {s}.init_runs
    WHERE status = 'succeeded' GROUP BY namespace
    UNION
    SELECT max(st.run_id) FROM {s}.init_steps st
    JOIN {s}.init_runs r ON r.id = st.run_id
    WHERE st.kind = 'seed' AND st.status = 'succeeded'
    GROUP BY r.namespace, st.name, st.version
), doomed AS (
    SELECT id FROM ranked
    WHERE status <> 'running'
      AND ($2::bigint IS NULL OR rank > $2)
      AND ($3::timestamptz IS NULL OR started_at < $3)
      AND NOT EXISTS (SELECT 1 FROM kept WHERE kept.id = ranked.id)
)
"""


async def prune_runs(
    conn: Any,
    schema: str,
    namespace: str | None,
    *,
    keep: int | None = None,
    before: dt.datetime | None = None,
    dry_run: bool = False,
) -> list[int]:
    """Delete old runs (their steps cascade); return the ids, oldest first.

    A run goes when it is beyond the newest ``keep`` of its namespace and
    (if given) started before ``before``, unless the gate still needs it:
    the latest succeeded run of each namespace, a ``running`` run, or the
    last record of a seed step version. At least one of ``keep`` and
    ``before`` is required.

    Args:
        conn: An asyncpg connection or a session; the delete is one statement.
        namespace: Only this namespace's runs; None for every namespace.
        dry_run: Only return the ids that would go.
    """
    if keep is None and before is None:
        raise ValueError("prune_runs needs keep or before")
    s = quote_ident(schema)
    action = (
        "SELECT id FROM doomed"
        if dry_run
        else f"DELETE FROM {s}.init_runs WHERE id IN (SELECT id FROM doomed) "
        "RETURNING id"
    )
    try:
        rows = await conn.fetch(
            _PRUNE_SQL.format(s=s) + action, namespace, keep, before
        )
    except errors(*_MISSING):
        return []
    return sorted(row["id"] for row in rows)
