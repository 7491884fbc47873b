"""PyPI ``tooz`` with its PostgreSQL driver, through its public API.

``get_coordinator(url, member_id)``, ``start()``, ``get_lock(name)`` and
``with lock:``. A blocking acquire is ``pg_advisory_lock`` on the lock's own
psycopg2 connection (the coordinator keeps another one open); Alembic
connects by itself beside them.
"""

from __future__ import annotations

import os
import warnings

from tooz import coordination

from bench import postgres
from bench.strategies.base import WorkerContext, upgrade_and_seed

__all__ = ["boot"]


def boot(ctx: WorkerContext) -> None:
    """Take tooz's lock (blocking), upgrade and seed, release, stop."""
    with warnings.catch_warnings():
        # tooz 9 marks the PostgreSQL driver deprecated; it still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        coordinator = coordination.get_coordinator(
            postgres.tooz_url(ctx.database_url), f"worker-{os.getpid()}".encode()
        )
    coordinator.start()
    try:
        with coordinator.get_lock(b"bench-init"):
            upgrade_and_seed(ctx, None)
    finally:
        coordinator.stop()
