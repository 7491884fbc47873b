"""FastAPI / Starlette glue: the ``InitGate`` object an application holds.

::

    gate = InitGate.from_env()

    @gate.seed("currencies", version=1)
    async def seed_currencies(conn): ...

    app = FastAPI(lifespan=gate.lifespan)
    app.include_router(gate.router)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from initgate import connection, ledger
from initgate.errors import InitGateError
from initgate.gate import Gate, GateResult
from initgate.seeds import SeedFunction, SeedRegistry
from initgate.settings import Settings

__all__ = ["InitGate"]

logger = logging.getLogger(__name__)

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]


class InitGate:
    """One application's gate: its settings, seed steps and lifespan hooks.

    Create it at import time; nothing touches the database until the
    lifespan (or :meth:`run`) enters the gate.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seeds = SeedRegistry()
        self._gate: Gate | None = None
        self.result: GateResult | None = None
        """How this process passed the gate; None until it has."""

    @classmethod
    def from_env(cls, **overrides: Any) -> InitGate:
        """Build from ``INITGATE_*`` variables (and ``DATABASE_URL``).

        Raises:
            ConfigurationError: A setting is missing or invalid.
        """
        return cls(Settings.from_env(**overrides))

    def seed(
        self, name: str, version: int | str = 1
    ) -> Callable[[SeedFunction], SeedFunction]:
        """Register an async seed step; it runs once per (name, version).

        The function receives the holder's ``AsyncConnection`` inside an open
        transaction, which the gate commits together with the step's record.
        Steps run in registration order. Raises ConfigurationError on a
        duplicate name.
        """

        def register(function: SeedFunction) -> SeedFunction:
            self.seeds.add(name, version, function)
            return function

        return register

    @property
    def gate(self) -> Gate:
        """The protocol runner, built on first use (reads alembic.ini)."""
        if self._gate is None:
            self._gate = Gate(self.settings, self.seeds)
        return self._gate

    async def run(self) -> GateResult:
        """Pass the gate now; see :meth:`initgate.gate.Gate.run`."""
        self.result = await self.gate.run()
        return self.result

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """A lifespan that passes the gate before the app serves."""
        await self._enter()
        yield

    def lifespan_with(self, inner: Lifespan) -> Lifespan:
        """Compose with the app's own lifespan, which starts after the gate.

        Whatever state ``inner`` yields is passed on to Starlette.
        """

        @contextlib.asynccontextmanager
        async def combined(app: Any) -> AsyncIterator[Any]:
            await self._enter()
            async with inner(app) as state:
                yield state

        return combined

    async def _enter(self) -> None:
        try:
            await self.run()
        except InitGateError as exc:
            # One clear line before the server prints its own traceback.
            logger.error("initgate: not serving: %s", exc)
            raise

    @property
    def router(self) -> APIRouter:
        """``GET /health/ready``: 200 once this process passed the gate."""
        router = APIRouter()

        @router.get("/health/ready", include_in_schema=True, tags=["health"])
        async def ready() -> JSONResponse:
            if self.result is None:
                return JSONResponse({"ready": False}, status_code=503)
            return JSONResponse({"ready": True, "outcome": self.result.outcome.value})

        return router

    async def history(
        self, limit: int = 20, statuses: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """The namespace's latest runs with their steps, JSON-ready.

        Opens and closes its own short connection.
        """
        settings = self.settings
        conn = await connection.connect(settings)
        try:
            runs = await ledger.fetch_runs(
                conn,
                settings.ledger_schema,
                settings.effective_namespace,
                limit=limit,
                statuses=statuses,
            )
        finally:
            await conn.close()
        return [_jsonable(run) for run in runs]


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, list):
            out[key] = [_jsonable(v) for v in value]
        elif hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out
