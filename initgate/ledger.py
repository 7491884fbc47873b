"""The gate's own tables: DDL, the warm check, run and step rows.

``init_runs`` holds one row per holder attempt; ``init_steps`` one row per
migration revision applied and per seed step run. Operators read both with
plain SQL (the README has example queries).

Two kinds of connection come in here. Reads take the raw asyncpg connection,
so that a waiter never pays for SQLAlchemy's dialect setup and the warm check
stays one round trip. Writes take the holder's SQLAlchemy ``AsyncConnection``,
the same session that holds the lock, inside the caller's transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "LEDGER_VERSION",
    "GateState",
    "RunStatus",
    "StepKind",
    "StepStatus",
    "abandon_running",
    "ensure_schema",
    "fetch_runs",
    "finish_run",
    "insert_run",
    "insert_step",
    "is_warm",
    "quote_ident",
    "quote_literal",
    "read_revisions",
    "read_state",
]

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
"""Version of the DDL below; ``ensure_schema`` upgrades older ledgers."""


class RunStatus(enum.StrEnum):
    """The life of one ``init_runs`` row."""

    RUNNING = "running"
    """A holder is working on it, or died while it did (until the next holder)."""
    SUCCEEDED = "succeeded"
    """Every pending migration and seed step was applied and committed."""
    FAILED = "failed"
    """A step raised; ``error`` and ``traceback`` say which and why."""
    ABANDONED = "abandoned"
    """Its holder's session ended mid-run; the next holder marked it so."""


class StepKind(enum.StrEnum):
    """What an ``init_steps`` row records."""

    MIGRATION = "migration"
    """One Alembic revision; ``name`` is the revision id."""
    SEED = "seed"
    """One seed step; ``name`` and ``version`` are as registered."""


class StepStatus(enum.StrEnum):
    """Outcome of one step."""

    SUCCEEDED = "succeeded"
    """Applied and committed."""
    FAILED = "failed"
    """Raised; rolled back (a seed step) or left the revision unapplied."""


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


def _ddl(schema: str) -> list[str]:
    s = quote_ident(schema)
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"""CREATE TABLE IF NOT EXISTS {s}.init_runs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            namespace text NOT NULL,
            target text NOT NULL,
            status text NOT NULL CHECK (status IN ({_check(RunStatus)})),
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
    exists = await conn.scalar(
        text("SELECT to_regclass(:t) IS NOT NULL"),
        {"t": f"{quote_ident(schema)}.init_ledger"},
    )
    version = 0
    if exists:
        version = (
            await conn.scalar(
                text(f"SELECT max(version) FROM {quote_ident(schema)}.init_ledger")
            )
            or 0
        )
    if version >= LEDGER_VERSION:
        return
    for statement in _ddl(schema):
        await conn.execute(text(statement))
    await conn.execute(text(f"DELETE FROM {quote_ident(schema)}.init_ledger"))
    await conn.execute(
        text(f"INSERT INTO {quote_ident(schema)}.init_ledger VALUES (:v)"),
        {"v": LEDGER_VERSION},
    )
    logger.info("ledger tables in schema %r at version %d", schema, LEDGER_VERSION)


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
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return False
    return status == "SELECT 1"


@dataclasses.dataclass(frozen=True)
class GateState:
    """What a waiter or a fresh holder needs to decide its next move."""

    failures: int
    """Failed runs for the target since the namespace's last success."""
    last_error: str | None
    """Error of the latest of those failed runs."""
    last_failed_id: int | None
    """Its ``init_runs.id``."""
    running: dict[str, Any] | None
    """The latest ``running`` row (hostname, pid, started_at), if any."""


_STATE_SQL = """
WITH last_ok AS (
    SELECT coalesce(max(id), 0) AS ok_id FROM {s}.init_runs
    WHERE namespace = $1 AND status = 'succeeded'
), failed AS (
    SELECT id, error FROM {s}.init_runs, last_ok
    WHERE namespace = $1 AND target = $2 AND status = 'failed' AND id > ok_id
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


async def read_state(conn: Any, schema: str, namespace: str, target: str) -> GateState:
    """Read failure count and the running run; empty on a fresh database."""
    try:
        row = await conn.fetchrow(
            _STATE_SQL.format(s=quote_ident(schema)), namespace, target
        )
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return GateState(0, None, None, None)
    running = json.loads(row["running"]) if row["running"] else None
    return GateState(row["failures"], row["last_error"], row["last_failed_id"], running)


async def read_revisions(conn: Any, version_table: str) -> list[str]:
    """The revisions ``alembic_version`` holds; empty when it does not exist."""
    try:
        rows = await conn.fetch(f"SELECT version_num FROM {_table(version_table)}")
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
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
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
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


async def insert_step(
    conn: AsyncConnection,
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
) -> None:
    """Record one step of a run."""
    await conn.execute(
        text(
            f"INSERT INTO {quote_ident(schema)}.init_steps (run_id, kind, name, "
            "version, description, status, started_at, finished_at, duration_ms, "
            "error) VALUES (:run_id, :kind, :name, :version, :description, "
            ":status, :started, :finished, :ms, :error)"
        ),
        {
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
        },
    )


async def fetch_runs(
    conn: Any,
    schema: str,
    namespace: str | None,
    limit: int = 20,
    statuses: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The latest runs, newest first, each with its steps under ``"steps"``.

    Returns an empty list on a database the gate never ran against.
    """
    s = quote_ident(schema)
    statuses = list(statuses)
    try:
        runs = await conn.fetch(
            f"SELECT * FROM {s}.init_runs WHERE ($1::text IS NULL OR namespace = $1) "
            "AND (cardinality($2::text[]) = 0 OR status = ANY($2::text[])) "
            "ORDER BY id DESC LIMIT $3",
            namespace,
            statuses,
            limit,
        )
        steps = await conn.fetch(
            f"SELECT * FROM {s}.init_steps WHERE run_id = ANY($1::bigint[]) "
            "ORDER BY id",
            [r["id"] for r in runs],
        )
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return []
    by_run: dict[int, list[dict[str, Any]]] = {}
    for step in steps:
        by_run.setdefault(step["run_id"], []).append(dict(step))
    return [dict(run) | {"steps": by_run.get(run["id"], [])} for run in runs]
