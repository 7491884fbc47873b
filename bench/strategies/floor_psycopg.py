"""Not a strategy: a psycopg connect and close, the floor under the others.

Every re-implemented strategy connects through SQLAlchemy with psycopg;
this is the part of their boot that no coordination scheme can avoid.
"""

from __future__ import annotations

import psycopg

from bench.strategies.base import WorkerContext

__all__ = ["boot"]


def boot(ctx: WorkerContext) -> None:
    """Connect (``application_name`` from ``PGAPPNAME``) and close."""
    psycopg.connect(ctx.database_url).close()
