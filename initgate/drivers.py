"""The gate's session with PostgreSQL, over asyncpg or psycopg 3.

The protocol in :mod:`initgate.gate` is written once, against the small
interface below; each driver gives it the same shape:

- ``execute(sql)``: a simple-protocol query (one round trip, several
  statements allowed) returning the last command tag, such as ``"SELECT 1"``;
- ``fetch`` / ``fetchrow`` / ``fetchval`` with ``$1``-style placeholders,
  rows readable by index and by column name;
- ``listen(channel)`` and ``idle(timeout)``: wait for a NOTIFY or a timeout;
- ``get_server_pid()``, ``is_closed()``, ``close()``;
- :func:`sqlalchemy_connection`: the same session as a SQLAlchemy
  ``AsyncConnection``, for the holder's writes, Alembic and seed bodies.

asyncpg's own connection already reads like this (the interface copies its
names), so :class:`AsyncpgSession` only adds the notification part.
:class:`PsycopgSession` wraps a psycopg ``AsyncConnection`` in autocommit
mode, never prepares statements (a pooler may move it between backends) and
uses psycopg's raw cursors, which take ``$1`` placeholders as PostgreSQL does.

Errors stay the driver's own. Where the gate must recognise one, it asks
:func:`errors` for the classes of a SQLSTATE in every driver loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "AsyncpgSession",
    "Driver",
    "PsycopgSession",
    "Record",
    "Session",
    "errors",
    "sqlalchemy_connection",
    "sqlstate",
]


class Driver(enum.StrEnum):
    """The PostgreSQL driver of the gate's session."""

    ASYNCPG = "asyncpg"
    """asyncpg: the default; the async gate's warm path is fastest on it."""
    PSYCOPG = "psycopg"
    """psycopg 3 (``pip install initgate[psycopg]``): libpq's connection
    options (service files, ``.pgpass``, ``sslmode``...), and the default of
    :class:`initgate.sync.SyncInitGate`."""


class Session(Protocol):
    """One connection to PostgreSQL, as the gate uses it; see the module doc."""

    driver: Driver

    async def execute(self, sql: str) -> str: ...

    async def fetch(self, sql: str, *args: Any) -> Sequence[Any]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Any: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def listen(self, channel: str) -> None: ...

    async def idle(self, timeout: float) -> bool: ...

    def get_server_pid(self) -> int: ...

    def is_closed(self) -> bool: ...

    async def close(self) -> None: ...


class AsyncpgSession(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, plus :meth:`listen` and :meth:`idle`.

    Pass it as ``connection_class`` to ``asyncpg.connect``.
    """

    driver = Driver.ASYNCPG

    async def listen(self, channel: str) -> None:
        """LISTEN on ``channel``; outside a transaction it is in effect at once."""
        self._initgate_woken = asyncio.Event()
        await self.add_listener(channel, self._on_notify)

    def _on_notify(self, *_: Any) -> None:
        self._initgate_woken.set()

    async def idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a NOTIFY on the channel listened to.

        Returns True when one came, here or since the last call (asyncpg
        reads notifications while other queries run, too).
        """
        woken: asyncio.Event | None = getattr(self, "_initgate_woken", None)
        if woken is None:  # Not listening: nothing can wake it.
            await asyncio.sleep(max(0.0, timeout))
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), timeout=max(0.0, timeout))
        came = woken.is_set()
        woken.clear()
        return came


class Record(tuple[Any, ...]):
    """A row readable by index and by column name, like asyncpg's Record."""

    _columns: dict[str, int]

    def __new__(cls, values: Sequence[Any], columns: dict[str, int]) -> Record:
        record = super().__new__(cls, values)
        record._columns = columns
        return record

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self._columns[key])
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of column ``key``, or ``default`` without such a column."""
        index = self._columns.get(key)
        return default if index is None else super().__getitem__(index)

    def keys(self) -> list[str]:
        """Column names, in order; with them ``dict(record)`` works."""
        return list(self._columns)

    def items(self) -> list[tuple[str, Any]]:
        """(column, value) pairs, in order."""
        return list(zip(self._columns, self, strict=True))


def _record_factory(cursor: Any) -> Callable[[Sequence[Any]], Record]:
    columns = {column.name: i for i, column in enumerate(cursor.description or ())}
    return functools.partial(Record, columns=columns)


class PsycopgSession:
    """A psycopg ``AsyncConnection`` in autocommit mode, behind the interface.

    Open it with :meth:`connect`. While SQLAlchemy owns the connection
    (:func:`sqlalchemy_connection` switches autocommit off), a read that
    would begin a transaction of its own ends it again, so SQLAlchemy and
    Alembic find the connection as they left it.
    """

    driver = Driver.PSYCOPG

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.connection = connection
        # Read once: libpq forgets it when the connection breaks, and
        # messages about a lost session still want it.
        self._backend_pid = connection.info.backend_pid
        self._channels: set[str] = set()

    @classmethod
    async def connect(cls, conninfo: str, **kwargs: Any) -> PsycopgSession:
        """Open a connection; ``kwargs`` are libpq connection parameters."""
        import psycopg

        connection = await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, prepare_threshold=None, **kwargs
        )
        return cls(connection)

    async def execute(self, sql: str) -> str:
        """Run ``sql`` as one simple query; return the last command tag."""
        async with self._statement():
            cursor = await self.connection.execute(sql)
            status = cursor.statusmessage
            while cursor.nextset():
                status = cursor.statusmessage
            return status or ""

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        """All rows of ``sql``, with ``$1``... bound to ``args``."""
        import psycopg

        async with self._statement():
            cursor = psycopg.AsyncRawCursor(
                self.connection, row_factory=_record_factory
            )
            await cursor.execute(sql, args or None)
            return await cursor.fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        """The first row of ``sql``, or None."""
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row of ``sql``, or None."""
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    @contextlib.asynccontextmanager
    async def _statement(self) -> AsyncIterator[None]:
        from psycopg.pq import TransactionStatus

        connection = self.connection
        begins = (
            not connection.autocommit
            and connection.info.transaction_status == TransactionStatus.IDLE
        )
        try:
            yield
        finally:
            if begins and not self.is_closed():
                # A read between SQLAlchemy's transactions: end the one
                # psycopg began for it, or Alembic would find it open.
                await connection.rollback()

    async def listen(self, channel: str) -> None:
        """LISTEN on ``channel``; in autocommit mode it is in effect at once."""
        await self.execute(f"LISTEN {channel}")
        self._channels.add(channel)

    async def idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a NOTIFY on a channel listened to.

        psycopg reads notifications only while asked to, so this is where
        they arrive; ones that came during other queries are kept and
        returned first (psycopg 3.3; older releases drop them, and the
        gate then sees the holder's commit at its next poll).
        """
        notifies = self.connection.notifies(timeout=max(0.0, timeout))
        async with contextlib.aclosing(notifies) as received:
            async for notify in received:
                if notify.channel in self._channels:
                    return True
        return False

    def get_server_pid(self) -> int:
        """The backend pid PostgreSQL reported at login."""
        return self._backend_pid

    def is_closed(self) -> bool:
        """Whether the connection is closed or broken (session lost)."""
        return bool(self.connection.closed or self.connection.broken)

    async def close(self) -> None:
        """Close the connection; a no-op when it is already closed."""
        await self.connection.close()


@contextlib.asynccontextmanager
async def sqlalchemy_connection(session: Session) -> AsyncIterator[AsyncConnection]:
    """The session as a SQLAlchemy ``AsyncConnection``, on the same backend.

    On exit the session is the caller's again (and, for psycopg, back in
    autocommit mode), still open: the caller unlocks on it, then closes it.
    """
    if isinstance(session, PsycopgSession):
        driver_connection: Any = session.connection
        url = "postgresql+psycopg://"
        await driver_connection.set_autocommit(False)
    else:
        driver_connection = session
        url = "postgresql+asyncpg://"

    async def same_connection() -> Any:
        return driver_connection

    # StaticPool hands out this one connection and never closes it on
    # check-in; the engine is not disposed for the same reason.
    engine = create_async_engine(
        url, async_creator=same_connection, poolclass=StaticPool
    )
    try:
        async with engine.connect() as sa:
            yield sa
    finally:
        if isinstance(session, PsycopgSession) and not session.is_closed():
            await driver_connection.rollback()
            await driver_connection.set_autocommit(True)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver's error, also when SQLAlchemy wrapped it."""
    for candidate in (exc, getattr(exc, "orig", None)):
        while candidate is not None:
            code = getattr(candidate, "sqlstate", None)
            if isinstance(code, str):
                return code
            candidate = candidate.__cause__
    return None


def errors(*sqlstates: str) -> tuple[type[Exception], ...]:
    """Every loaded driver's exception classes for these SQLSTATEs.

    For ``except`` clauses; it is evaluated only when an exception is being
    matched, and imports no driver.
    """
    return _errors(sqlstates, sys.modules.get("psycopg") is not None)


@functools.cache
def _errors(
    sqlstates: tuple[str, ...], with_psycopg: bool
) -> tuple[type[Exception], ...]:
    found: list[type[Exception]] = [
        cls
        for cls in vars(asyncpg.exceptions).values()
        if isinstance(cls, type)
        and issubclass(cls, asyncpg.PostgresError)
        and getattr(cls, "sqlstate", None) in sqlstates
    ]
    if with_psycopg:
        import psycopg.errors

        found += [psycopg.errors.lookup(code) for code in sqlstates]
    return tuple(found)
