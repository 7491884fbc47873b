"""The deployment recipes in deploy/: gunicorn, the pre-start script, Kubernetes.

The gunicorn test starts the real server with ``deploy/gunicorn.conf.py`` and
counts seed executions through the demo app's trace file
(``APP_SEED_TRACE_FILE``), outside the gate's own bookkeeping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import make_url

from tests.helpers import REPO_ROOT, DatabaseAdmin, DdlLog, free_port, wait_for_http
from tests.test_workers import assert_demo_initialised_once

DEPLOY = REPO_ROOT / "deploy"
CANARY = "canary-Deploy-93be"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])
    )
    env.update(extra)
    return env


async def test_gunicorn_with_4_uvicorn_workers_inits_exactly_once(
    database_url: str, db: DatabaseAdmin, ddl_log: DdlLog, tmp_path: Path
) -> None:
    pytest.importorskip("uvicorn_worker")
    trace = tmp_path / "seeds.trace"
    log = tmp_path / "gunicorn.log"
    port = free_port()
    env = child_env(
        DATABASE_URL=database_url,
        APP_SEED_TRACE_FILE=str(trace),
        GUNICORN_BIND=f"127.0.0.1:{port}",
        WEB_CONCURRENCY="4",
    )
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                str(DEPLOY / "gunicorn.conf.py"),
                "app.main:app",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health/ready", timeout=120)
        deadline = time.monotonic() + 60
        while log.read_text().count("Application startup complete.") < 4:
            assert server.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=30)

    text = log.read_text()
    assert text.count("Booting worker with pid") == 4, text
    assert "uvicorn_worker.UvicornWorker" in text
    assert "WORKER TIMEOUT" not in text
    await assert_demo_initialised_once(db, ddl_log, trace)


def prestart(
    database_url: str, *server: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``deploy/prestart.sh SERVER...`` with a canary password in the URL."""
    url = make_url(database_url).set(password=CANARY)
    result = subprocess.run(
        [str(DEPLOY / "prestart.sh"), *server],
        cwd=REPO_ROOT,
        env=child_env(
            DATABASE_URL=url.render_as_string(hide_password=False),
            INITGATE_COMMAND=f"{sys.executable} -m initgate",
        ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert CANARY not in result.stdout + result.stderr
    return result


async def test_prestart_runs_init_then_becomes_the_server(
    database_url: str, db: DatabaseAdmin
) -> None:
    result = prestart(database_url, "sh", "-c", 'echo "serving as $$"')

    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert first.startswith("ran in ")
    assert second.startswith("serving as ")
    runs = await db.fetch("SELECT status FROM init_runs")
    assert [run["status"] for run in runs] == ["succeeded"]


async def test_prestart_does_not_start_the_server_when_init_fails(
    database_url: str, db: DatabaseAdmin
) -> None:
    await db.execute(
        "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
        "INSERT INTO alembic_version VALUES ('9999_from_the_future')"
    )

    result = prestart(database_url, "echo", "serving")

    assert result.returncode == 5, result.stderr
    assert "serving" not in result.stdout
    assert "9999_from_the_future" in result.stderr


def test_prestart_without_a_server_command_exits_2() -> None:
    result = subprocess.run(
        [str(DEPLOY / "prestart.sh")], capture_output=True, text=True, check=False
    )

    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_kubernetes_example_gates_the_init_container_and_the_app_alike() -> None:
    deployment = yaml.safe_load((DEPLOY / "kubernetes.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]

    [init] = pod["initContainers"]
    [app] = pod["containers"]
    assert init["command"] == ["initgate", "run"]
    assert app["command"][:3] == ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
    assert (DEPLOY / "gunicorn.conf.py").exists()
    # The same settings, so both pass the same gate: same lock, same target.
    assert init["env"] == app["env"]
    assert init["image"] == app["image"]
    for probe in ("startupProbe", "readinessProbe"):
        assert app[probe]["httpGet"]["path"] == "/health/ready"
