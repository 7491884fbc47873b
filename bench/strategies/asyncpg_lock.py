"""PyPI ``asyncpg-lock``: ``AdvisoryLockGuard.run(key, func)``, its public API.

The guard is built for leader election: it connects, polls
``pg_try_advisory_lock`` every ``reacquire_delay`` seconds, waits
``after_acquire_delay`` seconds once it has the lock, then calls ``func``
again and again until the guard is cancelled. For one-time init each worker
runs ``alembic upgrade head`` and the seed as ``func`` once, then cancels its
guard so that the lock (held until the guard's connection closes) passes on.
Nothing tells a waiter that init is done, so every worker waits its turn.
The guard's connection is its own; Alembic connects by itself beside it.
"""

from __future__ import annotations

import asyncio
import contextlib

from asyncpg_lock import AdvisoryLockGuard, connect_func

from bench.strategies.base import WorkerContext, upgrade_and_seed

__all__ = ["boot"]

# The two-int key form; any constant pair does.
_KEY = (0x62656E63, 0x68)


async def boot(ctx: WorkerContext) -> None:
    """Run init once under the guard, then give the lock up."""
    guard = AdvisoryLockGuard(
        connect=connect_func(
            ctx.database_url, server_settings={"application_name": ctx.app_name}
        ),
        reacquire_delay=float(ctx.params.get("reacquire_delay", 5.0)),
        after_acquire_delay=float(ctx.params.get("after_acquire_delay", 5.0)),
    )
    done = asyncio.Event()
    failure: list[BaseException] = []

    async def init_once() -> None:
        if not done.is_set():
            try:
                await asyncio.to_thread(upgrade_and_seed, ctx, None)
            except Exception as exc:
                # The guard logs and calls func again at once on an error;
                # keep the error for this worker to raise instead.
                failure.append(exc)
            done.set()
        # Holding still: returning would make the guard call func again.
        await asyncio.Event().wait()

    guarded = asyncio.create_task(guard.run(_KEY, init_once))
    waiting = asyncio.create_task(done.wait())
    await asyncio.wait({guarded, waiting}, return_when=asyncio.FIRST_COMPLETED)
    guarded.cancel()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await guarded
    if failure:
        raise failure[0]
