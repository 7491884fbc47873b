"""Noticing a connection pooler that would not let the init lock hold.

The gate's lock is session-level: it lives in one PostgreSQL backend for as
long as that backend's session lasts. A pooler in transaction mode (PgBouncer
``pool_mode = transaction``, or ``statement``) breaks that in both directions:

- between two transactions, the client's server connection goes back to the
  pool, so the next statement may run in another backend, which does not hold
  the lock;
- the backend that took the lock stays in the pool, still holding it (PgBouncer
  runs no reset query in transaction mode), and another client whose statement
  lands there gets ``true`` from the re-entrant ``pg_try_advisory_lock``: two
  holders at once.

LISTEN fares no better: it registers in whichever backend ran it, and PgBouncer
forwards a notification only while some client is linked to that backend (it
drops what an unlinked server connection receives).

How this module tells, on the cold path only:

1. PostgreSQL sends each client its backend's pid in BackendKeyData at login;
   PgBouncer (like other poolers) makes up a random key for its clients
   instead, since it must route cancel requests itself. When that pid equals
   ``pg_backend_pid()`` as the try-lock statement reported it, the client
   talks to its backend directly (or through a plain TCP proxy): nothing more
   to check and no round trip spent.
2. Otherwise a pooler is in between. Unless the settings say that it pools
   in session mode (``INITGATE_ALLOW_SESSION_POOLER``), the gate refuses it:
   while other clients share the pool, no probe can prove session mode,
   because their statements take and release the pool's backends in between
   and can hide a transaction pooler's moves (a herd of workers starting
   together through PgBouncer in transaction mode got past the probes below
   in about one run in three).
3. With that setting, the session is still tested, as a second line of
   defence that catches a pool mode set wrongly when the pool is quiet:
   this connection, again, whether it is still in the same backend (and, if it
   took the lock, whether that backend holds it); a second, fresh connection
   whether it landed in that same backend or one holding the lock; then this
   connection once more. In transaction mode an idle server connection is
   handed to whoever asks next (PgBouncer reuses the most recently released
   one by default, or the least recently used with ``server_round_robin``),
   so one of the three lands elsewhere, or the second connection lands in the
   first one's backend. In session mode none of them can. After a waiter's
   LISTEN, one more query checks that the channel is among that backend's
   ``pg_listening_channels()``.

The probes are simple-protocol queries that answer with their status line
(``SELECT 1`` or ``SELECT 0``): no prepared statement, which a transaction
pooler would lose between backends too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from initgate.errors import UnsupportedConnectionError
from initgate.lock import LockKey

__all__ = [
    "SHARED_SESSION_ERRORS",
    "SessionCheck",
    "check_listening",
    "check_session",
    "release_lock",
    "shared_session_error",
]

logger = logging.getLogger(__name__)

OpenConnection = Callable[[], Awaitable[Any]]


def _holds(key: LockKey) -> str:
    """SQL true when the statement's own backend holds ``key``."""
    # pg_locks reports classid/objid as unsigned oids; compare as bigint.
    return (
        "EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
        "AND granted AND pid = pg_catalog.pg_backend_pid() "
        f"AND classid::bigint = {key.classid & 0xFFFFFFFF} "
        f"AND objid::bigint = {key.objid & 0xFFFFFFFF} AND objsubid = 2)"
    )


@dataclasses.dataclass(frozen=True)
class SessionCheck:
    """The outcome of :func:`check_session` when the session holds."""

    backend_pid: int
    """The backend the connection's statements run in."""
    pooled: bool
    """A pooler is in between (in session mode, as the check passed)."""


async def check_session(
    conn: Any,
    key: LockKey,
    backend_pid: int,
    *,
    holding: bool,
    open_probe: OpenConnection,
    where: str,
    session_pooler_allowed: bool = False,
) -> SessionCheck:
    """Check that ``conn`` keeps one backend, so a session lock can hold.

    Call it right after the first try-lock, with the pid that statement
    returned. Costs nothing on a direct connection. Behind a pooler it
    fails, unless ``session_pooler_allowed``; then it spends three short
    queries and one extra connection (closed before returning) on probing.

    Args:
        conn: The gate's asyncpg connection.
        key: The lock just tried.
        backend_pid: ``pg_backend_pid()`` from the try-lock statement.
        holding: Whether that try-lock took the lock.
        open_probe: Opens a second connection the way ``conn`` was opened.
        where: The masked URL, for the message.
        session_pooler_allowed: The user says the pooler keeps sessions.

    Raises:
        UnsupportedConnectionError: The connection does not keep a session,
            with what was seen and what to do. The caller still holds
            whatever lock it took (see :func:`release_lock`).
    """
    login_pid = conn.get_server_pid()
    if login_pid == backend_pid:
        return SessionCheck(backend_pid, pooled=False)
    if not session_pooler_allowed:
        what = "took the init lock" if holding else "tried the init lock"
        raise UnsupportedConnectionError(
            f"the gate's connection to {where} goes through a connection "
            f"pooler: its login named backend pid {login_pid}, but it {what} "
            f"in backend pid {backend_pid}. A session-level advisory lock "
            "holds there only if the pooler keeps one backend per client "
            "connection (PgBouncer pool_mode=session), which no check can "
            "prove while other clients share the pool. Point "
            "INITGATE_GATE_DATABASE_URL at PostgreSQL itself; or, if this "
            "pool is in session mode, set INITGATE_ALLOW_SESSION_POOLER=true"
        )

    same = f"SELECT 1 WHERE pg_catalog.pg_backend_pid() = {backend_pid}"
    if holding:
        same += f" AND {_holds(key)}"
    shared = (
        f"SELECT 1 WHERE pg_catalog.pg_backend_pid() = {backend_pid} OR {_holds(key)}"
    )
    lost = "a later statement on the same connection ran in " + (
        "a backend that does not hold it" if holding else "another backend"
    )

    if await conn.execute(same) != "SELECT 1":
        raise _unsupported(where, backend_pid, holding, lost)
    probe = await open_probe()
    try:
        if await probe.execute(shared) == "SELECT 1":
            raise _unsupported(
                where,
                backend_pid,
                holding,
                "a second connection landed in that same backend",
            )
    finally:
        with contextlib.suppress(Exception):
            await probe.close()
    if await conn.execute(same) != "SELECT 1":
        raise _unsupported(where, backend_pid, holding, lost)

    logger.info(
        "the gate's connection to %s goes through a connection pooler that "
        "keeps the session (backend pid %d): the init lock holds",
        where,
        backend_pid,
    )
    return SessionCheck(backend_pid, pooled=True)


async def check_listening(
    conn: Any, channel: str, session: SessionCheck, *, where: str
) -> None:
    """Behind a pooler, check that LISTEN registered in the session's backend.

    A waiter relies on its LISTEN to hear the holder's NOTIFY: the channel
    must be among ``pg_listening_channels()`` of the backend that its later
    statements run in. Free on a direct connection.

    Raises:
        UnsupportedConnectionError: It is not.
    """
    if not session.pooled:
        return
    literal = channel.replace("'", "''")
    status = await conn.execute(
        "SELECT 1 WHERE pg_catalog.pg_backend_pid() = "
        f"{session.backend_pid} AND '{literal}' IN "
        "(SELECT pg_catalog.pg_listening_channels())"
    )
    if status != "SELECT 1":
        raise _unsupported(
            where,
            session.backend_pid,
            False,
            "its LISTEN did not stay in that backend",
        )


def _unsupported(
    where: str, backend_pid: int, holding: bool, seen: str
) -> UnsupportedConnectionError:
    what = "took the init lock" if holding else "tried the init lock"
    return UnsupportedConnectionError(
        f"the gate's connection to {where} does not keep one PostgreSQL "
        f"session: it {what} in backend pid {backend_pid}, but {seen}. " + _ADVICE
    )


_ADVICE = (
    "A connection pooler in transaction or statement mode (PgBouncer "
    "pool_mode=transaction) is in between, and a session-level advisory "
    "lock cannot hold through it. Point INITGATE_GATE_DATABASE_URL at "
    "PostgreSQL itself or at a session-mode pool; the app's own traffic "
    "can stay on the pooler"
)

SHARED_SESSION_ERRORS = (
    asyncpg.DuplicatePreparedStatementError,
    asyncpg.InvalidSQLStatementNameError,
)
"""Errors that mean another client's statements run in this session.

asyncpg names its prepared statements per connection (``__asyncpg_stmt_1__``
first), so one that "already exists" was prepared by another client in the
same backend, and one that "does not exist" was prepared in another backend.
Behind a transaction pooler a waiter can meet either before the session
check has run, at its very first prepared statement.
"""


def shared_session_error(exc: Exception, where: str) -> UnsupportedConnectionError:
    """The UnsupportedConnectionError for one of :data:`SHARED_SESSION_ERRORS`."""
    message = " ".join(str(exc).split())
    return UnsupportedConnectionError(
        f"the gate's connection to {where} shares its PostgreSQL session with "
        f"other clients ({type(exc).__name__}: {message}). " + _ADVICE
    )


async def release_lock(conn: Any, key: LockKey) -> None:
    """Unlock after a failed check, as well as a pooled connection allows.

    Behind a transaction pooler the statement may run in another backend
    than the one holding the lock, which then keeps it until the pooler
    closes that server connection; workers that meet it there fail the check
    in turn, so nobody runs init through the pooler either way.
    """
    with contextlib.suppress(Exception):
        await conn.execute(
            f"SELECT pg_catalog.pg_advisory_unlock({key.classid}, {key.objid})"
        )
