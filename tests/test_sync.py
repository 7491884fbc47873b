"""SyncInitGate: the same guarantees for applications without an event loop.

Its session is psycopg 3 unless told otherwise; the processes here use that
default, and one test shows it is psycopg they depend on.
"""

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
from tests.helpers import (
    REPO_ROOT,
    DatabaseAdmin,
    DdlLog,
    free_port,
    passed_reports,
    run_python,
)
from tests.project import Project, Revision
from tests.test_workers import (
    LONG_MIGRATION,
    concurrently_indexed_project,
    wait_for_query,
)

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


# A sync process with migrations and a seed step, reporting how it passed.
PASS_SYNC_PROJECT_GATE = """
import json, os, time
from sqlalchemy import text
from initgate.sync import SyncInitGate

gate = SyncInitGate.from_env(alembic_config=os.environ["PROJECT_INI"])

@gate.seed("labels", version=1)
def seed(conn):
    with open(os.environ["APP_SEED_TRACE_FILE"], "a") as trace:
        trace.write("labels\\n")
    conn.execute(text("UPDATE items SET name = 'labelled' WHERE id <= 10"))

result = gate.run()
print(json.dumps({"outcome": result.outcome.value, "passed": time.time()}))
"""


async def test_sync_processes_migrate_concurrently_indexed_and_seed_exactly_once(
    database_url: str,
    db: DatabaseAdmin,
    ddl_log: DdlLog,
    spawn_python: SpawnPython,
    tmp_path: Path,
) -> None:
    trace = tmp_path / "trace"
    project = concurrently_indexed_project(tmp_path / "p", rows=50_000)
    herd = spawn_python(
        PASS_SYNC_PROJECT_GATE,
        n=12,
        env={
            "DATABASE_URL": database_url,
            "PROJECT_INI": str(project.ini),
            "APP_SEED_TRACE_FILE": str(trace),
        },
        preload=["initgate.sync", "psycopg"],
    )
    herd.release()
    results = herd.wait_all(timeout=120)

    outcomes = [report["outcome"] for report in passed_reports(results)]
    assert outcomes.count("ran") == 1, outcomes
    assert await ddl_log.count("CREATE TABLE", "items") == 1
    assert await ddl_log.count("CREATE INDEX", "items_name_idx") == 1
    assert await db.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_name_idx'::regclass"
    )
    assert trace.read_text().split() == ["labels"]
    assert await db.fetchval("SELECT count(*) FROM items WHERE name = 'labelled'") == 10


async def test_sync_holder_killed_mid_migration_is_taken_over_once(
    database_url: str,
    db: DatabaseAdmin,
    ddl_log: DdlLog,
    spawn_python: SpawnPython,
    tmp_path: Path,
) -> None:
    trace = tmp_path / "trace"
    project = (
        Project(tmp_path / "p")
        .add(Revision.sql("r0_items", "CREATE TABLE items (id int, name text)"))
        .add(LONG_MIGRATION)
    )
    env = {
        "DATABASE_URL": database_url,
        "PROJECT_INI": str(project.ini),
        "APP_SEED_TRACE_FILE": str(trace),
    }
    holder = spawn_python(PASS_SYNC_PROJECT_GATE, n=1, env=env, preload=["psycopg"])
    holder.release()
    await wait_for_query(db, "pg_sleep(CASE", timeout=60)
    waiters = spawn_python(PASS_SYNC_PROJECT_GATE, n=3, env=env, preload=["psycopg"])
    waiters.release()
    time.sleep(1.0)  # The waiters are past their first try-lock by now.

    await db.execute("CREATE TABLE resume (id int)")
    holder.kill()
    results = waiters.wait_all(timeout=60)

    outcomes = [report["outcome"] for report in passed_reports(results)]
    assert outcomes.count("ran") == 1, outcomes
    statuses = await db.fetch("SELECT status FROM init_runs ORDER BY id")
    assert [r["status"] for r in statuses] == ["abandoned", "succeeded"]
    assert await ddl_log.count("CREATE TABLE", "first_half") == 1
    assert await ddl_log.count("CREATE TABLE", "second_half") == 1
    assert trace.read_text().split() == ["labels"]


WITHOUT_PSYCOPG = """
import sys
sys.modules["psycopg"] = None  # as if it were not installed
from initgate import InitGateError
from initgate.sync import SyncInitGate

gate = SyncInitGate.from_env(alembic_config=None)
try:
    print(gate.run().outcome.value)
except InitGateError as exc:
    print(f"{type(exc).__name__}: {exc}")
"""


async def test_sync_gate_runs_on_psycopg_unless_told_to_use_asyncpg(
    database_url: str, db: DatabaseAdmin
) -> None:
    env = {"DATABASE_URL": database_url, "PYTHONPATH": str(REPO_ROOT)}

    def run(**extra: str) -> str:
        done = run_python(
            "-c", WITHOUT_PSYCOPG, env={"PATH": "/usr/bin:/bin", **env, **extra}
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    refused = run()
    assert refused.startswith("ConfigurationError:"), refused
    assert "pip install 'initgate[psycopg]'" in refused
    assert await db.fetchval("SELECT to_regclass('init_runs')") is None

    assert run(INITGATE_DRIVER="asyncpg") == "ran"
    assert await db.fetchval("SELECT count(*) FROM init_runs") == 1


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
