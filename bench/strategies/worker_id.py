"""Re-implemented: "migrate only in the first worker", keyed on ``WORKER_ID``.

The usual snippet defaults the variable to ``"1"`` so that a single-process
run migrates too. uvicorn and gunicorn set no such variable, so every worker
takes the branch; nothing makes the others wait, and nothing retries.
"""

from __future__ import annotations

import os

from bench.strategies.base import WorkerContext, upgrade_and_seed

__all__ = ["boot"]


def boot(ctx: WorkerContext) -> None:
    """Migrate and seed if this looks like the first worker (it always does)."""
    if os.environ.get("WORKER_ID", "1") == "1":
        upgrade_and_seed(ctx, None)
