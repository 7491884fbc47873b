"""The ``initgate`` command, run as a real process against real PostgreSQL.

Each test starts ``python -m initgate`` from the repository root, as an init
container or an operator would, and reads the database afterwards from a
session of its own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pycountry
import pytest

from initgate.ledger import RunStatus
from initgate.lock import LockKey
from tests.helpers import REPO_ROOT, DatabaseAdmin, free_port, run_python

CANARY = "canary-Cli-41d2e"
"""A password that must never appear in any output."""


def initgate(
    *args: str,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m initgate ARGS`` from the repository root; wait for it."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
    )
    if database_url is not None:
        environment["DATABASE_URL"] = database_url
    environment.update(env or {})
    return run_python("-m", "initgate", *args, env=environment, timeout=timeout)


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with another user and password, host and database kept."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{user}:{password}@{host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command; no traceback, no password."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("initgate: "), result.stderr
    assert "Traceback" not in result.stderr
    assert CANARY not in result.stdout + result.stderr
    return lines[0]


async def count_runs(db: DatabaseAdmin) -> list[str]:
    """The statuses of every recorded run, oldest first."""
    rows = await db.fetch("SELECT status FROM init_runs ORDER BY id")
    return [row["status"] for row in rows]


# -- initgate run -------------------------------------------------------------


async def test_run_on_a_cold_database_migrates_and_seeds_once(
    database_url: str, db: DatabaseAdmin
) -> None:
    result = initgate("run", database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ran in "), result.stdout
    assert "4 revisions and 3 seed steps" in result.stdout
    assert await count_runs(db) == ["succeeded"]
    assert await db.fetchval("SELECT count(*) FROM countries") == len(
        pycountry.countries
    )
    assert await db.fetchval("SELECT count(*) FROM countries") > 200
    assert await db.fetchval("SELECT count(*) FROM currencies") > 100
    assert await db.fetchval("SELECT count(*) FROM languages") > 7000


async def test_second_run_is_up_to_date_and_records_no_run(
    database_url: str, db: DatabaseAdmin
) -> None:
    assert initgate("run", database_url=database_url).returncode == 0

    result = initgate("run", database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("up_to_date in "), result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
    assert await count_runs(db) == ["succeeded"]


async def test_run_waits_then_times_out_with_exit_3_while_the_lock_is_held(
    database_url: str, database_name: str
) -> None:
    key = LockKey.for_namespace(f"{database_name}:public")
    holder = await asyncpg.connect(database_url)
    try:
        assert await holder.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", key.classid, key.objid
        )
        result = initgate(
            "run",
            database_url=database_url,
            env={"INITGATE_WAIT_TIMEOUT": "1", "INITGATE_POLL_INTERVAL": "0.2"},
        )
    finally:
        await holder.close()

    assert result.returncode == 3, result.stderr
    assert "INITGATE_WAIT_TIMEOUT" in assert_one_error_line(result)


async def test_failing_seed_step_exits_1_then_fails_fast(
    database_url: str, db: DatabaseAdmin
) -> None:
    failing = ("run", "--app", "tests.apps.failing:gate")
    env = {"INITGATE_MAX_ATTEMPTS": "1"}

    first = initgate(*failing, database_url=database_url, env=env)
    second = initgate(*failing, database_url=database_url, env=env)

    assert first.returncode == 1, first.stderr
    assert "unit price table is missing" in assert_one_error_line(first)
    assert second.returncode == 1, second.stderr
    assert "not trying again" in assert_one_error_line(second)
    assert await count_runs(db) == ["failed"]


async def test_database_ahead_of_the_code_exits_5(
    database_url: str, db: DatabaseAdmin
) -> None:
    await db.execute(
        "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
        "INSERT INTO alembic_version VALUES ('9999_from_the_future')"
    )

    result = initgate("run", database_url=database_url)

    assert result.returncode == 5, result.stderr
    assert "9999_from_the_future" in assert_one_error_line(result)


@pytest.mark.parametrize("command", ["run", "history"])
@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://initgate:{CANARY}@127.0.0.1:5432",
        f"mysql://initgate:{CANARY}@127.0.0.1:5432/app",
        f"postgresql://initgate:{CANARY}@127.0.0.1:notaport/app",
    ],
    ids=["no-database", "not-postgres", "bad-port"],
)
def test_bad_database_url_exits_2_without_showing_the_password(
    command: str, url: str
) -> None:
    result = initgate(command, database_url=url, timeout=60)

    assert result.returncode == 2, result.stderr
    assert_one_error_line(result)


def test_missing_database_url_exits_2_naming_the_variable() -> None:
    result = initgate("run", timeout=60)

    assert result.returncode == 2, result.stderr
    assert "DATABASE_URL" in assert_one_error_line(result)


async def test_unknown_role_exits_2_without_showing_the_password(
    database_url: str,
) -> None:
    url = with_credentials(database_url, "nobody_here", CANARY)

    result = initgate("run", database_url=url, env={"INITGATE_CONNECT_TIMEOUT": "5"})

    assert result.returncode == 2, result.stderr
    assert "nobody_here" in assert_one_error_line(result)


def test_unreachable_database_exits_4_within_the_connect_timeout() -> None:
    url = f"postgresql://initgate:{CANARY}@127.0.0.1:{free_port()}/app"
    started = time.monotonic()

    result = initgate(
        "run", database_url=url, env={"INITGATE_CONNECT_TIMEOUT": "1"}, timeout=60
    )

    # Most of the time is the interpreter importing the app, not waiting.
    assert time.monotonic() - started < 20
    assert result.returncode == 4, result.stderr
    assert "could not connect" in assert_one_error_line(result)


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("app.main", "expected MODULE:ATTRIBUTE"),
        ("app.no_such_module:gate", "no module 'app.no_such_module'"),
        ("app.main:no_such_gate", "no attribute 'no_such_gate'"),
        ("app.main:app", "expected an initgate.InitGate, got FastAPI"),
    ],
)
def test_bad_app_exits_2_saying_what_is_wrong(app: str, expected: str) -> None:
    url = "postgresql://initgate@127.0.0.1:5432/app"

    result = initgate("run", "--app", app, database_url=url, timeout=60)

    assert result.returncode == 2, result.stderr
    assert expected in assert_one_error_line(result)


def test_usage_error_exits_2_in_one_line() -> None:
    result = initgate("run", "--no-such-option", timeout=60)

    assert result.returncode == 2, result.stderr
    assert "--no-such-option" in assert_one_error_line(result)


def test_no_arguments_shows_the_commands() -> None:
    result = initgate(timeout=60)

    assert result.returncode == 0, result.stderr
    for command in ("run", "history", "demo"):
        assert re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE)


def test_run_help_documents_every_exit_code() -> None:
    result = initgate("run", "--help", env={"COLUMNS": "200"}, timeout=60)

    assert result.returncode == 0, result.stderr
    for code in ("0", "1", "2", "3", "4", "5"):
        assert re.search(rf"\b{code}\b", result.stdout.split("Exit codes")[1])


def test_help_imports_neither_the_database_stack_nor_the_web_stack() -> None:
    # The libraries that cost a process over a second of CPU before it has
    # done anything: only the commands that talk to the database load them.
    # (pydantic is not among them: typer itself imports it.)
    heavy = ["alembic", "asyncpg", "fastapi", "httpx", "sqlalchemy"]
    script = (
        "import sys\n"
        "from initgate.cli import main\n"
        "try:\n"
        "    main(['status', '--help'])\n"
        "except SystemExit:\n"
        f"    print([name for name in {heavy!r} if name in sys.modules])\n"
    )

    result = run_python("-c", script, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


# -- initgate history ---------------------------------------------------------


def test_history_offers_every_run_status_as_a_choice(database_url: str) -> None:
    result = initgate("history", "--help", database_url=database_url)

    assert result.returncode == 0, result.stderr
    for status in RunStatus:
        assert status.value in result.stdout, status


async def test_history_json_lists_the_run_with_its_steps(database_url: str) -> None:
    assert initgate("run", database_url=database_url).returncode == 0

    result = initgate("history", "--json", database_url=database_url)

    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert len(runs) == 1
    run = runs[0]
    assert run["status"] == "succeeded"
    assert run["revision_from"] is None
    assert run["revision_to"] == "0004_countries_name_index"
    assert dt.datetime.fromisoformat(run["finished_at"]) >= dt.datetime.fromisoformat(
        run["started_at"]
    )
    kinds = [(step["kind"], step["name"]) for step in run["steps"]]
    assert kinds == [
        ("migration", "0001_countries"),
        ("migration", "0002_currencies"),
        ("migration", "0003_languages"),
        ("migration", "0004_countries_name_index"),
        ("seed", "countries"),
        ("seed", "currencies"),
        ("seed", "languages"),
    ]


async def test_history_table_has_one_row_per_run(database_url: str) -> None:
    assert initgate("run", database_url=database_url).returncode == 0

    result = initgate("history", database_url=database_url)

    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^1\s+succeeded\s.*$", result.stdout, re.MULTILINE)
    assert len(rows) == 1, result.stdout
    assert "none -> 0004_countries_name_index" in rows[0]
    assert "4 migrations, 3 seeds" in rows[0]


async def test_history_filters_by_status(database_url: str) -> None:
    assert initgate("run", database_url=database_url).returncode == 0

    result = initgate(
        "history", "--status", "failed", "--json", database_url=database_url
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_history_of_a_database_without_ledger_says_so(database_url: str) -> None:
    table = initgate("history", "--database-url", database_url)
    as_json = initgate("history", "--json", "--database-url", database_url)

    assert table.returncode == 0, table.stderr
    assert "No init history" in table.stdout
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == []


def test_history_with_a_bad_schema_exits_2_naming_the_setting() -> None:
    url = "postgresql://initgate@127.0.0.1:5432/app"

    result = initgate("history", "--schema", "no-such;schema", database_url=url)

    assert result.returncode == 2, result.stderr
    assert "INITGATE_SCHEMA: expected a plain SQL identifier" in (
        assert_one_error_line(result)
    )


# -- initgate demo ------------------------------------------------------------


async def test_demo_once_with_two_workers_runs_init_exactly_once(
    database_url: str, db: DatabaseAdmin, tmp_path: Path
) -> None:
    result = initgate(
        "demo",
        "--once",
        "--workers",
        "2",
        "--database-url",
        database_url,
        "--port",
        str(free_port()),
        "--data-dir",
        str(tmp_path / "demo"),
        timeout=150,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(
        r"^\d+\s+(?:succeeded|failed|running|abandoned)\s", result.stdout, re.MULTILINE
    )
    assert len(rows) == 1, result.stdout
    assert "1 worker ran init (run 1: 4 revisions, 3 seed steps)" in result.stdout
    assert "1 waited for it" in result.stdout or "1 found init" in result.stdout
    assert 'GET /countries/DE -> 200 {"alpha_2": "DE"' in result.stdout
    assert "Stopped the demo service." in result.stdout
    assert await count_runs(db) == ["succeeded"]
    log = (tmp_path / "demo" / "uvicorn.log").read_text()
    assert log.count("Application startup complete.") == 2


async def test_demo_reports_a_worker_that_cannot_pass_the_gate_in_one_line(
    database_url: str, db: DatabaseAdmin, tmp_path: Path
) -> None:
    await db.execute(
        "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
        "INSERT INTO alembic_version VALUES ('9999_from_the_future')"
    )

    result = initgate(
        "demo",
        "--once",
        "--workers",
        "2",
        "--database-url",
        database_url,
        "--port",
        str(free_port()),
        "--data-dir",
        str(tmp_path / "demo"),
        timeout=150,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    line = assert_one_error_line(result)
    assert "a worker did not pass the gate" in line
    assert "9999_from_the_future" in line
    assert "Stopped the demo service." in result.stdout
