"""What the operator commands read and do: status, plan, check, retry, prune.

Each function opens a short connection of its own, returns plain dataclasses
and prints nothing; :mod:`initgate.cli` renders them. Nothing here takes the
init lock except :func:`retry`, and that only with a try-lock.

The operator's sessions are named ``initgate-cli:<command>`` in
``pg_stat_activity``, apart from the gate's ``initgate:<namespace>:...``, so
that they never show up as holders or waiters themselves; ``retry``, which
holds the lock for a moment, is named like a gate session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import StaticPool

from initgate import connection, ledger, lock
from initgate.errors import (
    ConfigurationError,
    DatabaseAheadError,
    DatabaseUnavailableError,
    LockHeldError,
)
from initgate.seeds import SeedRegistry
from initgate.settings import Settings

# The gate and Alembic are imported by the functions that use them: history,
# show and prune (through cli) need neither, and Alembic alone is about half a
# second of CPU in every such process.
if TYPE_CHECKING:
    from initgate.gate import Gate
    from initgate.migrate import Migrations, PendingRevision

__all__ = [
    "CheckLevel",
    "Finding",
    "HolderReport",
    "Plan",
    "PruneResult",
    "RetryResult",
    "Session",
    "Status",
    "check",
    "connect",
    "is_gate_session_of",
    "parse_application_name",
    "prune",
    "read_holder",
    "read_plan",
    "read_status",
    "read_waiters",
    "retry",
]

# Operator commands give up on an unreachable database sooner than a worker
# does: someone is waiting at a terminal.
_OPERATOR_CONNECT_DEADLINE = 10.0

# Gate sessions set application_name to initgate:<namespace>:<host>:<pid>,
# cut to the 63 bytes PostgreSQL keeps (the namespace is what gets cut).
_APPLICATION_PREFIX = "initgate:"
_APPLICATION_NAME_BYTES = 63


async def connect(settings: Settings, command: str) -> Any:
    """A connection for one operator command, named for it.

    Raises:
        ConfigurationError: The URL, credentials or database are wrong.
        DatabaseUnavailableError: No connection within a few seconds.
    """
    return await connection.connect(
        settings,
        {"application_name": f"initgate-cli:{command}"},
        deadline=min(settings.connect_timeout, _OPERATOR_CONNECT_DEADLINE),
    )


# -- who holds the lock, who waits ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Session:
    """A database session, as ``pg_stat_activity`` shows it."""

    backend_pid: int
    application_name: str
    hostname: str | None
    """The worker's host, read from a gate session's application_name."""
    pid: int | None
    """The worker's process id, read the same way."""
    backend_start: dt.datetime | None
    state: str | None
    """``active``, ``idle``, ``idle in transaction``..."""
    query: str | None
    """The statement running, or the last one (first 200 characters)."""

    def describe(self) -> str:
        """``web-2 pid 41 (backend pid 777)``, or the application_name."""
        who = (
            f"{self.hostname} pid {self.pid}"
            if self.hostname is not None
            else self.application_name or "an unnamed session"
        )
        return f"{who} (backend pid {self.backend_pid})"


def parse_application_name(name: str) -> tuple[str, str, int] | None:
    """``(namespace, host, pid)`` of a gate session's name; None for others.

    The namespace may be cut short (PostgreSQL keeps 63 bytes); host and pid
    never are.
    """
    if not name.startswith(_APPLICATION_PREFIX):
        return None
    parts = name[len(_APPLICATION_PREFIX) :].rsplit(":", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def is_gate_session_of(name: str, namespace: str) -> bool:
    """Whether ``name`` is the application_name of a gate of ``namespace``."""
    parsed = parse_application_name(name)
    if parsed is None:
        return False
    shown = parsed[0]
    if shown == namespace:
        return True
    cut = len(name.encode()) >= _APPLICATION_NAME_BYTES
    return cut and bool(shown) and namespace.startswith(shown)


def _session(row: asyncpg.Record) -> Session:
    name = row["application_name"] or ""
    parsed = parse_application_name(name)
    return Session(
        backend_pid=row["pid"],
        application_name=name,
        hostname=parsed[1] if parsed else None,
        pid=parsed[2] if parsed else None,
        backend_start=row["backend_start"],
        state=row["state"],
        query=row["query"],
    )


_SESSIONS_SQL = """
SELECT pid, application_name, backend_start, state, left(query, 200) AS query
FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'initgate:%'
  AND pid <> pg_backend_pid()
ORDER BY backend_start, pid
"""


async def read_waiters(
    conn: Any, namespace: str, exclude: Iterable[int] = ()
) -> list[Session]:
    """The namespace's gate sessions other than ``exclude`` (the holder).

    These are workers waiting for the lock, or passing the warm check at
    that instant.
    """
    excluded = set(exclude)
    rows = await conn.fetch(_SESSIONS_SQL)
    return [
        _session(row)
        for row in rows
        if row["pid"] not in excluded
        and is_gate_session_of(row["application_name"] or "", namespace)
    ]


@dataclasses.dataclass(frozen=True)
class HolderReport:
    """Who holds a namespace's init lock, and what it is doing."""

    session: Session | None
    """The session holding the lock; None when the lock is free."""
    run: dict[str, Any] | None
    """The namespace's ``running`` run (id, hostname, pid, started_at)."""

    @property
    def since(self) -> dt.datetime | None:
        """When the run started, else when the holding session connected."""
        if self.run is not None:
            started = self.run["started_at"]
            if isinstance(started, str):
                return dt.datetime.fromisoformat(started)
            return started if isinstance(started, dt.datetime) else None
        return self.session.backend_start if self.session else None

    def describe(self, now: dt.datetime | None = None) -> str:
        """One phrase: run, host, pid, for how long, and the statement."""
        now = now or dt.datetime.now(dt.UTC)
        parts = []
        if self.run is not None:
            parts.append(
                f"run {self.run['id']} on {self.run['hostname']} pid {self.run['pid']}"
            )
        elif self.session is not None:
            parts.append(self.session.describe())
        since = self.since
        if since is not None:
            held = max(0.0, (now - since).total_seconds())
            parts.append(f"for {_seconds(held)} (since {since:%Y-%m-%d %H:%M:%S %Z})")
        if self.session is None:
            parts.append("and its session is gone: the next holder abandons it")
        elif self.session.state:
            doing = self.session.state
            if self.session.state == "active" and self.session.query:
                doing += f": {' '.join(self.session.query.split())[:120]}"
            parts.append(f"[{doing}]")
        return " ".join(parts)


def _seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


async def read_holder(
    conn: Any, settings: Settings, key: lock.LockKey
) -> HolderReport | None:
    """The lock's holder and its ``running`` run; None when neither exists."""
    holder = await lock.find_holder(conn, key)
    state = await ledger.read_state(
        conn, settings.ledger_schema, settings.effective_namespace, ""
    )
    if holder is None and state.running is None:
        return None
    session = None
    if holder is not None:
        parsed = parse_application_name(holder.application_name or "")
        session = Session(
            backend_pid=holder.backend_pid,
            application_name=holder.application_name or "",
            hostname=parsed[1] if parsed else None,
            pid=parsed[2] if parsed else None,
            backend_start=holder.backend_start,
            state=holder.state,
            query=holder.query,
        )
    return HolderReport(session, state.running)


# -- initgate status ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Status:
    """Where a namespace's init stands, against the code at hand."""

    namespace: str
    database_url: str
    """Password masked."""
    target: str
    up_to_date: bool
    """The warm check passes: workers start without taking the lock."""
    revisions: list[str]
    """What ``alembic_version`` holds."""
    heads: list[str] | None
    """The code's heads; None without migrations."""
    pending_revisions: list[PendingRevision]
    unknown_revisions: list[str]
    """Revisions in the database that the code does not know."""
    pending_seeds: list[tuple[str, str]]
    """(name, version) of the seed steps the next run would run."""
    holder: HolderReport | None
    waiters: list[Session]
    last_run: dict[str, Any] | None
    """The namespace's newest run with its steps, whatever its status."""
    failures: int
    """Failed runs for this target since the last success or retry."""
    max_attempts: int
    ledger_version: int

    @property
    def fail_fast(self) -> bool:
        """Workers would refuse to try init again for this target."""
        return self.failures >= self.max_attempts


async def read_status(gate: Gate) -> Status:
    """Read the database's init state against ``gate``'s code.

    Raises:
        ConfigurationError: Settings, alembic.ini, revisions or credentials.
        DatabaseUnavailableError: No connection within a few seconds.
    """
    settings = gate.settings
    schema = settings.ledger_schema
    namespace = gate.namespace
    target, heads = gate.target()
    conn = await connect(settings, "status")
    try:
        revisions = await ledger.read_revisions(conn, settings.version_table)
        warm = await ledger.is_warm(
            conn,
            ledger.warm_check_sql(
                schema, namespace, target, heads, settings.version_table
            ),
        )
        done = await ledger.read_done_seeds(conn, schema, namespace)
        state = await ledger.read_state(conn, schema, namespace, target)
        holder = await read_holder(conn, settings, gate.key)
        exclude = [conn.get_server_pid()]
        if holder is not None and holder.session is not None:
            exclude.append(holder.session.backend_pid)
        waiters = await read_waiters(conn, namespace, exclude)
        last = await ledger.fetch_runs(conn, schema, namespace, limit=1)
        version = await ledger.read_ledger_version(conn, schema)
    finally:
        await conn.close()

    migrations = gate.migrations
    unknown = migrations.unknown(revisions) if migrations else []
    pending = migrations.pending(revisions) if migrations and not unknown else []
    return Status(
        namespace=namespace,
        database_url=settings.masked_url,
        target=target,
        up_to_date=warm,
        revisions=revisions,
        heads=list(heads) if heads is not None else None,
        pending_revisions=pending,
        unknown_revisions=unknown,
        pending_seeds=[
            (step.name, step.version)
            for step in gate.seeds
            if (step.name, step.version) not in done
        ],
        holder=holder,
        waiters=waiters,
        last_run=last[0] if last else None,
        failures=state.failures,
        max_attempts=settings.max_attempts,
        ledger_version=version,
    )


# -- initgate plan --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the next run would do, for review before a deploy."""

    namespace: str
    up_to_date: bool
    revisions: list[str]
    """Where the database is now."""
    pending_revisions: list[PendingRevision]
    pending_seeds: list[tuple[str, str]]
    sql: str
    """The pending revisions' SQL from Alembic's offline mode; empty if none."""


async def _read_plan_state(gate: Gate) -> tuple[list[str], set[tuple[str, str]], bool]:
    settings = gate.settings
    target, heads = gate.target()
    conn = await connect(settings, "plan")
    try:
        revisions = await ledger.read_revisions(conn, settings.version_table)
        done = await ledger.read_done_seeds(
            conn, settings.ledger_schema, gate.namespace
        )
        warm = await ledger.is_warm(
            conn,
            ledger.warm_check_sql(
                settings.ledger_schema,
                gate.namespace,
                target,
                heads,
                settings.version_table,
            ),
        )
    finally:
        await conn.close()
    return revisions, done, warm


def read_plan(gate: Gate) -> Plan:
    """Read the database's state, then render the pending SQL offline.

    Blocking: runs its own event loop for the reads, then env.py in offline
    mode, which connects to nothing.

    Raises:
        DatabaseAheadError: The database has revisions the code lacks.
        ConfigurationError: As for :func:`read_status`, or env.py cannot run
            in offline mode.
        DatabaseUnavailableError: No connection within a few seconds.
    """
    revisions, done, warm = asyncio.run(_read_plan_state(gate))
    migrations = gate.migrations
    pending: list[PendingRevision] = []
    sql = ""
    if migrations is not None:
        unknown = migrations.unknown(revisions)
        if unknown:
            raise DatabaseAheadError(
                f"the database is at revision {', '.join(unknown)}, which this "
                "code does not know: no plan to make; deploy the release that "
                "has it"
            )
        pending = migrations.pending(revisions)
        if pending:
            sql = migrations.offline_sql(revisions)
    return Plan(
        namespace=gate.namespace,
        up_to_date=warm,
        revisions=revisions,
        pending_revisions=pending,
        pending_seeds=[
            (step.name, step.version)
            for step in gate.seeds
            if (step.name, step.version) not in done
        ],
        sql=sql,
    )


# -- initgate check -------------------------------------------------------------


class CheckLevel(enum.StrEnum):
    """How one finding of ``initgate check`` came out."""

    OK = "ok"
    """As it should be."""
    WARN = "warn"
    """Works, with a weaker guarantee or an action due soon."""
    FAIL = "FAIL"
    """The gate would fail, or the database does not match the code."""
    SKIP = "skip"
    """Not checked, because an earlier finding failed."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One line of ``initgate check``."""

    level: CheckLevel
    check: str
    """What was checked: ``database``, ``credentials``, ``alembic``..."""
    message: str


# Checks that need a connection, reported as skipped when there is none.
_DATABASE_CHECKS = (
    "server version",
    "heads",
    "ledger privileges",
    "advisory locks",
    "fail-fast",
    "changed revisions",
)

# A lock key no namespace uses in practice (the hash of a name with a NUL).
_THROWAWAY_KEY = lock.LockKey.for_namespace("\0initgate check")


async def check(settings: Settings, seeds: SeedRegistry | None) -> list[Finding]:
    """Verify the setup: connection, Alembic, privileges, locks, drift.

    Never raises for what it checks; every problem is a FAIL finding.
    """
    findings: list[Finding] = []
    migrations = _check_alembic(settings, findings)
    try:
        conn = await connect(settings, "check")
    except DatabaseUnavailableError as exc:
        findings.insert(0, Finding(CheckLevel.FAIL, "database", str(exc)))
        return findings + _skipped("the database is unreachable")
    except ConfigurationError as exc:
        findings.insert(0, Finding(CheckLevel.OK, "database", "reachable"))
        findings.insert(1, Finding(CheckLevel.FAIL, "credentials", str(exc)))
        return findings + _skipped("the role cannot log in")
    try:
        head = await _check_connection(conn, settings)
        findings[:0] = head
        findings.extend(await _check_database(conn, settings, migrations, seeds))
    finally:
        await conn.close()
    return findings


def _skipped(why: str) -> list[Finding]:
    return [
        Finding(CheckLevel.SKIP, name, f"not checked: {why}")
        for name in _DATABASE_CHECKS
    ]


def _check_alembic(settings: Settings, findings: list[Finding]) -> Migrations | None:
    if settings.alembic_config is None:
        findings.append(
            Finding(
                CheckLevel.OK,
                "alembic",
                "no alembic.ini configured (INITGATE_ALEMBIC_CONFIG is empty): "
                "seed steps only",
            )
        )
        return None
    from initgate.migrate import Migrations

    try:
        migrations = Migrations(settings.alembic_config)
        revisions = list(migrations.script.walk_revisions())
        heads = migrations.heads()
    except ConfigurationError as exc:
        findings.append(Finding(CheckLevel.FAIL, "alembic", str(exc)))
        return None
    except Exception as exc:
        findings.append(
            Finding(
                CheckLevel.FAIL,
                "alembic",
                f"revisions under {str(settings.alembic_config)!r} do not load: "
                f"{type(exc).__name__}: {exc}",
            )
        )
        return None
    findings.append(
        Finding(
            CheckLevel.OK,
            "alembic",
            f"{settings.alembic_config} loads: {len(revisions)} revisions in "
            f"{_show_path(migrations.script.dir)}, heads {', '.join(heads) or 'none'}",
        )
    )
    return migrations


async def _check_connection(conn: Any, settings: Settings) -> list[Finding]:
    row = await conn.fetchrow(
        "SELECT current_user AS role, current_setting('server_version') AS version,"
        " current_setting('server_version_num')::int AS number"
    )
    findings = [
        Finding(CheckLevel.OK, "database", f"reachable at {settings.masked_url}"),
        Finding(CheckLevel.OK, "credentials", f"logged in as role {row['role']}"),
    ]
    if row["number"] >= 140000:
        findings.append(
            Finding(
                CheckLevel.OK,
                "server version",
                f"PostgreSQL {row['version']}: client_connection_check_interval "
                "frees a killed holder's lock within a second",
            )
        )
    else:
        findings.append(
            Finding(
                CheckLevel.WARN,
                "server version",
                f"PostgreSQL {row['version']} has no client_connection_check_"
                "interval (14+): a holder killed mid-statement keeps the lock "
                "until that statement ends",
            )
        )
    return findings


async def _check_database(
    conn: Any,
    settings: Settings,
    migrations: Migrations | None,
    seeds: SeedRegistry | None,
) -> list[Finding]:
    findings = []
    findings.append(await _check_heads(conn, settings, migrations))
    findings.append(await _check_ledger_privileges(conn, settings))
    findings.append(await _check_advisory_locks(conn))
    findings.append(await _check_fail_fast(conn, settings))
    findings.extend(await _check_changed_revisions(conn, settings, migrations))
    return findings


async def _check_heads(
    conn: Any, settings: Settings, migrations: Migrations | None
) -> Finding:
    if migrations is None:
        return Finding(CheckLevel.SKIP, "heads", "not checked: no Alembic project")
    revisions = await ledger.read_revisions(conn, settings.version_table)
    unknown = migrations.unknown(revisions)
    if unknown:
        return Finding(
            CheckLevel.FAIL,
            "heads",
            f"the database is at {', '.join(unknown)}, which this code does not "
            "know (a newer release migrated it): workers refuse to start",
        )
    pending = migrations.pending(revisions)
    at = ", ".join(revisions) or "no revision"
    if pending:
        return Finding(
            CheckLevel.OK,
            "heads",
            f"the database is at {at}; {len(pending)} revisions to apply: "
            + ", ".join(p.revision for p in pending),
        )
    return Finding(
        CheckLevel.OK, "heads", f"the database is at the code's heads ({at})"
    )


async def _check_ledger_privileges(conn: Any, settings: Settings) -> Finding:
    schema = settings.ledger_schema
    name = "ledger privileges"
    version = await ledger.read_ledger_version(conn, schema)
    quoted = ledger.quote_ident(schema)
    if version >= ledger.LEDGER_VERSION:
        missing = [
            f"{privilege} on {table}"
            for table, privileges in (
                ("init_runs", ("SELECT", "INSERT", "UPDATE")),
                ("init_steps", ("SELECT", "INSERT")),
            )
            for privilege in privileges
            if not await conn.fetchval(
                "SELECT has_table_privilege($1, $2)", f"{quoted}.{table}", privilege
            )
        ]
        if missing:
            return Finding(
                CheckLevel.FAIL,
                name,
                f"ledger v{version} in schema {schema!r}, but the role lacks "
                + ", ".join(missing),
            )
        return Finding(
            CheckLevel.OK,
            name,
            f"ledger v{version} in schema {schema!r}; the role may read and write it",
        )
    if version > 0:
        owner = await conn.fetchrow(
            "SELECT pg_get_userbyid(relowner) AS owner, "
            "pg_has_role(relowner, 'USAGE') AS may FROM pg_class "
            "WHERE oid = to_regclass($1)",
            f"{quoted}.init_runs",
        )
        if owner is not None and owner["may"]:
            return Finding(
                CheckLevel.OK,
                name,
                f"ledger v{version} in schema {schema!r}; the next run upgrades it "
                f"to v{ledger.LEDGER_VERSION}, as the role may",
            )
        return Finding(
            CheckLevel.FAIL,
            name,
            f"ledger v{version} in schema {schema!r} needs an upgrade to "
            f"v{ledger.LEDGER_VERSION}, which only its owner "
            f"{owner['owner'] if owner else '?'} may make: run the app once as "
            "that role",
        )
    exists = await conn.fetchval("SELECT to_regnamespace($1) IS NOT NULL", quoted)
    if exists:
        # A plain name here: unlike to_regnamespace, it is not parsed.
        may = await conn.fetchval("SELECT has_schema_privilege($1, 'CREATE')", schema)
        where = f"schema {schema!r}"
    else:
        may = await conn.fetchval(
            "SELECT has_database_privilege(current_database(), 'CREATE')"
        )
        where = f"this database (schema {schema!r} does not exist yet)"
    if may:
        return Finding(
            CheckLevel.OK,
            name,
            f"no ledger yet; the role may create it in {where}",
        )
    return Finding(
        CheckLevel.FAIL,
        name,
        f"no ledger yet, and the role may not create tables in {where}: "
        f"GRANT CREATE ON {'SCHEMA ' + quoted if exists else 'DATABASE'} to it, "
        "or set INITGATE_SCHEMA to a schema it may create in",
    )


async def _check_advisory_locks(conn: Any) -> Finding:
    name = "advisory locks"
    try:
        got = await lock.try_lock(conn, _THROWAWAY_KEY)
        if got:
            await lock.unlock(conn, _THROWAWAY_KEY)
    except asyncpg.PostgresError as exc:
        return Finding(CheckLevel.FAIL, name, f"pg_try_advisory_lock failed: {exc}")
    how = "took and released" if got else "tried (another check held it)"
    return Finding(
        CheckLevel.OK, name, f"{how} a throwaway session-level advisory lock"
    )


async def _check_fail_fast(conn: Any, settings: Settings) -> Finding:
    failures = await ledger.unreset_failures(
        conn, settings.ledger_schema, settings.effective_namespace
    )
    if not failures:
        return Finding(
            CheckLevel.OK, "fail-fast", "no failed run since the last success"
        )
    last = failures[-1]
    level = CheckLevel.WARN if len(failures) >= settings.max_attempts else CheckLevel.OK
    return Finding(
        level,
        "fail-fast",
        f"{len(failures)} failed runs since the last success (last: run "
        f"{last['id']}: {last['error']}); at INITGATE_MAX_ATTEMPTS="
        f"{settings.max_attempts} workers fail fast for that code until a fix "
        "or `initgate retry`",
    )


async def _check_changed_revisions(
    conn: Any, settings: Settings, migrations: Migrations | None
) -> list[Finding]:
    name = "changed revisions"
    if migrations is None:
        return [Finding(CheckLevel.SKIP, name, "not checked: no Alembic project")]
    recorded = await ledger.read_checksums(
        conn, settings.ledger_schema, settings.effective_namespace
    )
    if not recorded:
        return [
            Finding(
                CheckLevel.OK,
                name,
                "no checksums recorded yet (nothing applied through a v2 ledger)",
            )
        ]
    runs = {record.revision: record for record in recorded}
    changed = migrations.changed_since_applied(
        {record.revision: record.checksum for record in recorded}
    )
    if not changed:
        return [
            Finding(
                CheckLevel.OK,
                name,
                f"{len(recorded)} applied revisions match their files",
            )
        ]
    return [
        Finding(
            CheckLevel.FAIL,
            name,
            f"revision {item.revision} was applied by run "
            f"{runs[item.revision].run_id} at "
            f"{runs[item.revision].applied_at:%Y-%m-%d %H:%M:%S %Z}, and "
            f"{_show_path(item.path)} has changed since (sha256 "
            f"{item.recorded[:12]}, now "
            f"{item.current[:12] if item.current else 'unreadable'}): restore it "
            "and put the change in a new revision",
        )
        for item in changed
    ]


def _show_path(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


# -- initgate retry -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetryResult:
    """What ``initgate retry`` recorded."""

    run_id: int | None
    """The ``retry`` row; None when there was nothing to lift."""
    lifted: list[dict[str, Any]]
    """The failed runs (id, target, started_at, error) no longer counted."""


async def retry(settings: Settings) -> RetryResult:
    """Lift the fail-fast state: record a ``retry`` run under the lock.

    Takes the init lock with a try-lock only, so it never runs while a
    holder is at work, and never waits.

    Raises:
        LockHeldError: Another session holds the init lock.
        ConfigurationError: Settings, credentials, or ledger privileges.
        DatabaseUnavailableError: No connection within a few seconds.
    """
    from initgate.gate import Gate

    # Named like a gate session, so that status shows it as the holder.
    gate = Gate(settings.model_copy(update={"alembic_config": None}), SeedRegistry())
    conn = await connection.connect(
        settings,
        {"application_name": gate.application_name()},
        deadline=min(settings.connect_timeout, _OPERATOR_CONNECT_DEADLINE),
    )
    try:
        if not await lock.try_lock(conn, gate.key):
            holder = await read_holder(conn, settings, gate.key)
            raise LockHeldError(
                f"the init lock of {gate.namespace!r} is held"
                + (f" by {holder.describe()}" if holder else "")
                + "; not lifting fail-fast under a running init: try again "
                "once it is done"
            )
        try:
            return await _record_retry(conn, settings, gate)
        finally:
            if not conn.is_closed():
                await lock.unlock(conn, gate.key)
    finally:
        await conn.close()


async def _record_retry(conn: Any, settings: Settings, gate: Gate) -> RetryResult:
    schema = settings.ledger_schema
    failures = await ledger.unreset_failures(conn, schema, gate.namespace)
    if not failures:
        return RetryResult(None, [])
    revisions = ",".join(await ledger.read_revisions(conn, settings.version_table))

    async def same_connection() -> Any:
        return conn

    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=same_connection, poolclass=StaticPool
    )
    try:
        async with engine.connect() as sa:
            # A version 1 ledger's check constraint has no 'retry' yet.
            await ledger.ensure_schema(sa, schema, lock.CLASSID)
            run_id = await ledger.insert_retry(
                sa,
                schema,
                namespace=gate.namespace,
                target=failures[-1]["target"],
                hostname=gate.hostname,
                pid=os.getpid(),
                backend_pid=conn.get_server_pid(),
                revision_from=revisions or None,
                revision_to=revisions or None,
                code_version=settings.code_version,
            )
            await sa.commit()
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigurationError(
            f"cannot record the retry in schema {schema!r}: {exc}"
        ) from None
    return RetryResult(run_id, failures)


# -- initgate prune -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """What ``initgate prune`` deleted, or would delete."""

    run_ids: list[int]
    dry_run: bool


async def prune(
    settings: Settings,
    *,
    keep: int | None,
    older_than: dt.timedelta | None,
    all_namespaces: bool = False,
    dry_run: bool = False,
) -> PruneResult:
    """Delete old runs; see :func:`initgate.ledger.prune_runs` for what stays.

    Raises:
        ConfigurationError: Neither ``keep`` nor ``older_than``; settings,
            credentials or privileges.
        DatabaseUnavailableError: No connection within a few seconds.
    """
    if keep is None and older_than is None:
        raise ConfigurationError("prune: give --keep N, --older-than DURATION, or both")
    before = dt.datetime.now(dt.UTC) - older_than if older_than is not None else None
    conn = await connect(settings, "prune")
    try:
        ids = await ledger.prune_runs(
            conn,
            settings.ledger_schema,
            None if all_namespaces else settings.effective_namespace,
            keep=keep,
            before=before,
            dry_run=dry_run,
        )
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigurationError(f"cannot delete runs: {exc}") from None
    finally:
        await conn.close()
    return PruneResult(ids, dry_run)
