"""A plain WSGI app gated by SyncInitGate: no event loop anywhere in it.

gunicorn imports this module in every sync worker (no ``--preload``), so
every worker passes the gate before it takes a request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, text

from initgate.sync import SyncInitGate

gate = SyncInitGate.from_env(alembic_config=None)


@gate.seed("plans", version=1)
def seed_plans(conn: Connection) -> None:
    # One line per execution, outside the gate's bookkeeping, for the test.
    with open(os.environ["APP_SEED_TRACE_FILE"], "a") as trace:
        trace.write(f"plans {os.getpid()}\n")
    conn.execute(text("CREATE TABLE plans (name text PRIMARY KEY)"))
    conn.execute(text("INSERT INTO plans VALUES ('free'), ('pro')"))


gate.run()
with open(os.environ["APP_READY_FILE"], "a") as ready:
    ready.write(f"{os.getpid()} {gate.result.outcome.value if gate.result else '?'}\n")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer 200 once this worker passed the gate (it has, if it is serving)."""
    status = "200 OK" if gate.ready else "503 Service Unavailable"
    start_response(status, [("Content-Type", "text/plain")])
    return [b"ready\n" if gate.ready else b"not ready\n"]
