"""Re-implemented: ``pg_advisory_lock`` (blocking), then ``alembic upgrade head``.

The common hand-rolled pattern, and how golang-migrate and Prisma wait too:
every worker blocks inside ``pg_advisory_lock`` until it is its turn, then
upgrades (a no-op for all but the first) on the same session and unlocks.

A waiter blocked inside ``pg_advisory_lock`` holds a snapshot, so the
holder's ``CREATE INDEX CONCURRENTLY`` waits for it while it waits for the
holder: PostgreSQL reports "deadlock detected" and aborts one of them.
"""

from __future__ import annotations

from sqlalchemy import text

from bench.strategies.base import LOCK_KEY, WorkerContext, new_engine, upgrade_and_seed

__all__ = ["boot"]


def boot(ctx: WorkerContext) -> None:
    """Wait for the lock, then upgrade and seed under it."""
    engine = new_engine(ctx)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
            # Session-level lock: it outlives this transaction, and Alembic
            # wants a connection with no transaction open.
            conn.commit()
            try:
                upgrade_and_seed(ctx, conn)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()
