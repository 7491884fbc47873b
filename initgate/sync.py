"""The gate for applications without an event loop: Flask, Django, WSGI.

::

    gate = SyncInitGate.from_env()

    @gate.seed("currencies", version=1)
    def seed_currencies(conn):      # a sync sqlalchemy Connection
        conn.execute(...)

    gate.run()                      # blocks until init is committed

Call :meth:`SyncInitGate.run` where each worker starts: a Flask app factory,
gunicorn's ``post_worker_init`` hook, Django's ``AppConfig.ready``.

Its session is psycopg 3 by default (``pip install initgate[psycopg]``), the
driver sync applications already use; ``INITGATE_DRIVER=asyncpg`` or a
``postgresql+asyncpg://`` URL chooses asyncpg instead. Either way it runs the
very protocol the async gate runs, in a private event loop on a thread of its
own, rather than a second implementation of it: one protocol, one set of
guarantees and tests (see :mod:`initgate.drivers`). Sync seed bodies run
through ``AsyncConnection.run_sync`` on the holder's connection, so they get
an ordinary SQLAlchemy ``Connection`` inside the step's transaction; with
psycopg, ``conn.connection`` is psycopg's DBAPI connection under it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate.drivers import Driver
from initgate.gate import Gate, GateResult
from initgate.seeds import SeedRegistry
from initgate.settings import Settings

__all__ = ["SyncInitGate", "SyncSeedFunction"]

SyncSeedFunction = Callable[[Connection], None]
"""A sync seed body: gets the holder's connection inside an open transaction."""


class SyncInitGate:
    """One application's gate, for code that does not run an event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seeds = SeedRegistry()
        self.result: GateResult | None = None
        """How this process passed the gate; None until it has."""

    @classmethod
    def from_env(cls, **overrides: Any) -> SyncInitGate:
        """Build from ``INITGATE_*`` variables (and ``DATABASE_URL``).

        Raises:
            ConfigurationError: A setting is missing or invalid.
        """
        return cls(Settings.from_env(**overrides))

    def seed(
        self, name: str, version: int | str = 1
    ) -> Callable[[SyncSeedFunction], SyncSeedFunction]:
        """Register a sync seed step; it runs once per (name, version).

        Raises ConfigurationError on a duplicate name.
        """

        def register(function: SyncSeedFunction) -> SyncSeedFunction:
            @functools.wraps(function)
            async def step(conn: AsyncConnection) -> None:
                await conn.run_sync(function)

            self.seeds.add(name, version, step)
            return function

        return register

    def run(self) -> GateResult:
        """Pass the gate; block until init is committed, by this worker or another.

        Safe to call whether or not the calling thread runs an event loop.
        The gate's own deadlines (``wait_timeout``, ``connect_timeout``) bound
        how long it blocks.

        Raises:
            The errors of :meth:`initgate.gate.Gate.run`.
        """
        gate = Gate(self.settings, self.seeds, preferred_driver=Driver.PSYCOPG)
        # A thread of its own: asyncio.run refuses to start inside a thread
        # that already runs a loop (a Jupyter kernel, an ASGI-in-WSGI shim).
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="initgate"
        ) as pool:
            self.result = pool.submit(asyncio.run, gate.run()).result()
        return self.result

    @property
    def ready(self) -> bool:
        """Whether this process passed the gate; serve a readiness probe from it."""
        return self.result is not None
