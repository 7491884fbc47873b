"""SyncInitGate: the same guarantees for applications without an event loop."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sqlalchemy import Connection, text

from initgate import Outcome, Settings
from initgate.sync import SyncInitGate
from tests.conftest import SpawnPython
from tests.helpers import REPO_ROOT, DatabaseAdmin, free_port

PASS_SYNC_GATE = """
import os
from sqlalchemy import text
from initgate.sync import SyncInitGate

gate = SyncInitGate.from_env(alembic_config=None)

@gate.seed("plans", version=1)
def seed(conn):
    with open(os.environ["APP_SEED_TRACE_FILE"], "a") as trace:
        trace.write("plans\\n")
    conn.execute(text("CREATE TABLE plans (name text PRIMARY KEY)"))
    conn.execute(text("INSERT INTO plans VALUES ('free')"))

print(gate.run().outcome.value)
"""


def test_sync_processes_released_together_seed_exactly_once(
    database_url: str, spawn_python: SpawnPython, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    herd = spawn_python(
        PASS_SYNC_GATE,
        n=8,
        env={"DATABASE_URL": database_url, "APP_SEED_TRACE_FILE": str(trace)},
        preload=["initgate.sync"],
    )
    herd.release()
    results = herd.wait_all(timeout=120)

    assert all(r.returncode == 0 for r in results), [r.describe() for r in results]
    outcomes = sorted(r.stdout.split()[-1] for r in results)
    assert outcomes.count("ran") == 1, outcomes
    assert trace.read_text().count("plans") == 1


async def test_sync_gate_works_from_inside_a_running_loop(
    database_url: str, db: DatabaseAdmin
) -> None:
    gate = SyncInitGate(Settings(database_url=database_url, alembic_config=None))

    @gate.seed("plans", version=1)
    def seed(conn: Connection) -> None:
        conn.execute(text("CREATE TABLE plans (name text)"))
        conn.execute(text("INSERT INTO plans VALUES ('free')"))

    result = gate.run()

    assert result.outcome is Outcome.RAN
    assert gate.ready
    assert await db.fetchval("SELECT count(*) FROM plans") == 1
    assert await db.fetchval("SELECT name FROM init_steps") == "plans"


def test_gunicorn_sync_workers_pass_the_gate_once(
    database_url: str, db: DatabaseAdmin, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    ready = tmp_path / "ready"
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = {
        "DATABASE_URL": database_url,
        "APP_SEED_TRACE_FILE": str(trace),
        "APP_READY_FILE": str(ready),
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": "/usr/bin:/bin",
    }
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "tests.apps.wsgi_app:app",
                "--workers",
                "4",
                "--bind",
                f"127.0.0.1:{port}",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        booted = 0
        while time.monotonic() < deadline:
            booted = len(ready.read_text().splitlines()) if ready.exists() else 0
            if booted == 4 and _ok(f"http://127.0.0.1:{port}/"):
                break
            assert server.poll() is None, log.read_text()
            time.sleep(0.2)
        assert booted >= 4, log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert trace.read_text().count("plans") == 1
    outcomes = sorted(line.split()[1] for line in ready.read_text().splitlines())
    assert outcomes.count("ran") == 1, outcomes
    assert "Worker failed to boot" not in log.read_text()


def _ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
