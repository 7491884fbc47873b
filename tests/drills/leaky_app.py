"""An app whose seed step fails quoting its database URL, password and all.

The secret drill runs ``initgate run`` on it: whatever the step puts in its
error, the password must not reach the CLI's output, the logs or the ledger.
"""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import AsyncConnection

from initgate import InitGate

gate = InitGate.from_env(alembic_config=None)


@gate.seed("prices", version=1)
async def seed_prices(conn: AsyncConnection) -> None:
    url = os.environ["DATABASE_URL"]
    raise ConnectionError(f"could not load prices via {url}")
