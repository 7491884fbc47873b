"""The protocol one worker follows at the gate.

::

    connect (retry until connect_timeout)
    warm check, one round trip ─── up to date ──────────────► PASS
    loop
        try-lock; the first time, check that the session keeps
            one backend ─── no: a pooler, unless declared ──► FAIL
        got the lock ──► HOLDER
        LISTEN (first time), then read the ledger
            init done ─────────────────────────────────────► PASS
            failed max_attempts times ────────────────────► FAIL FAST
        wait for NOTIFY or poll_interval; past wait_timeout ► TIMEOUT
        woken by NOTIFY: read the ledger as above, then loop
    HOLDER
        warm check again ─── up to date ──────────────────► PASS
        ensure ledger tables; mark dead runs abandoned
        insert 'running' run; commit
        alembic upgrade heads on this connection
        pending seed steps, a transaction each
        mark 'succeeded', NOTIFY, commit, unlock ─────────► PASS
        on error: mark 'failed', NOTIFY, commit, unlock ──► raise

Everything a holder writes goes through the one connection that holds the
lock: if its session dies, the lock and the ability to write die with it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import logging
import os
import random
import socket
import time
import traceback
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate import connection, drivers, ledger, lock, pooler
from initgate.drivers import Driver, Session
from initgate.errors import (
    ConfigurationError,
    DatabaseAheadError,
    DatabaseUnavailableError,
    FailFastError,
    InitFailedError,
    InitGateError,
    UnsupportedConnectionError,
    WaitTimeoutError,
)
from initgate.ledger import RunStatus, StepKind, StepStatus
from initgate.migrate import (
    AppliedRevision,
    Migrations,
    UpgradeFailedError,
    UpgradeReport,
)
from initgate.seeds import SeedRegistry, SeedStep
from initgate.settings import Settings

__all__ = ["Gate", "GateResult", "Outcome", "Phase", "compute_target"]

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where a worker is in the protocol; ``Gate.phase`` shows it live."""

    IDLE = "idle"
    """Not started."""
    CONNECTING = "connecting"
    """Opening the gate's connection, retrying while PostgreSQL is not up."""
    CHECKING = "checking"
    """Running the warm check."""
    WAITING = "waiting"
    """Another worker holds the lock; waiting for its NOTIFY or a poll."""
    HOLDING = "holding"
    """Holds the lock; preparing the run."""
    MIGRATING = "migrating"
    """Holds the lock; Alembic is upgrading."""
    SEEDING = "seeding"
    """Holds the lock; running seed steps."""
    PASSED = "passed"
    """Init is committed; the worker may serve."""
    FAILED = "failed"
    """The gate raised; the worker must not serve."""


class Outcome(enum.StrEnum):
    """How a worker passed the gate."""

    UP_TO_DATE = "up_to_date"
    """The warm check passed: no lock taken, nothing written."""
    WAITED = "waited"
    """Another worker finished init while this one waited."""
    RAN = "ran"
    """This worker held the lock and recorded a run."""
    DATABASE_AHEAD = "database_ahead"
    """The database is at revisions this code lacks; allowed by a setting."""


@dataclasses.dataclass(frozen=True)
class GateResult:
    """What passing the gate took."""

    outcome: Outcome
    target: str
    elapsed_ms: float
    """From entering the gate to passing it, connecting included."""
    waited_ms: float = 0.0
    """Time spent waiting for another holder."""
    run_id: int | None = None
    """The run this worker recorded, when it was the holder."""
    migrated: tuple[str, ...] = ()
    seeded: tuple[str, ...] = ()


def compute_target(heads: tuple[str, ...] | None, seeds: SeedRegistry) -> str:
    """Digest of the head revisions and every seed step's name and version.

    Any change to either makes init run once more.
    """
    digest = hashlib.sha256()
    for head in heads or ():
        digest.update(b"rev\0" + head.encode() + b"\0")
    for step in seeds:
        digest.update(b"seed\0" + step.name.encode() + b"\0" + step.version.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


_MAX_SESSION_LOSSES = 3
"""Times one ``run()`` enters the gate again after its session died."""


class Gate:
    """Runs the protocol for one namespace; one ``run()`` per worker start."""

    def __init__(
        self,
        settings: Settings,
        seeds: SeedRegistry,
        migrations: Migrations | None = None,
        *,
        preferred_driver: Driver = Driver.ASYNCPG,
    ) -> None:
        self.settings = settings
        self.seeds = seeds
        if migrations is None and settings.alembic_config is not None:
            migrations = Migrations(settings.alembic_config)
        self.migrations = migrations
        self.namespace = settings.effective_namespace
        self.key = lock.LockKey.for_namespace(self.namespace)
        self.driver = Driver(settings.gate_driver(preferred_driver))
        """The driver of the gate's session; see ``Settings.driver``."""
        self.phase = Phase.IDLE
        self.hostname = socket.gethostname()
        self.backend_pid: int | None = None
        """The backend pid of the gate's session, once it tried the lock."""

    def application_name(self) -> str:
        """``initgate:<namespace>:<host>:<pid>``, as ``pg_stat_activity`` shows.

        PostgreSQL keeps 63 bytes of it; a long namespace is shortened so
        that host and pid, which name the worker, always survive.
        """
        tail = f":{self.hostname}:{os.getpid()}".encode()
        room = max(0, 63 - len(b"initgate:") - len(tail))
        namespace = self.namespace.encode()[:room].decode(errors="ignore")
        return f"initgate:{namespace}{tail.decode()}"[:63]

    def target(self) -> tuple[str, tuple[str, ...] | None]:
        """The target digest and the code's heads (None without migrations)."""
        heads = self.migrations.heads() if self.migrations else None
        return compute_target(heads, self.seeds), heads

    async def run(self) -> GateResult:
        """Pass the gate: return once init is committed, by anyone.

        Blocks until then. Safe to call from any number of processes at once.

        Raises:
            ConfigurationError: Bad settings, Alembic files or credentials.
            DatabaseUnavailableError: No connection before ``connect_timeout``.
            InitFailedError: A step failed here (recorded as a failed run).
            FailFastError: Init for this target failed ``max_attempts`` times.
            WaitTimeoutError: The holder did not finish within ``wait_timeout``.
            DatabaseAheadError: The database has revisions the code lacks.
            UnsupportedConnectionError: The connection does not keep one
                session (a pooler in transaction mode); nothing was written.
        """
        started = time.monotonic()
        try:
            result = await self._run(started)
        except BaseException:
            self.phase = Phase.FAILED
            raise
        self.phase = Phase.PASSED
        return result

    async def _run(self, started: float) -> GateResult:
        target, heads = self.target()
        warm_sql = ledger.warm_check_sql(
            self.settings.ledger_schema,
            self.namespace,
            target,
            heads,
            self.settings.version_table,
        )
        losses = 0
        while True:
            try:
                return await self._enter(started, target, warm_sql)
            except _SessionLost as lost:
                losses += 1
                self._after_session_loss(lost, losses)

    async def _enter(self, started: float, target: str, warm_sql: str) -> GateResult:
        """One pass through the protocol on one session."""
        conn = await self._connect()
        try:
            self.phase = Phase.CHECKING
            if await ledger.is_warm(conn, warm_sql):
                result = GateResult(Outcome.UP_TO_DATE, target, _ms_since(started))
                logger.info(
                    "init of %r up to date (target %s); passed in %.1f ms "
                    "without taking the lock",
                    self.namespace,
                    target[:12],
                    result.elapsed_ms,
                )
                return result
            try:
                return await self._wait_or_hold(conn, started, target, warm_sql)
            except pooler.SHARED_SESSION_ERRORS as exc:
                # Only from before holding: a holder's own errors are
                # recorded in its run and raised as InitFailedError.
                raise pooler.shared_session_error(
                    exc, self.settings.masked_url
                ) from None
        except Exception as exc:
            if conn.is_closed():
                raise _SessionLost(self.phase, exc) from exc
            raise
        finally:
            await conn.close()

    def _after_session_loss(self, lost: _SessionLost, losses: int) -> None:
        """Enter the gate again on a new session, or give up after a few losses.

        A dead session (server restart, terminated backend, broken network)
        took its lock with it, and a holder wrote everything through it, so
        its unfinished run is only a 'running' row for the next holder to
        mark abandoned. Entering again is what a worker starting now would
        do. Bounded, so that a step that kills its session every time ends
        in an error instead of a loop.
        """
        reason = _one_line(lost.error, self.settings)
        if losses > _MAX_SESSION_LOSSES:
            raise DatabaseUnavailableError(
                f"lost the session to {self.settings.masked_url} {losses} times "
                f"during init of {self.namespace!r} (last while "
                f"{lost.phase.value}: {reason}); look at the server's log"
            ) from None
        logger.warning(
            "lost the session to %s while %s (%s); its lock went with it; "
            "entering the gate again on a new session (%d of %d)",
            self.settings.masked_url,
            lost.phase.value,
            reason,
            losses,
            _MAX_SESSION_LOSSES,
        )

    # -- connecting -------------------------------------------------------

    async def _connect(self) -> Session:
        self.phase = Phase.CONNECTING
        return await self._open_session()

    async def _open_session(self) -> Session:
        """A new session as the gate opens them: its driver, its parameters."""
        session: Session = await connection.connect(
            self.settings, self._server_settings(), driver=self.driver
        )
        return session

    def _server_settings(self) -> dict[str, str]:
        settings = self.settings
        server_settings = {
            "application_name": self.application_name(),
            # The gate inlines literals into its warm check; with this set,
            # doubling quotes is all the escaping a literal needs.
            "standard_conforming_strings": "on",
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "5",
            "tcp_keepalives_count": "3",
        }
        if settings.connection_check_interval:
            server_settings["client_connection_check_interval"] = str(
                settings.connection_check_interval
            )
        return server_settings

    async def _check_session(
        self, conn: Session, backend_pid: int, holding: bool
    ) -> pooler.SessionCheck:
        """Fail unless the connection keeps one backend (no transaction pooler)."""
        try:
            return await pooler.check_session(
                conn,
                self.key,
                backend_pid,
                holding=holding,
                open_probe=self._open_session,
                where=self.settings.masked_url,
                session_pooler_allowed=self.settings.allow_session_pooler,
            )
        except UnsupportedConnectionError:
            if holding:
                await pooler.release_lock(conn, self.key)
            raise

    # -- waiting ----------------------------------------------------------

    async def _wait_or_hold(
        self, conn: Session, started: float, target: str, warm_sql: str
    ) -> GateResult:
        settings = self.settings
        woken = False
        listening = False
        wait_started = time.monotonic()
        deadline = wait_started + settings.wait_timeout
        next_warning = wait_started + settings.long_wait_warning

        session: pooler.SessionCheck | None = None
        while True:
            if woken and await self._init_is_done(conn, target, warm_sql):
                # Woken by the holder's NOTIFY: its run is committed, so one
                # query passes; trying the lock first would cost every
                # waiter a round trip and send one through the holder path.
                return self._waited(started, target, wait_started)
            got, backend_pid = await lock.try_lock_in_backend(conn, self.key)
            if session is None:
                # Once, on the first try: free on a direct connection, a few
                # queries behind a pooler. Nothing is written before it.
                session = await self._check_session(conn, backend_pid, got)
                self.backend_pid = session.backend_pid
            if got:
                waited = _ms_since(wait_started) if listening else 0.0
                return await self._hold(conn, started, target, warm_sql, waited)
            self.phase = Phase.WAITING
            if not listening:
                # LISTEN runs outside a transaction here, so it is in effect
                # as soon as it returns; the ledger read below then catches a
                # NOTIFY sent just before it.
                await conn.listen(self.key.channel)
                await pooler.check_listening(
                    conn, self.key.channel, session, where=settings.masked_url
                )
                listening = True
                logger.info(
                    "init lock %s of %r is held by another worker; waiting",
                    self.key,
                    self.namespace,
                )
                if await self._init_is_done(conn, target, warm_sql):
                    return self._waited(started, target, wait_started)

            now = time.monotonic()
            if now >= deadline:
                raise WaitTimeoutError(await self._timeout_message(conn, target))
            if now >= next_warning:
                logger.warning(
                    "still waiting for init of %r after %.0f s: %s; it gives "
                    "up after INITGATE_WAIT_TIMEOUT=%g s",
                    self.namespace,
                    now - wait_started,
                    await self._describe_holder(conn, target),
                    settings.wait_timeout,
                )
                next_warning = now + settings.long_wait_warning
            # Between NOTIFYs a waiter only tries the lock: the holder sends
            # one when its run ends, failed or not, and one that went
            # unheard costs no more than a pass through the holder path,
            # which reads the ledger itself. The jitter keeps a herd that
            # started together from polling together.
            poll = settings.poll_interval * random.uniform(0.5, 1.0)
            woken = await conn.idle(min(poll, deadline - now))

    def _waited(self, started: float, target: str, wait_started: float) -> GateResult:
        waited = _ms_since(wait_started)
        logger.info(
            "waited %.0f ms; another worker completed init of %r",
            waited,
            self.namespace,
        )
        return GateResult(Outcome.WAITED, target, _ms_since(started), waited_ms=waited)

    async def _init_is_done(self, conn: Session, target: str, warm_sql: str) -> bool:
        """Whether init reached the target; raise FailFastError if it keeps failing.

        Two queries when init is not done: the warm check, the failure count.
        """
        if await ledger.is_warm(conn, warm_sql):
            return True
        self._fail_fast(await self._read_state(conn, target))
        return False

    async def _read_state(self, conn: Session, target: str) -> ledger.GateState:
        return await ledger.read_state(
            conn, self.settings.ledger_schema, self.namespace, target
        )

    def _fail_fast(self, state: ledger.GateState) -> None:
        if state.failures >= self.settings.max_attempts:
            raise FailFastError(
                f"init of {self.namespace!r} failed {state.failures} times for "
                f"this code (last: run {state.last_failed_id}: {state.last_error}); "
                "not trying again: deploy a fix, or run `initgate retry`",
                run_id=state.last_failed_id,
            )

    async def _describe_holder(self, conn: Session, target: str) -> str:
        state = await self._read_state(conn, target)
        holder = await lock.find_holder(conn, self.key)
        running = state.running
        if running is not None:
            text = (
                f"run {running['id']} on {running['hostname']} pid "
                f"{running['pid']} since {running['started_at']}"
            )
            if holder is not None:
                text += f", session {holder.describe()}"
            return text
        if holder is not None:
            return f"held by {holder.describe()}"
        return "the lock is free now"

    async def _timeout_message(self, conn: Session, target: str) -> str:
        return (
            f"waited {self.settings.wait_timeout:g} s for the init lock "
            f"{self.key} of {self.namespace!r}: "
            f"{await self._describe_holder(conn, target)}; raise "
            "INITGATE_WAIT_TIMEOUT or look at that worker"
        )

    # -- holding ----------------------------------------------------------

    async def _hold(
        self,
        conn: Session,
        started: float,
        target: str,
        warm_sql: str,
        waited_ms: float,
    ) -> GateResult:
        self.phase = Phase.HOLDING
        logger.info(
            "took the init lock %s of %r (backend pid %s)",
            self.key,
            self.namespace,
            self.backend_pid,
        )
        try:
            if await ledger.is_warm(conn, warm_sql):
                logger.info(
                    "init of %r was completed by another worker just before",
                    self.namespace,
                )
                return GateResult(
                    Outcome.WAITED, target, _ms_since(started), waited_ms=waited_ms
                )
            self._fail_fast(await self._read_state(conn, target))
            if self.migrations is not None:
                ahead = self.migrations.unknown(
                    await ledger.read_revisions(conn, self.settings.version_table)
                )
                if ahead:
                    return self._database_ahead(ahead, target, started)
            return await self._run_init(conn, started, target, waited_ms)
        finally:
            if not conn.is_closed():
                await lock.unlock(conn, self.key)

    def _database_ahead(
        self, ahead: list[str], target: str, started: float
    ) -> GateResult:
        message = (
            f"the database is at revision {', '.join(ahead)}, which this code "
            "does not know: it was migrated by a newer release"
        )
        if not self.settings.allow_unknown_revisions:
            raise DatabaseAheadError(
                message + "; deploy that release, or set "
                "INITGATE_ALLOW_UNKNOWN_REVISIONS=true to start anyway"
            )
        logger.warning(
            "%s; starting anyway (INITGATE_ALLOW_UNKNOWN_REVISIONS) without "
            "migrating or seeding",
            message,
        )
        return GateResult(Outcome.DATABASE_AHEAD, target, _ms_since(started))

    async def _run_init(
        self, conn: Session, started: float, target: str, waited_ms: float
    ) -> GateResult:
        settings = self.settings
        schema = settings.ledger_schema
        revisions_before = await ledger.read_revisions(conn, settings.version_table)
        done_seeds = await ledger.read_done_seeds(conn, schema, self.namespace)
        async with drivers.sqlalchemy_connection(conn) as sa:
            try:
                run_id = await self._open_run(sa, conn, target, revisions_before)
            except sqlalchemy.exc.DBAPIError as exc:
                if conn.is_closed():
                    raise
                raise self._ledger_error(exc) from None
            await self._warn_about_changed_revisions(conn)
            try:
                migrated = await self._migrate(sa, conn, run_id)
                seeded = await self._seed(sa, run_id, done_seeds)
                revisions_after = await ledger.read_revisions(
                    conn, settings.version_table
                )
                await ledger.finish_run(
                    sa,
                    schema,
                    run_id,
                    RunStatus.SUCCEEDED,
                    channel=self.key.channel,
                    revision_to=",".join(revisions_after) or None,
                )
                await sa.commit()
            except Exception as exc:
                raise await self._record_failure(sa, conn, run_id, exc) from exc
        result = GateResult(
            Outcome.RAN,
            target,
            _ms_since(started),
            waited_ms=waited_ms,
            run_id=run_id,
            migrated=tuple(migrated),
            seeded=tuple(seeded),
        )
        logger.info(
            "init of %r succeeded: run %d, %d revisions, %d seed steps, %.0f ms in all",
            self.namespace,
            run_id,
            len(migrated),
            len(seeded),
            result.elapsed_ms,
        )
        return result

    async def _open_run(
        self,
        sa: AsyncConnection,
        conn: Session,
        target: str,
        revisions_before: list[str],
    ) -> int:
        schema = self.settings.ledger_schema
        await ledger.ensure_schema(sa, schema, lock.CLASSID)
        for dead in await ledger.abandon_running(sa, schema, self.namespace):
            logger.warning(
                "took over init of %r from a dead holder: run %d by %s pid %d "
                "since %s is now abandoned; look at that worker's logs for "
                "why it died",
                self.namespace,
                dead["id"],
                dead["hostname"],
                dead["pid"],
                dead["started_at"],
            )
        run_id = await ledger.insert_run(
            sa,
            schema,
            namespace=self.namespace,
            target=target,
            hostname=self.hostname,
            pid=os.getpid(),
            # Behind a session pooler the connection's own key names no
            # backend; the pid the try-lock reported does.
            backend_pid=self.backend_pid or conn.get_server_pid(),
            revision_from=",".join(revisions_before) or None,
            code_version=self.settings.code_version,
        )
        # Committed at once: a holder that dies from here on leaves a
        # visible 'running' row for the next holder to mark abandoned.
        await sa.commit()
        return run_id

    def _ledger_error(self, exc: sqlalchemy.exc.DBAPIError) -> ConfigurationError:
        """Say in one line why the ledger could not be written, and what to do."""
        cause = exc.orig.__cause__ if exc.orig is not None else None
        driver_error = cause if isinstance(cause, Exception) else exc.orig or exc
        reason = " ".join(str(getattr(driver_error, "args", [""])[0]).split())
        sqlstate = drivers.sqlstate(exc)
        where = (
            f"the ledger in schema {self.settings.ledger_schema!r} on "
            f"{self.settings.masked_url}"
        )
        if sqlstate == "25006":
            advice = (
                "the session is read-only (a hot standby, or "
                "default_transaction_read_only); point the gate at the primary"
            )
        elif sqlstate == "42501":
            advice = (
                "grant this role CREATE on the schema (and on the database if "
                "the schema does not exist yet), or let a role that has it run "
                "`initgate run` once; `initgate check` lists what is missing"
            )
        else:
            advice = "see the server's log"
        return ConfigurationError(
            self.settings.scrub(f"cannot write {where}: {reason}; {advice}")
        )

    async def _warn_about_changed_revisions(self, conn: Session) -> None:
        """WARN about applied revisions whose file changed since, like Flyway.

        Only here, on the holder's path: the warm path stays one round trip
        and imports no revision file. ``initgate check`` reports the same.
        """
        if self.migrations is None:
            return
        recorded = await ledger.read_checksums(
            conn, self.settings.ledger_schema, self.namespace
        )
        runs = {record.revision: record.run_id for record in recorded}
        changed = self.migrations.changed_since_applied(
            {record.revision: record.checksum for record in recorded}
        )
        for revision in changed:
            logger.warning(
                "revision %s was applied by run %d, and its file %s has changed "
                "since (sha256 %s, now %s): this database did not run what the "
                "file says now; restore the file and put the change in a new "
                "revision",
                revision.revision,
                runs[revision.revision],
                revision.path,
                revision.recorded[:12],
                revision.current[:12] if revision.current else "unreadable",
            )

    async def _migrate(
        self, sa: AsyncConnection, conn: Session, run_id: int
    ) -> list[str]:
        if self.migrations is None:
            return []
        self.phase = Phase.MIGRATING
        migrations = self.migrations
        # Alembic begins and commits its own transaction; autocommit_block()
        # fails if one is already open on the connection it is given.
        await sa.commit()
        before = time.monotonic()
        schema = self.settings.ledger_schema

        def record(conn: Connection, applied: AppliedRevision) -> None:
            # Inside the revision's own transaction: the step row commits
            # with the revision, or rolls back with it, even if this holder
            # dies before the upgrade ends.
            conn.execute(*_revision_row(schema, run_id, applied))

        try:
            report = await sa.run_sync(migrations.upgrade, record)
        except UpgradeFailedError as exc:
            await sa.rollback()
            cause = exc.__cause__ or exc
            await self._record_migrations(
                sa, conn, run_id, exc.report, error=_one_line(cause, self.settings)
            )
            raise _StepFailed(f"migration {exc.report.failed_revision}") from (
                exc.__cause__
            )
        await sa.commit()
        if not report.on_gate_connection:
            logger.warning(
                "env.py of %s did not use the connection initgate handed it "
                "(config.attributes['connection']), so its migrations ran "
                "outside the lock's session: a holder that loses its session "
                "could still write; see the README's env.py section",
                migrations.config_path,
            )
        await self._record_migrations(sa, conn, run_id, report)
        revisions = [a.revision for a in report.applied]
        if revisions:
            logger.info(
                "migrated %r %s in %.0f ms",
                self.namespace,
                " -> ".join(revisions),
                _ms_since(before),
            )
        return revisions

    async def _record_migrations(
        self,
        sa: AsyncConnection,
        conn: Session,
        run_id: int,
        report: UpgradeReport,
        error: str | None = None,
    ) -> None:
        """Step rows not written during the upgrade, and one for a failure.

        Revisions env.py ran on another connection (it ignored the gate's)
        are recorded here, after the fact, if they committed.
        """
        schema = self.settings.ledger_schema
        committed = set(await ledger.read_revisions(conn, self.settings.version_table))
        ancestors = self.migrations.ancestors(committed) if self.migrations else set()
        for applied in report.applied:
            if applied.revision in report.recorded:
                continue  # Written in the revision's own transaction.
            if applied.revision not in ancestors:
                continue  # Rolled back with a later revision's transaction.
            await sa.execute(*_revision_row(schema, run_id, applied))
        if error is not None and report.failed_revision is not None:
            started_at = report.applied[-1].finished_at if report.applied else _now()
            await ledger.insert_step(
                sa,
                schema,
                run_id,
                StepKind.MIGRATION,
                report.failed_revision,
                None,
                StepStatus.FAILED,
                started_at,
                _now(),
                error=error,
            )
        await sa.commit()

    async def _seed(
        self, sa: AsyncConnection, run_id: int, done: set[tuple[str, str]]
    ) -> list[str]:
        self.phase = Phase.SEEDING
        seeded = []
        for step in self.seeds:
            done_key = (step.name, step.version)
            if done_key in done:
                logger.debug(
                    "seed step %s v%s already applied", step.name, step.version
                )
                continue
            await self._seed_one(sa, run_id, step)
            seeded.append(f"{step.name} v{step.version}")
        return seeded

    async def _seed_one(self, sa: AsyncConnection, run_id: int, step: SeedStep) -> None:
        schema = self.settings.ledger_schema
        started_at = _now()
        try:
            async with sa.begin():
                await step.function(sa)
                await ledger.insert_step(
                    sa,
                    schema,
                    run_id,
                    StepKind.SEED,
                    step.name,
                    step.version,
                    StepStatus.SUCCEEDED,
                    started_at,
                    _now(),
                )
        except Exception as exc:
            try:
                async with sa.begin():
                    await ledger.insert_step(
                        sa,
                        schema,
                        run_id,
                        StepKind.SEED,
                        step.name,
                        step.version,
                        StepStatus.FAILED,
                        started_at,
                        _now(),
                        error=_one_line(exc, self.settings),
                    )
            except Exception as record_exc:
                # A lost session cannot record anything; the run row tells.
                logger.debug("could not record the failed step: %s", record_exc)
            raise _StepFailed(f"seed step {step.name} v{step.version}") from exc
        logger.info(
            "seeded %s v%s in %.0f ms",
            step.name,
            step.version,
            (_now() - started_at).total_seconds() * 1000,
        )

    async def _record_failure(
        self, sa: AsyncConnection, conn: Session, run_id: int, exc: Exception
    ) -> InitGateError:
        """Mark the run failed (best effort) and build the error to raise."""
        cause = exc.__cause__ if isinstance(exc, _StepFailed) else exc
        assert cause is not None
        where = str(exc) if isinstance(exc, _StepFailed) else "migration"
        error = f"{where} failed: {_one_line(cause, self.settings)}"
        tb = self.settings.scrub(
            "".join(traceback.format_exception(cause)) if cause else ""
        )
        if conn.is_closed():
            # The session died under the holder (terminated, server gone):
            # nothing can be recorded on it, and run() decides what next.
            # The run stays 'running' until the next holder abandons it.
            return InitFailedError(
                f"init of {self.namespace!r} lost its session in run {run_id} "
                f"({error})",
                run_id=run_id,
            )
        try:
            if sa.in_transaction():
                await sa.rollback()
            await ledger.finish_run(
                sa,
                self.settings.ledger_schema,
                run_id,
                RunStatus.FAILED,
                channel=self.key.channel,
                revision_to=",".join(
                    await ledger.read_revisions(conn, self.settings.version_table)
                )
                or None,
                error=error,
                traceback=tb,
            )
            await sa.commit()
        except Exception as record_exc:
            # The session is gone (killed, terminated): the run stays
            # 'running' and the next holder marks it abandoned.
            logger.error(
                "could not record run %d as failed: %s",
                run_id,
                _one_line(record_exc, self.settings),
            )
        if isinstance(cause, ConfigurationError):
            return cause
        logger.error("init of %r failed in run %d: %s", self.namespace, run_id, error)
        return InitFailedError(
            f"init of {self.namespace!r} failed (run {run_id}): {error}",
            run_id=run_id,
        )


class _SessionLost(Exception):
    """Internal: the gate's session died under it while in ``phase``."""

    def __init__(self, phase: Phase, error: Exception) -> None:
        super().__init__(f"session lost while {phase.value}")
        self.phase = phase
        self.error = error


class _StepFailed(Exception):
    """Internal: names the seed step whose exception is the ``__cause__``."""


def _revision_row(
    schema: str, run_id: int, applied: AppliedRevision
) -> tuple[Any, dict[str, Any]]:
    """The step row of a revision that was applied."""
    return ledger.step_insert(
        schema,
        run_id,
        StepKind.MIGRATION,
        applied.revision,
        None,
        StepStatus.SUCCEEDED,
        applied.started_at,
        applied.finished_at,
        description=applied.doc,
        checksum=applied.checksum,
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000


def _one_line(exc: BaseException, settings: Settings) -> str:
    return connection.describe_error(exc, settings)
