"""The worker side of the drills: a gate run in a real process, seen from outside.

Drills start this module in real processes: ``spawn_python`` herds (one run
each, :func:`main`), a persistent pool (one run per round, :func:`pool`) or a
forked storm (:func:`storm`). A run configures the gate from ``INITGATE_*``
variables, as a service would, and:

- registers the seed steps named in ``DRILL_SEEDS`` (comma-separated). Each
  body first appends ``<name> <pid>`` to ``DRILL_TRACE``, so that every
  execution is counted whether it commits or not, then inserts its name into
  ``drill_seeded``: the effect that must exist exactly once;
- writes every initgate log record with its wall-clock time to
  ``DRILL_EVENTS`` (JSON lines, flushed at once), so that a drill sees "took
  the init lock" or "waiting" while the process still runs, and echoes it to
  stderr, where the drills' secret scan reads it;
- stops at the checkpoint named by ``DRILL_PAUSE_AT``, announcing it with a
  ``paused`` event, to be killed or frozen right there;
- with ``DRILL_NETNS``, first moves into that network namespace;
- prints its result as one JSON line, the last line of its output.

Checkpoints (see :data:`CHECKPOINTS`) are reached through the gate's public
surface only: its log records, the project's ``env.py``, a revision's
``upgrade()`` and a seed body. The gate itself has no test hooks.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

__all__ = ["CHECKPOINTS", "checkpoint", "main", "pool", "storm"]

CHECKPOINTS = {
    "after_lock": "the holder has just taken the lock; nothing written yet",
    "after_running_row": "its 'running' run row is committed; no revision yet",
    "in_long_migration": "inside a migration's long statement (pg_sleep)",
    "between_migrations": "the first revision committed, the second not begun",
    "in_seed": "inside a seed step's transaction, after its insert",
    "before_succeeded": "the last seed step committed; the run not yet marked",
}
"""Where a drill can stop a holder, and what is committed at that point.

``in_long_migration`` is not a checkpoint of this module: the statement
itself sleeps, and the drill finds it in ``pg_stat_activity``.
"""

# The log records that mark two checkpoints. They couple the drills to the
# wording of the gate's INFO lines; a drill that never reaches its
# checkpoint fails loudly, so a reworded line cannot go unnoticed.
_LOCK_TAKEN = "took the init lock"
_SEEDED = "seeded {name} v"

_PAUSE_SECONDS = 300.0
_CLONE_NEWNET = 0x40000000

_events: TextIO | None = None


def _event(kind: str, **fields: Any) -> None:
    if _events is None:
        return
    record = {"t": time.time(), "pid": os.getpid(), "event": kind, **fields}
    _events.write(json.dumps(record) + "\n")
    _events.flush()


def checkpoint(name: str) -> None:
    """Stop here for good when ``DRILL_PAUSE_AT`` names this checkpoint.

    Blocks the whole process (event loop included) in a plain sleep, as a
    holder stuck in a step would, after announcing a ``paused`` event; for
    ``DRILL_PAUSE_SECONDS`` (default 300), then goes on.
    """
    if os.environ.get("DRILL_PAUSE_AT") != name:
        return
    _event("paused", at=name)
    time.sleep(float(os.environ.get("DRILL_PAUSE_SECONDS", _PAUSE_SECONDS)))


class _EventHandler(logging.Handler):
    """Turns initgate's log records into events and log-marked checkpoints."""

    def __init__(self, last_seed: str | None) -> None:
        super().__init__(logging.DEBUG)
        self.last_seeded = _SEEDED.format(name=last_seed) if last_seed else None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        _event("log", level=record.levelname, logger=record.name, msg=message)
        sys.stderr.write(f"{record.levelname} {record.name}: {message}\n")
        sys.stderr.flush()
        if message.startswith(_LOCK_TAKEN):
            checkpoint("after_lock")
        if self.last_seeded and message.startswith(self.last_seeded):
            checkpoint("before_succeeded")


def _seed_names() -> list[str]:
    return [n for n in os.environ.get("DRILL_SEEDS", "").split(",") if n]


def _trace(name: str) -> None:
    path = os.environ.get("DRILL_TRACE")
    if not path:
        return
    # One write in append mode: lines from racing processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{name} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def _make_seed(name: str) -> Any:
    from sqlalchemy import text

    async def seed(conn: Any) -> None:
        _trace(name)
        await conn.execute(
            text("INSERT INTO drill_seeded (name, pid) VALUES (:name, :pid)"),
            {"name": name, "pid": os.getpid()},
        )
        checkpoint(f"in_seed:{name}")

    return seed


def _setup(events_path: str | None) -> None:
    global _events
    if events_path:
        _events = open(events_path, "a")  # noqa: SIM115 - lives as long as we do
    logger = logging.getLogger("initgate")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    seeds = _seed_names()
    logger.addHandler(_EventHandler(seeds[-1] if seeds else None))
    logger.setLevel(logging.DEBUG)


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{name}") as handle:
        if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into network namespace {name!r} failed")


async def _run() -> dict[str, Any]:
    import asyncpg

    from initgate import InitGate, Settings

    started = time.time()
    report: dict[str, Any] = {"pid": os.getpid(), "started": started}
    try:
        settings = Settings.from_env()
        gate = InitGate(settings)
        for name in _seed_names():
            gate.seed(name, version=1)(_make_seed(name))
        result = await gate.run()
    except Exception as exc:
        report.update(ok=False, error_type=type(exc).__name__, error=str(exc))
        report["failed"] = time.time()
        _event("failed", error_type=type(exc).__name__, error=str(exc))
        return report
    report.update(
        ok=True,
        outcome=result.outcome.value,
        run_id=result.run_id,
        waited_ms=result.waited_ms,
        passed=time.time(),
    )
    _event("passed", outcome=result.outcome.value)
    if os.environ.get("DRILL_CHECK_COMMITTED"):
        # From a session of its own: what any request handler would see.
        dsn = settings.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        conn = await _connect_when_slots_free(asyncpg, dsn)
        try:
            report["committed_seen"] = await conn.fetchval(
                "SELECT count(*) FROM init_runs WHERE status = 'succeeded'"
            )
        finally:
            await conn.close()
    return report


async def _connect_when_slots_free(asyncpg: Any, dsn: str) -> Any:
    # In a boot storm the server is out of connection slots for a while;
    # this look from outside the gate must wait for one like the gate does.
    deadline = time.monotonic() + 120
    while True:
        try:
            return await asyncpg.connect(dsn)
        except (asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _print(report: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


def main() -> None:
    """Run the gate once and print the result line; exit 0 whatever happened."""
    if os.environ.get("DRILL_NETNS"):
        _enter_netns(os.environ["DRILL_NETNS"])
    _setup(os.environ.get("DRILL_EVENTS"))
    _print(asyncio.run(_run()))


def pool() -> None:
    """Serve rounds read from stdin: a job line, ``ready``, ``go``, a result.

    Each job is a JSON object of environment variables for that round (the
    database URL, the trace file). The worker sets them, imports nothing new,
    answers ``ready`` and blocks until the controller writes ``go`` to every
    worker at once; an empty line or EOF ends it.
    """
    _setup(None)
    # Both drivers imported before the first release, so that a round on
    # psycopg does not spend its first moments importing it.
    import psycopg  # noqa: F401

    loop = asyncio.new_event_loop()
    try:
        for line in sys.stdin:
            if not line.strip():
                break
            os.environ.update(json.loads(line))
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            if sys.stdin.readline().strip() != "go":
                break
            _print(loop.run_until_complete(_run()))
    finally:
        loop.close()


def storm(count: int, outdir: str) -> None:
    """Fork ``count`` workers that start the gate together; wait for all.

    Forking after the imports is what ``gunicorn --preload`` does: 150
    processes cost one import and little memory. Each child writes
    ``storm-<i>.json`` (its result) and ``storm-<i>.events`` in ``outdir``.
    """
    go_read, go_write = os.pipe()
    children = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(go_write)
            os.read(go_read, 1)  # EOF once the parent closes: all at once.
            code = 0
            try:
                _setup(os.path.join(outdir, f"storm-{index}.events"))
                report = asyncio.run(_run())
                with open(os.path.join(outdir, f"storm-{index}.json"), "w") as out:
                    json.dump(report, out)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    os.close(go_read)
    os.close(go_write)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    print(json.dumps({"children": count, "crashed": failed}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["pool"]:
        pool()
    else:
        main()
