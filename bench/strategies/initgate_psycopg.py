"""initgate with psycopg 3 under the gate (``INITGATE_DRIVER=psycopg``).

The same protocol as the ``initgate`` strategy; only the driver of the
gate's session differs, so the two side by side price the driver alone.
"""

from __future__ import annotations

from bench.strategies import initgate
from bench.strategies.base import WorkerContext

__all__ = ["boot", "prepare"]


def prepare(ctx: WorkerContext) -> None:
    """Build the gate on psycopg and register the seed."""
    initgate.prepare(ctx, driver="psycopg")


boot = initgate.boot
