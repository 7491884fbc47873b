"""The strategies the bench compares, one module each.

Each module has ``boot(ctx)`` (plain or ``async``): what one worker runs at
start-up before it may serve. It returns once the worker may serve and
raises when it may not. An optional ``prepare(ctx)`` runs before the
release, for what an application builds at import time. Re-implemented
strategies are a few lines that follow the original's waiting pattern; the
packages are used through their public APIs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Mapping

__all__ = ["FLOORS", "STRATEGIES", "Strategy", "by_name"]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One way of getting init done at start-up.

    Attributes:
        name: Short identifier used on the command line and in the JSON.
        title: How the report names it.
        kind: ``library`` (initgate), ``re-implemented`` or ``package``.
        summary: One line on how its workers wait.
        module: The module with ``boot(ctx)``.
        requires: Modules it imports beyond the bench's own.
        distribution: PyPI distribution whose version the report shows.
        params: Its settings (seconds), as the bench runs it.
    """

    name: str
    title: str
    kind: str
    summary: str
    module: str
    requires: tuple[str, ...] = ()
    distribution: str | None = None
    params: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def unavailable(self) -> str | None:
        """Why it cannot run here (a module does not import), or None."""
        for name in self.requires:
            try:
                importlib.import_module(name)
            except Exception as exc:
                return f"{name} does not import: {type(exc).__name__}: {exc}"
        return None

    def version(self) -> str | None:
        """The installed version of its distribution, if it has one."""
        if self.distribution is None:
            return None
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


STRATEGIES: tuple[Strategy, ...] = (
    Strategy(
        "initgate",
        "initgate",
        "library",
        "try-lock; waiters LISTEN and wake on the holder's NOTIFY; "
        "one-query warm check",
        "bench.strategies.initgate",
        distribution="initgate",
    ),
    Strategy(
        "initgate_psycopg",
        "initgate on psycopg",
        "library",
        "initgate, with psycopg 3 as the gate's driver instead of asyncpg",
        "bench.strategies.initgate_psycopg",
        requires=("psycopg",),
        distribution="initgate",
    ),
    Strategy(
        "worker_id",
        'WORKER_ID == "1"',
        "re-implemented",
        "no lock: every worker upgrades (WORKER_ID is unset under uvicorn)",
        "bench.strategies.worker_id",
    ),
    Strategy(
        "blocking_lock",
        "pg_advisory_lock + upgrade",
        "re-implemented",
        "waiters block in pg_advisory_lock, then upgrade in turn "
        "(golang-migrate, Prisma)",
        "bench.strategies.blocking_lock",
    ),
    Strategy(
        "trylock_poll",
        "try-lock, poll 1 s",
        "re-implemented",
        "pg_try_advisory_lock every second, then upgrade in turn (Flyway, Ecto)",
        "bench.strategies.trylock_poll",
        params={"poll_interval": 1.0},
    ),
    Strategy(
        "locktable_poll",
        "lock row, poll 10 s",
        "re-implemented",
        "UPDATE lock row WHERE locked = false every 10 s, then upgrade in turn "
        "(Liquibase)",
        "bench.strategies.locktable_poll",
        params={"poll_interval": 10.0},
    ),
    Strategy(
        "asyncpg_lock",
        "asyncpg-lock",
        "package",
        "AdvisoryLockGuard: try-lock every 5 s, 5 s pause after acquiring, "
        "then init in turn (library defaults)",
        "bench.strategies.asyncpg_lock",
        requires=("asyncpg_lock",),
        distribution="asyncpg-lock",
        params={"reacquire_delay": 5.0, "after_acquire_delay": 5.0},
    ),
    Strategy(
        "tooz",
        "tooz (PostgreSQL)",
        "package",
        "coordinator lock: blocking pg_advisory_lock, then upgrade in turn",
        "bench.strategies.tooz_lock",
        requires=("tooz.coordination", "tooz.drivers.pgsql", "psycopg2"),
        distribution="tooz",
    ),
)


FLOORS: tuple[Strategy, ...] = (
    Strategy(
        "floor_asyncpg",
        "connect + close (asyncpg)",
        "floor",
        "no coordination: the connection initgate's warm path needs anyway",
        "bench.strategies.floor_asyncpg",
    ),
    Strategy(
        "floor_psycopg",
        "connect + close (psycopg)",
        "floor",
        "no coordination: the connection the other strategies need anyway",
        "bench.strategies.floor_psycopg",
    ),
)
"""Not strategies: what connecting alone costs, measured in the warm boot."""


def by_name(name: str) -> Strategy:
    """Look a strategy up by its name.

    Raises:
        KeyError: No such strategy; the message lists the known names.
    """
    for strategy in (*STRATEGIES, *FLOORS):
        if strategy.name == name:
            return strategy
    known = ", ".join(s.name for s in STRATEGIES)
    raise KeyError(f"unknown strategy {name!r}; expected one of: {known}")
