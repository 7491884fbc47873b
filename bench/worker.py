"""What runs inside one worker process (forked from the preloaded fork server).

A worker says it is armed, blocks on the go barrier, runs its strategy's
``boot``, reports, then lingers (keeping whatever the strategy left open)
until the bench has counted connections and lifts the linger barrier.
A reader is an "old worker" of a rolling deploy: one open connection running
a SELECT in a loop until told to stop.

Every report is one dict put on the herd's queue; times are ``time.time()``,
the wall clock that PostgreSQL's ``clock_timestamp()`` also reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import importlib
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.strategies.base import WorkerContext

__all__ = ["WorkerSpec", "main"]


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs; pickled to it by multiprocessing.

    Attributes:
        index: Number in the herd, from 0.
        role: ``"worker"`` (boots a strategy) or ``"reader"`` (old worker).
        module: The strategy module (unused by readers).
        database_url: Plain ``postgresql://`` URL of the trial's database.
        alembic_ini: The project's ``alembic.ini``.
        seed_rows: Rows the seed inserts.
        params: The strategy's settings.
        trace_path: File the revisions and the seed append to.
        go_path: The go barrier (a file the bench holds locked).
        linger_path: The linger barrier, likewise.
        stop_path: For readers: they stop once this file exists.
        log_path: Where the process's stdout and stderr go.
    """

    index: int
    role: str
    module: str
    database_url: str
    alembic_ini: str
    seed_rows: int
    params: dict[str, float]
    trace_path: str
    go_path: str
    linger_path: str
    stop_path: str
    log_path: str


def main(spec: WorkerSpec, events: Any) -> None:
    """Process entry point: run ``spec`` and put reports on ``events``."""
    _redirect_output(spec.log_path)
    prefix = "bench-old" if spec.role == "reader" else "bench"
    app_name = f"{prefix}:{os.getpid()}"
    # libpq (psycopg, psycopg2, hence tooz) reads these; asyncpg users pass
    # the name explicitly. The bench maps connections to workers by it.
    os.environ["PGAPPNAME"] = app_name
    os.environ["BENCH_TRACE"] = spec.trace_path
    os.environ["BENCH_SQLALCHEMY_URL"] = (
        "postgresql+psycopg" + spec.database_url[len("postgresql") :]
    )
    # As under uvicorn or gunicorn: no worker number in the environment.
    os.environ.pop("WORKER_ID", None)

    base = {"index": spec.index, "pid": os.getpid()}
    try:
        if spec.role == "reader":
            report = _read_until_stopped(spec, events, base)
            events.put({**base, "event": "stopped", **report})
        else:
            asyncio.run(_boot(spec, events, base, app_name))
    except BaseException as exc:
        events.put(
            {
                **base,
                "event": "crashed",
                "crashed_at": time.time(),
                "error": _one_line(exc),
            }
        )
        # Flush the report before exiting with a failure status.
        events.close()
        events.join_thread()
        sys.exit(1)


async def _boot(spec: WorkerSpec, events: Any, base: dict[str, Any], app: str) -> None:
    module = importlib.import_module(spec.module)
    ctx = WorkerContext(
        index=spec.index,
        database_url=spec.database_url,
        alembic_ini=Path(spec.alembic_ini),
        seed_rows=spec.seed_rows,
        params=spec.params,
        app_name=app,
    )
    # What an application does at import time happens before the release,
    # like the imports themselves.
    prepare = getattr(module, "prepare", None)
    if prepare is not None:
        prepare(ctx)
    # Whether the fork server really had everything imported: if not, each
    # worker imported it itself, and the bench says so.
    events.put({**base, "event": "armed", "preloaded": "sqlalchemy" in sys.modules})
    went_at = _wait_at_barrier(spec.go_path)

    result = module.boot(ctx)
    if inspect.isawaitable(result):
        await result
    ready_at = time.time()
    events.put(
        {
            **base,
            "event": "ready",
            "went_at": went_at,
            "ready_at": ready_at,
            "boot_ms": (ready_at - went_at) * 1000,
            "started_at": ctx.started_at,
            "commit_at": ctx.commit_at,
            "init_ms": ctx.init_ms,
            "info": ctx.info,
        }
    )
    # In a thread, so that the event loop keeps running whatever the
    # strategy left behind (a connection's close, a guard's keep-alive).
    await asyncio.to_thread(_wait_at_barrier, spec.linger_path)


def _read_until_stopped(
    spec: WorkerSpec, events: Any, base: dict[str, Any]
) -> dict[str, Any]:
    import psycopg

    conn = psycopg.connect(spec.database_url, autocommit=True)
    events.put({**base, "event": "armed"})
    _wait_at_barrier(spec.go_path)
    ok = failed = 0
    latencies: list[float] = []
    errors: list[str] = []
    stop = Path(spec.stop_path)
    while not stop.exists():
        started = time.perf_counter()
        try:
            conn.execute("SELECT count(*), max(rank) FROM t01").fetchone()
            ok += 1
        except Exception as exc:
            failed += 1
            if len(errors) < 3:
                errors.append(_one_line(exc))
            if conn.closed:
                conn = psycopg.connect(spec.database_url, autocommit=True)
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.02)
    conn.close()
    latencies.sort()
    return {
        "ok": ok,
        "failed": failed,
        "errors": errors,
        "p50_ms": latencies[len(latencies) // 2] if latencies else None,
        "max_ms": latencies[-1] if latencies else None,
    }


def _wait_at_barrier(path: str) -> float:
    """Block until the bench unlocks ``path``; return when that happened."""
    fd = os.open(path, os.O_RDONLY)
    try:
        # The bench holds an exclusive lock; releasing it grants every
        # shared request at once, so the whole herd wakes together.
        fcntl.flock(fd, fcntl.LOCK_SH)
        return time.time()
    finally:
        os.close(fd)


def _redirect_output(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {message}"[:400]
