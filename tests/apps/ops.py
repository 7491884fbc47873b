"""An app for the operator commands' tests, on a throwaway Alembic project.

Settings come from the environment (``INITGATE_ALEMBIC_CONFIG`` names the
project). Its one seed step fails while ``OPS_SEED_FAIL`` is set, so a test
can make init fail and then deploy the "fix" by unsetting it.
"""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate import InitGate

gate = InitGate.from_env()


@gate.seed("flags", version=1)
async def seed_flags(conn: AsyncConnection) -> None:
    if os.environ.get("OPS_SEED_FAIL"):
        raise FileNotFoundError("the flag list is missing")
    await conn.execute(text("INSERT INTO items VALUES (1, 'flag')"))
