"""Re-implemented: a lock row in a table, polled (Liquibase's way).

Like ``DATABASECHANGELOGLOCK``: one row with a boolean ``locked``, taken with
``UPDATE ... SET locked = true WHERE id = 1 AND locked = false`` and polled
every ``poll_interval`` seconds (Liquibase's default is 10 s). Every worker
takes the row in turn to run its (usually empty) upgrade. A holder that dies
leaves the row locked until someone clears it by hand.
"""

from __future__ import annotations

import os
import socket
import time

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError, ProgrammingError

from bench.strategies.base import WorkerContext, new_engine, upgrade_and_seed

__all__ = ["boot"]

_CREATE = """
CREATE TABLE IF NOT EXISTS bench_changelog_lock (
    id integer PRIMARY KEY,
    locked boolean NOT NULL,
    lockgranted timestamptz,
    lockedby text
)
"""
_INSERT = (
    "INSERT INTO bench_changelog_lock (id, locked) VALUES (1, false) "
    "ON CONFLICT (id) DO NOTHING"
)
_ACQUIRE = (
    "UPDATE bench_changelog_lock SET locked = true, "
    "lockgranted = clock_timestamp(), lockedby = :by "
    "WHERE id = 1 AND locked = false"
)
_RELEASE = (
    "UPDATE bench_changelog_lock SET locked = false, lockgranted = NULL, "
    "lockedby = NULL WHERE id = 1"
)


def boot(ctx: WorkerContext) -> None:
    """Take the lock row (polling), then upgrade and seed; free the row."""
    interval = float(ctx.params.get("poll_interval", 10.0))
    by = f"{socket.gethostname()} pid {os.getpid()}"
    engine = new_engine(ctx)
    try:
        with engine.connect() as conn:
            _ensure_table(conn)
            polls = 0
            while True:
                polls += 1
                taken = conn.execute(text(_ACQUIRE), {"by": by}).rowcount
                conn.commit()
                if taken == 1:
                    break
                time.sleep(interval)
            ctx.info["polls"] = polls
            try:
                upgrade_and_seed(ctx, conn)
            finally:
                conn.execute(text(_RELEASE))
                conn.commit()
    finally:
        engine.dispose()


def _ensure_table(conn: Connection) -> None:
    # CREATE TABLE IF NOT EXISTS is not safe against concurrent creators
    # (they collide on the catalog's unique indexes); Liquibase has had the
    # same race. Retry a few times so that the comparison measures waiting,
    # not this setup race.
    for attempt in range(5):
        try:
            conn.execute(text(_CREATE))
            conn.execute(text(_INSERT))
            conn.commit()
            return
        except (IntegrityError, ProgrammingError):
            conn.rollback()
            if attempt == 4:
                raise
            time.sleep(0.05)
