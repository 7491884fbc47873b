"""Worker processes forked from a preloaded server, released at one instant.

A fresh interpreter per worker (what ``uvicorn --workers`` does) spends
about a second of CPU importing SQLAlchemy, Alembic and the drivers; 128 of
them on 2 cores would take a minute per trial before anything is measured.
So workers come from multiprocessing's fork server, which imports
everything once (like ``gunicorn --preload``); each worker is a real,
separate process with its own connections. Import time is measured apart,
in fresh interpreters (:func:`import_seconds`).

The go barrier is a file the bench holds under an exclusive ``flock``; every
worker blocks asking for a shared lock, and unlocking grants them all at
once. The linger barrier works the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.strategies import FLOORS, STRATEGIES
from bench.worker import WorkerSpec, main

__all__ = ["Barrier", "Herd", "fork_server", "import_seconds"]

_PRELOAD = [
    "bench.worker",
    "bench.strategies.base",
    *(s.module for s in (*STRATEGIES, *FLOORS)),
    "psycopg",
]

_context: Any = None


def fork_server() -> Any:
    """The multiprocessing context whose fork server has everything imported.

    Modules that fail to import (a strategy's missing package) are skipped
    by the fork server; that strategy is reported unavailable instead.
    """
    global _context
    if _context is None:
        # The fork server is a fresh interpreter that imports the preload
        # list before it learns the parent's sys.path (Python 3.11 ignores
        # it there), so the repository root must come through PYTHONPATH.
        root = str(Path(__file__).resolve().parent.parent)
        paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
        os.environ["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


class Barrier:
    """A file held under an exclusive ``flock`` until :meth:`lift`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        self._fd: int | None = os.open(path, os.O_RDWR)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def lift(self) -> float:
        """Release every process waiting on it; return ``time.time()`` of that."""
        if self._fd is None:
            raise RuntimeError(f"barrier {self.path} lifted twice")
        lifted = time.time()
        os.close(self._fd)  # Closing drops the lock: one system call.
        self._fd = None
        return lifted

    def close(self) -> None:
        """Lift it if still held (idempotent)."""
        if self._fd is not None:
            self.lift()


class Herd:
    """N processes from the fork server, waiting at one go barrier.

    Use as a context manager: leaving it lifts both barriers and kills
    whatever still runs, so a failed trial leaves no process behind.
    """

    def __init__(self, specs: Sequence[WorkerSpec], go: Barrier, linger: Barrier):
        self.specs = list(specs)
        self.go = go
        self.linger = linger
        context = fork_server()
        self.events: Any = context.Queue()
        self.processes = [
            context.Process(target=main, args=(spec, self.events), daemon=True)
            for spec in self.specs
        ]
        self.released_at: float | None = None

    def __enter__(self) -> Herd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def start(self, timeout: float) -> list[dict[str, Any]]:
        """Start every process; return once all are armed at the barrier.

        Returns the events seen meanwhile (a crash at import, say).

        Raises:
            RuntimeError: Not all armed within ``timeout`` seconds.
        """
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + timeout
        armed = 0
        seen: list[dict[str, Any]] = []
        while armed < len(self.processes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                event = self.events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if all(p.exitcode is not None for p in self.processes):
                    break
                continue
            if event["event"] == "armed":
                armed += 1
            else:
                seen.append(event)
                if event["event"] == "crashed":
                    armed += 1  # It will never arm; do not wait for it.
        if armed < len(self.processes):
            self.kill()
            raise RuntimeError(
                f"only {armed} of {len(self.processes)} workers got ready to "
                f"start within {timeout:g} s"
            )
        return seen

    def release(self) -> float:
        """Let every worker go at once; return the release time."""
        self.released_at = self.go.lift()
        return self.released_at

    def drain(self, timeout: float) -> Iterator[dict[str, Any]]:
        """Yield events as they arrive, until ``timeout`` seconds have passed.

        The caller may stop early; nothing is lost, the rest stays queued.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                yield self.events.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                return

    def cpu_seconds(self) -> float:
        """CPU time the live processes have used so far (Linux ``/proc``)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for process in self.processes:
            if process.pid is None or process.exitcode is not None:
                continue
            try:
                stat = Path(f"/proc/{process.pid}/stat").read_text()
            except OSError:
                continue  # Exited between the check and the read.
            # Fields after the parenthesised command name; utime and stime
            # are the 14th and 15th fields of the whole line.
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
        return total / ticks

    def exit_codes(self) -> list[int | None]:
        """Each process's exit code, None while it runs."""
        return [p.exitcode for p in self.processes]

    def finish(self, timeout: float = 20.0) -> None:
        """Lift the linger barrier and wait for the processes; kill stragglers."""
        self.linger.close()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL whatever still runs (idempotent)."""
        self.go.close()
        self.linger.close()
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(OSError):
                    process.kill()
        for process in self.processes:
            if process.pid is not None:
                process.join(5)
        self.events.close()
        self.events.join_thread()


def import_seconds(modules: Sequence[str]) -> float | None:
    """Seconds a fresh interpreter spends importing ``modules`` (best of 2).

    This is what each worker of ``uvicorn --workers`` pays before its
    lifespan starts, and what the fork server saves the bench.
    """
    code = (
        "import time; t = time.perf_counter()\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(time.perf_counter() - t)"
    )
    best: float | None = None
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=120,
        )
        if result.returncode != 0:
            return None
        seconds = float(result.stdout.strip().splitlines()[-1])
        best = seconds if best is None else min(best, seconds)
    return best
