"""Re-implemented: ``pg_try_advisory_lock`` polled at a fixed interval.

How Flyway and Ecto wait: try the lock, sleep, try again. Every worker takes
the lock in turn and runs its (usually empty) upgrade under it, so N workers
that start together pass one per round at best. The bench polls every
``poll_interval`` seconds (1 s by default).
"""

from __future__ import annotations

import time

from sqlalchemy import text

from bench.strategies.base import LOCK_KEY, WorkerContext, new_engine, upgrade_and_seed

__all__ = ["boot"]


def boot(ctx: WorkerContext) -> None:
    """Poll for the lock, then upgrade and seed under it."""
    interval = float(ctx.params.get("poll_interval", 1.0))
    engine = new_engine(ctx)
    try:
        with engine.connect() as conn:
            polls = 0
            while True:
                polls += 1
                got = conn.execute(
                    text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}
                ).scalar_one()
                # Ends the poll's transaction: sleeping inside it would keep
                # a transaction open for nothing.
                conn.commit()
                if got:
                    break
                time.sleep(interval)
            ctx.info["polls"] = polls
            try:
                upgrade_and_seed(ctx, conn)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()
