"""Not a strategy: an asyncpg connect and close, the floor under initgate's boot.

initgate's warm path is this plus one query; the difference is what the gate
itself costs. Connecting is the server forking a backend and the handshake.
"""

from __future__ import annotations

import asyncpg

from bench.strategies.base import WorkerContext

__all__ = ["boot"]


async def boot(ctx: WorkerContext) -> None:
    """Connect (as initgate does: asyncpg, named session) and close."""
    conn = await asyncpg.connect(
        ctx.database_url, server_settings={"application_name": ctx.app_name}
    )
    await conn.close()
