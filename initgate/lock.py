"""The advisory lock: key derivation, try-lock, unlock, and who holds it.

The lock is session-level and uses the two-int form
``pg_try_advisory_lock(classid, objid)``: ``classid`` is fixed for initgate and
``objid`` is a hash of the namespace. In ``pg_locks`` that shows up as
``classid``/``objid`` with ``objsubid = 2``, so the holder's
``pg_stat_activity`` row is one join away.

Nothing here ever calls the blocking ``pg_advisory_lock``: a session waiting
inside it makes a holder's ``CREATE INDEX CONCURRENTLY`` fail with "deadlock
detected", because that command waits for every transaction that could see the
old table, the blocked waiter's included.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from typing import Any

__all__ = [
    "CLASSID",
    "HolderInfo",
    "LockKey",
    "find_holder",
    "try_lock",
    "try_lock_in_backend",
    "unlock",
]

CLASSID = 0x69676174
"""``classid`` of every initgate lock: the bytes ``igat`` as a 32-bit int."""


@dataclasses.dataclass(frozen=True)
class LockKey:
    """The two 32-bit halves of a namespace's advisory lock key."""

    classid: int
    objid: int

    @classmethod
    def for_namespace(cls, namespace: str) -> LockKey:
        """Derive the key from a namespace; stable across processes and releases."""
        digest = hashlib.blake2b(namespace.encode(), digest_size=4).digest()
        return cls(CLASSID, int.from_bytes(digest, "big", signed=True))

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of this namespace (a plain identifier)."""
        return f"initgate_{self.objid & 0xFFFFFFFF:08x}"

    def __str__(self) -> str:
        return f"({self.classid}, {self.objid})"


@dataclasses.dataclass(frozen=True)
class HolderInfo:
    """The session that holds a namespace's lock, as PostgreSQL reports it."""

    backend_pid: int
    application_name: str
    client_addr: str | None
    backend_start: dt.datetime | None
    state: str | None
    query: str | None

    def describe(self) -> str:
        """A short phrase naming the holder, for messages."""
        since = (
            f" since {self.backend_start:%Y-%m-%d %H:%M:%S %Z}"
            if self.backend_start
            else ""
        )
        where = f" from {self.client_addr}" if self.client_addr else ""
        return (
            f"{self.application_name or 'an unnamed session'} "
            f"(backend pid {self.backend_pid}{where}){since}"
        )


async def try_lock(conn: Any, key: LockKey) -> bool:
    """Try once to take the lock on this session; never blocks.

    Args:
        conn: An asyncpg connection.
    """
    got: bool = await conn.fetchval(
        "SELECT pg_try_advisory_lock($1, $2)", key.classid, key.objid
    )
    return got


async def try_lock_in_backend(conn: Any, key: LockKey) -> tuple[bool, int]:
    """Like :func:`try_lock`, also returning the pid of the backend that ran it.

    The pid costs nothing extra (same statement) and is what tells whether
    a pooler sits between the client and its backend; see
    :mod:`initgate.pooler`.
    """
    row = await conn.fetchrow(
        "SELECT pg_try_advisory_lock($1, $2), pg_backend_pid()",
        key.classid,
        key.objid,
    )
    return bool(row[0]), int(row[1])


async def unlock(conn: Any, key: LockKey) -> None:
    """Release the lock if this session holds it (a no-op otherwise)."""
    await conn.fetchval("SELECT pg_advisory_unlock($1, $2)", key.classid, key.objid)


_HOLDER_SQL = """
SELECT a.pid, a.application_name, host(a.client_addr) AS client_addr,
       a.backend_start, a.state, left(a.query, 200) AS query
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def find_holder(conn: Any, key: LockKey) -> HolderInfo | None:
    """Look up the session holding the lock, or None when it is free."""
    # pg_locks reports classid/objid as unsigned oids; compare as bigint.
    row = await conn.fetchrow(
        _HOLDER_SQL, key.classid & 0xFFFFFFFF, key.objid & 0xFFFFFFFF
    )
    if row is None:
        return None
    return HolderInfo(
        backend_pid=row["pid"],
        application_name=row["application_name"],
        client_addr=row["client_addr"],
        backend_start=row["backend_start"],
        state=row["state"],
        query=row["query"],
    )
