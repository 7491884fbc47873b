"""initgate itself: ``InitGate(Settings(...))`` and ``await gate.run()``.

The gate is built and its seed step registered before the release, the way
an application does it at import time (``gate = InitGate.from_env()`` at
module level); the boot is ``await gate.run()``, what the lifespan runs. The
seed step runs once per version, in the holder's session like the migrations.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bench import workload
from bench.strategies.base import WorkerContext
from initgate import InitGate, Settings

__all__ = ["boot", "prepare"]


def prepare(ctx: WorkerContext, driver: str = "asyncpg") -> None:
    """Build the gate and register the seed, as an app does at import time."""
    # Through a dict: the settings are validated at run time by pydantic,
    # whose keyword signature a type checker without its plugin misreads.
    settings: dict[str, Any] = {
        "database_url": ctx.database_url,
        "alembic_config": ctx.alembic_ini,
        "driver": driver,
    }
    gate = InitGate(Settings(**settings))

    @gate.seed("reference", version=1)
    async def seed_reference(conn: AsyncConnection) -> None:
        await workload.seed_async(conn, ctx.seed_rows)

    ctx.prepared = gate


async def boot(ctx: WorkerContext) -> None:
    """Pass the gate (what the lifespan does); report how."""
    gate: InitGate = ctx.prepared
    result = await gate.run()
    ctx.info["outcome"] = result.outcome.value
    ctx.info["gate_ms"] = round(result.elapsed_ms, 2)
    ctx.info["waited_ms"] = round(result.waited_ms, 2)
