"""Exactly once under other ASGI servers' worker processes: hypercorn, granian.

Each test starts the demo app with four workers against a fresh database and
then checks, from outside the gate's bookkeeping, that the migrations' DDL
(``ddl_log``) and every seed body (the app's ``APP_SEED_TRACE_FILE``) ran once,
that each of the four workers came up, and that ``/health/ready`` answers.

How a worker says it came up differs per server, and both lines are written
only after that worker's lifespan startup, so after it passed the gate:

- hypercorn: ``[<pid>] [INFO] Running on http://...`` once per worker;
- granian: ``[INFO] Started worker-<n>`` once per worker (written by the
  worker process when it starts serving).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.helpers import (
    REPO_ROOT,
    DatabaseAdmin,
    DdlLog,
    UvicornServer,
    free_port,
)
from tests.test_workers import assert_demo_initialised_once

WORKERS = 4

StartServer = Callable[..., UvicornServer]


@pytest.fixture
def run_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start ``python -m <server> ...`` from the repository root; stop at teardown.

    The command's ``{port}`` is replaced by a free port. The process runs in
    its own group, so stopping it stops its workers too.
    """
    servers: list[UvicornServer] = []

    def start(command: Sequence[str], env: Mapping[str, str]) -> UvicornServer:
        port = free_port()
        log_path = tmp_path / f"{command[0]}-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", *(c.format(port=port) for c in command)],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = UvicornServer(process, port, log_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def wait_for_lines(
    server: UvicornServer, pattern: str, count: int, timeout: float = 60.0
) -> list[str]:
    """Wait until ``pattern`` matches ``count`` distinct log lines; the matches."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(set(re.findall(pattern, server.log(), flags=re.MULTILINE)))
        if len(found) >= count:
            return found
        if time.monotonic() > deadline or server.process.poll() is not None:
            raise AssertionError(
                f"{len(found)} of {count} lines match {pattern!r}; the log:\n"
                f"{server.log()[-5000:]}"
            )
        time.sleep(0.1)


def needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (pip install -e '.[test]')",
    )


@needs("hypercorn")
async def test_hypercorn_4_workers_init_exactly_once(
    database_url: str,
    db: DatabaseAdmin,
    ddl_log: DdlLog,
    run_server: StartServer,
    tmp_path: Path,
) -> None:
    trace = tmp_path / "seeds.trace"
    server = run_server(
        [
            "hypercorn",
            "app.main:app",
            "--workers",
            str(WORKERS),
            "--bind",
            "127.0.0.1:{port}",
        ],
        env={"DATABASE_URL": database_url, "APP_SEED_TRACE_FILE": str(trace)},
    )
    server.wait_until_ok("/health/ready", timeout=120)
    # Hypercorn puts the worker's pid in each line: four distinct pids are
    # four workers that finished their lifespan startup.
    pids = wait_for_lines(server, r"\[(\d+)\] \[INFO\] Running on http", WORKERS)

    assert len(pids) == WORKERS, pids
    assert "Traceback" not in server.log(), server.log()[-3000:]
    await assert_demo_initialised_once(db, ddl_log, trace)


@needs("granian")
async def test_granian_4_workers_init_exactly_once(
    database_url: str,
    db: DatabaseAdmin,
    ddl_log: DdlLog,
    run_server: StartServer,
    tmp_path: Path,
) -> None:
    trace = tmp_path / "seeds.trace"
    server = run_server(
        [
            "granian",
            "--interface",
            "asgi",
            "--workers",
            str(WORKERS),
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "app.main:app",
        ],
        env={"DATABASE_URL": database_url, "APP_SEED_TRACE_FILE": str(trace)},
    )
    server.wait_until_ok("/health/ready", timeout=120)
    workers = wait_for_lines(server, r"Started (worker-\d+)$", WORKERS)

    assert len(workers) == WORKERS, workers
    assert "lifespan startup failed" not in server.log(), server.log()[-3000:]
    await assert_demo_initialised_once(db, ddl_log, trace)
