"""An app whose seed step always fails: uvicorn must not serve it."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate import InitGate

gate = InitGate.from_env(alembic_config=None)


@gate.seed("prices", version=1)
async def seed_prices(conn: AsyncConnection) -> None:
    raise FileNotFoundError("unit price table is missing")


app = FastAPI(lifespan=gate.lifespan)
app.include_router(gate.router)
