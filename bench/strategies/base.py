"""What a strategy gets in a worker, and the plain ``alembic upgrade head``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, pool

from bench import postgres, workload

__all__ = ["LOCK_KEY", "WorkerContext", "new_engine", "upgrade_and_seed"]

LOCK_KEY = 7_406_661_113_552_451
"""The bigint key every re-implemented lock strategy uses (any constant does)."""


@dataclasses.dataclass
class WorkerContext:
    """One worker's view of the trial, and what it reports back.

    Attributes:
        index: The worker's number in its herd, from 0.
        database_url: Plain ``postgresql://`` URL of the trial's database.
        alembic_ini: The generated project's ``alembic.ini``.
        seed_rows: Rows the seed inserts.
        params: Strategy settings (poll intervals, delays).
        app_name: ``application_name`` for connections the strategy opens
            itself; the bench maps connections to workers by it.
        started_at: ``time.time()`` when this worker began its upgrade.
        commit_at: ``time.time()`` when this worker's upgrade and seed had
            committed (both set by :func:`upgrade_and_seed`).
        init_ms: How long this worker spent in upgrade and seed.
        info: Anything else the strategy wants in the report.
        prepared: Whatever the strategy's ``prepare(ctx)`` built before the
            release (what an application builds at import time).
    """

    index: int
    database_url: str
    alembic_ini: Path
    seed_rows: int
    params: Mapping[str, float]
    app_name: str
    started_at: float | None = None
    commit_at: float | None = None
    init_ms: float | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    prepared: Any = None

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL for SQLAlchemy with psycopg."""
        return postgres.sqlalchemy_url(self.database_url)


def new_engine(ctx: WorkerContext) -> Any:
    """A sync engine with no pool: one connection, closed when released.

    The connection's ``application_name`` comes from ``PGAPPNAME``, which
    the worker sets, so that libpq-based drivers (psycopg, psycopg2) all
    carry it.
    """
    return create_engine(ctx.sqlalchemy_url, poolclass=pool.NullPool)


def upgrade_and_seed(ctx: WorkerContext, connection: Connection | None) -> None:
    """Run ``alembic upgrade head`` and the seed, as a start-up script would.

    With ``connection`` (not in a transaction), Alembic migrates on it, the
    way a lock strategy keeps everything in the session that holds its
    lock. Without one, ``env.py`` connects by itself, like the CLI, and the
    seed opens one more connection afterwards.
    """
    ctx.started_at = time.time()
    config = Config(str(ctx.alembic_ini))
    if connection is not None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        # Alembic may leave the connection inside the transaction it used to
        # read the version table; the cookbook commits after the command.
        connection.commit()
        workload.seed_sync(connection, ctx.seed_rows)
    else:
        command.upgrade(config, "head")
        engine = new_engine(ctx)
        try:
            with engine.connect() as own:
                workload.seed_sync(own, ctx.seed_rows)
        finally:
            engine.dispose()
    ctx.commit_at = time.time()
    ctx.init_ms = (ctx.commit_at - ctx.started_at) * 1000
