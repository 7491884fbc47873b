"""Counting a database's connections during a trial, per worker.

Every bench connection carries an ``application_name`` naming its process
(``bench:<pid>``, ``bench-old:<pid>`` for old workers, or initgate's own
``initgate:<namespace>:<host>:<pid>``), so each connection maps to a worker.

Two ways of counting:

* :class:`ServerLog`, exact: the embedded server logs every connection and
  disconnection with a millisecond timestamp and its backend pid, and the
  bench replays them after the trial.
* :class:`ConnectionSampler`, for a server given by URL: a side thread reads
  ``pg_stat_activity`` every 20 ms. It can miss a connection shorter than
  that (a warm initgate worker's lives for a few milliseconds).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
from pathlib import Path
from typing import Any

import psycopg

__all__ = [
    "ConnectionCounts",
    "ConnectionSampler",
    "ServerLog",
    "count_worker_connections",
    "pid_of",
    "wait_snapshot",
]

_SAMPLE_SQL = """
SELECT application_name, count(*)
FROM pg_stat_activity
WHERE datname = %s AND backend_type = 'client backend'
GROUP BY application_name
"""

_WAITS_SQL = """
SELECT coalesce(wait_event_type || '/' || wait_event, state, '?') AS waiting,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 70) AS query,
       count(*)
FROM pg_stat_activity
WHERE datname = %s AND backend_type = 'client backend'
GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 8
"""


def pid_of(application_name: str) -> int | None:
    """The worker pid a connection's ``application_name`` names, if any."""
    if not application_name.startswith(("bench:", "initgate:")):
        return None
    tail = application_name.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


@dataclasses.dataclass
class ConnectionCounts:
    """Worker connections of one trial (old workers' excluded).

    Attributes:
        peak: Most worker connections open at once.
        per_worker_peak: For each worker pid, most it had open at once.
        opened: For each worker pid, how many it opened in all (log only).
        exact: True when replayed from the server log, False when sampled.
    """

    peak: int = 0
    per_worker_peak: dict[int, int] = dataclasses.field(default_factory=dict)
    opened: dict[int, int] = dataclasses.field(default_factory=dict)
    exact: bool = False


_LOG_LINE = re.compile(
    r"^(?P<ms>\d+\.\d+) (?P<backend>\d+) (?P<db>[^|]*)\|(?P<msg>.*)$"
)
_AUTHORIZED = re.compile(r"connection authorized: .*application_name=(?P<app>\S+)")


class ServerLog:
    """A database's connections, replayed from the server's connection log.

    Create it just before the trial (it remembers where the log ends), then
    call :meth:`counts` afterwards.
    """

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        self.database = database
        self.offset = path.stat().st_size

    def counts(self) -> ConnectionCounts:
        """Replay the log written since creation."""
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        events: list[tuple[float, int, int]] = []
        worker_of: dict[int, int] = {}
        for line in text.splitlines():
            match = _LOG_LINE.match(line)
            if match is None or match["db"] != self.database:
                continue
            backend = int(match["backend"])
            message = match["msg"]
            authorized = _AUTHORIZED.search(message)
            if authorized is not None:
                pid = pid_of(authorized["app"])
                if pid is not None:
                    worker_of[backend] = pid
                    events.append((float(match["ms"]), 1, backend))
            elif "disconnection:" in message and backend in worker_of:
                events.append((float(match["ms"]), -1, backend))
        counts = ConnectionCounts(exact=True)
        open_now: collections.Counter[int] = collections.Counter()
        total = 0
        # At equal timestamps, count closes first: a worker that closes one
        # connection and opens the next in the same millisecond held one.
        for _, change, backend in sorted(events, key=lambda e: (e[0], e[1])):
            pid = worker_of[backend]
            open_now[pid] += change
            total += change
            if change > 0:
                counts.opened[pid] = counts.opened.get(pid, 0) + 1
            counts.peak = max(counts.peak, total)
            if open_now[pid] > counts.per_worker_peak.get(pid, 0):
                counts.per_worker_peak[pid] = open_now[pid]
        return counts


class ConnectionSampler(threading.Thread):
    """Samples one database's connections until :meth:`stop`.

    Attributes:
        peak: Most worker connections seen at once (old workers excluded).
        per_worker_peak: Most connections one worker held at once.
        samples: How many samples were taken.
    """

    def __init__(self, admin_url: str, database: str, interval: float = 0.02):
        super().__init__(name="connection-sampler", daemon=True)
        self.admin_url = admin_url
        self.database = database
        self.interval = interval
        self.peak = 0
        self.per_worker_peak: dict[int, int] = {}
        self.samples = 0
        self._stopped = threading.Event()
        self._started_ok = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                self._started_ok.set()
                while not self._stopped.is_set():
                    self._sample(conn)
                    self._stopped.wait(self.interval)
        except BaseException as exc:
            self._error = exc
            self._started_ok.set()

    def _sample(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(_SAMPLE_SQL, (self.database,)).fetchall()
        total = 0
        per_pid: collections.Counter[int] = collections.Counter()
        for name, count in rows:
            pid = pid_of(name or "")
            if pid is not None:
                per_pid[pid] += count
                total += count
        self.samples += 1
        self.peak = max(self.peak, total)
        for pid, count in per_pid.items():
            if count > self.per_worker_peak.get(pid, 0):
                self.per_worker_peak[pid] = count

    def counts(self) -> ConnectionCounts:
        """What the samples saw."""
        return ConnectionCounts(self.peak, dict(self.per_worker_peak))

    def begin(self) -> ConnectionSampler:
        """Start sampling; returns once the sampler's connection is up."""
        self.start()
        self._started_ok.wait(30)
        if self._error is not None:
            raise RuntimeError(f"connection sampler failed: {self._error}")
        return self

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stopped.set()
        self.join(10)


def count_worker_connections(admin_url: str, database: str) -> int:
    """Worker connections to ``database`` right now (old workers excluded)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(_SAMPLE_SQL, (database,)).fetchall()
    return sum(count for name, count in rows if pid_of(name or "") is not None)


def wait_snapshot(admin_url: str, database: str) -> list[str]:
    """What the database's sessions are waiting on, most common first."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(_WAITS_SQL, (database,)).fetchall()
    return [f"{count} x {waiting}: {query}" for waiting, query, count in rows]
