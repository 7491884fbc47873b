"""The operator commands as real processes: status, plan, check, show, retry, prune.

Each test puts this test's database in one state (empty, up to date, a
revision pending, a run in progress held by another process, the last run
failed) and runs ``python -m initgate`` against it, on a throwaway Alembic
project and the app in ``tests/apps/ops.py``. JSON output is parsed, not
grepped. The database URL carries a canary password (the test servers trust
local connections, so it is never checked): no output may contain it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import hashlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import make_url

from initgate.lock import LockKey
from tests.helpers import REPO_ROOT, DatabaseAdmin
from tests.project import Project, Revision

CANARY = "canary-Ops-7c1f0e"
"""The test role's password in every URL given; it must never be printed."""

ITEMS = Revision.sql(
    "r1_items",
    "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)",
    doc="create items",
)
TAGS = Revision.sql("r2_tags", "CREATE TABLE tags (id int PRIMARY KEY)")
SLOW = Revision.sql("r2_slow", "SELECT pg_sleep(60)", doc="sleeps a minute")

# env.py as the README recommends, plus Alembic's offline mode for `plan`.
ENV_PY = """
from alembic import context

connection = context.config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(
        dialect_name="postgresql", literal_binds=True, transaction_per_migration=True
    )
    with context.begin_transaction():
        context.run_migrations()
elif connection is None:
    raise RuntimeError("this test project only runs behind the gate")
else:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
"""


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished ``initgate`` process."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def error_line(self) -> str:
        """The single stderr line of a failed command."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("initgate: "), self.stderr
        return lines[0]


@dataclasses.dataclass
class Cli:
    """Runs ``python -m initgate`` against this test's database and project."""

    url: str
    env: dict[str, str]

    def environment(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
        )
        environment.update(self.env)
        environment.update(extra or {})
        return environment

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> Result:
        done = subprocess.run(
            [sys.executable, "-m", "initgate", *args],
            cwd=REPO_ROOT,
            env=self.environment(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        result = Result(args, done.returncode, done.stdout, done.stderr)
        assert CANARY not in result.stdout + result.stderr, result
        assert "Traceback" not in result.stderr, result.stderr
        return result

    @contextlib.contextmanager
    def background(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> Iterator[subprocess.Popen[str]]:
        """Start ``initgate ARGS`` in its own process group; kill it after."""
        process = subprocess.Popen(
            [sys.executable, "-m", "initgate", *args],
            cwd=REPO_ROOT,
            env=self.environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate(timeout=30)
            assert CANARY not in out + err


@pytest.fixture
def project(tmp_path: Path) -> Project:
    project = Project(tmp_path / "project").add(ITEMS)
    (project.root / "env.py").write_text(ENV_PY)
    return project


@pytest.fixture
def cli(database_url: str, project: Project) -> Cli:
    url = make_url(database_url).set(password=CANARY)
    return Cli(
        url.render_as_string(hide_password=False),
        {
            "DATABASE_URL": url.render_as_string(hide_password=False),
            "INITGATE_ALEMBIC_CONFIG": str(project.ini),
            "INITGATE_APP": "tests.apps.ops:gate",
        },
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def findings(result: Result) -> dict[str, tuple[str, str]]:
    """``check --json`` as {check: (level, message)}; one finding per check."""
    document = result.json()
    found: dict[str, tuple[str, str]] = {}
    for item in document["findings"]:
        found.setdefault(item["check"], (item["level"], item["message"]))
    return found


async def wait_for(db: DatabaseAdmin, sql: str, timeout: float = 60) -> None:
    """Poll until ``sql`` returns true."""
    deadline = time.monotonic() + timeout
    while not await db.fetchval(sql):
        assert time.monotonic() < deadline, f"never true: {sql}"
        time.sleep(0.1)


# -- an empty database ----------------------------------------------------------


def test_status_of_an_empty_database_lists_everything_pending_and_exits_6(
    cli: Cli,
) -> None:
    as_json = cli("status", "--json")
    plain = cli("status")

    assert as_json.returncode == 6, as_json.stderr
    status = as_json.json()
    assert status["exit_code"] == 6
    assert status["up_to_date"] is False
    assert status["revisions"]["database"] == []
    assert status["revisions"]["heads"] == ["r1_items"]
    assert status["revisions"]["pending"] == [
        {"revision": "r1_items", "description": "create items"}
    ]
    assert status["seeds"]["pending"] == [{"name": "flags", "version": "1"}]
    assert (status["holder"], status["waiters"], status["last_run"]) == (None, [], None)
    assert status["ledger_version"] == 0
    assert "***" in status["database_url"]
    assert plain.returncode == 6
    assert "NOT at the code's target" in plain.stdout
    assert "1 pending: r1_items" in plain.stdout


async def test_plan_of_an_empty_database_renders_the_sql_without_running_it(
    cli: Cli, db: DatabaseAdmin
) -> None:
    result = cli("plan", "--json")

    assert result.returncode == 0, result.stderr
    plan = result.json()
    assert plan["revisions"] == [
        {"revision": "r1_items", "description": "create items"}
    ]
    assert plan["seeds"] == [{"name": "flags", "version": "1"}]
    assert "CREATE TABLE alembic_version" in plan["sql"]
    assert "CREATE TABLE items" in plan["sql"]
    assert await db.fetchval("SELECT to_regclass('alembic_version')") is None
    assert await db.fetchval("SELECT to_regclass('items')") is None


def test_check_of_an_empty_database_finds_nothing_wrong(cli: Cli) -> None:
    as_json = cli("check", "--json")
    plain = cli("check")

    assert as_json.returncode == 0, as_json.stdout
    found = findings(as_json)
    assert as_json.json()["ok"] is True
    for name in (
        "app",
        "database",
        "credentials",
        "server version",
        "alembic",
        "heads",
        "ledger privileges",
        "advisory locks",
        "changed revisions",
    ):
        assert found[name][0] in ("ok", "warn"), (name, found[name])
    assert "may create it in schema 'public'" in found["ledger privileges"][1]
    assert plain.returncode == 0
    lines = plain.stdout.strip().splitlines()
    assert len(lines) == len(as_json.json()["findings"])
    assert all(line.split()[0] in ("ok", "warn") for line in lines), plain.stdout


def test_history_show_retry_and_prune_of_an_empty_database(cli: Cli) -> None:
    history = cli("history", "--json")
    show = cli("show", "1")
    retry = cli("retry", "--json")
    prune = cli("prune", "--keep", "1", "--json")

    assert (history.returncode, history.json()) == (0, [])
    assert show.returncode == 2
    assert "there is no run 1" in show.error_line()
    assert retry.returncode == 0, retry.stderr
    assert retry.json()["run_id"] is None
    assert (prune.returncode, prune.json()["count"]) == (0, 0)


# -- up to date -----------------------------------------------------------------


def test_after_a_run_status_is_up_to_date_plan_empty_and_check_matches_files(
    cli: Cli,
) -> None:
    assert cli("run").returncode == 0

    status = cli("status", "--json")
    plan = cli("plan", "--json")
    plan_text = cli("plan")
    check = cli("check", "--json")

    assert status.returncode == 0, status.stdout
    document = status.json()
    assert document["up_to_date"] is True
    assert document["revisions"]["pending"] == []
    assert document["seeds"]["pending"] == []
    assert document["last_run"]["status"] == "succeeded"
    assert document["ledger_version"] == 2
    assert (plan.returncode, plan.json()["revisions"], plan.json()["seeds"]) == (
        0,
        [],
        [],
    )
    assert plan.json()["sql"] == ""
    assert plan_text.stdout.startswith("Nothing to do")
    assert check.returncode == 0, check.stdout
    assert findings(check)["changed revisions"] == (
        "ok",
        "1 applied revisions match their files",
    )


def test_show_lists_every_step_with_its_duration_and_checksum(
    cli: Cli, project: Project
) -> None:
    assert cli("run").returncode == 0

    as_json = cli("show", "1", "--json")
    plain = cli("show", "1")

    assert as_json.returncode == 0, as_json.stderr
    run = as_json.json()
    assert run["status"] == "succeeded"
    steps = [(s["kind"], s["name"], s["status"]) for s in run["steps"]]
    assert steps == [
        ("migration", "r1_items", "succeeded"),
        ("seed", "flags", "succeeded"),
    ]
    assert run["steps"][0]["checksum"] == sha256(project.versions / "r1_items.py")
    assert all(step["duration_ms"] >= 0 for step in run["steps"])
    assert plain.returncode == 0
    assert "run 1 of" in plain.stdout
    assert sha256(project.versions / "r1_items.py")[:12] in plain.stdout


async def test_check_says_which_role_cannot_log_in_or_create_the_ledger(
    cli: Cli, database_url: str, db: DatabaseAdmin
) -> None:
    role = f"ops_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        # Explicit, whatever the server's default (PostgreSQL 15+ already
        # grants PUBLIC no CREATE on schema public).
        await db.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        as_role = make_url(database_url).set(username=role, password=CANARY)
        nobody = make_url(database_url).set(username="nobody_here", password=CANARY)

        denied = cli(
            "check",
            "--json",
            env={"DATABASE_URL": as_role.render_as_string(hide_password=False)},
        )
        unknown = cli(
            "check",
            "--json",
            env={"DATABASE_URL": nobody.render_as_string(hide_password=False)},
        )
    finally:
        await db.execute(f"DROP OWNED BY {role}")
        await db.execute(f"DROP ROLE {role}")

    assert denied.returncode == 7, denied.stdout
    level, message = findings(denied)["ledger privileges"]
    assert level == "FAIL"
    assert "GRANT CREATE ON SCHEMA" in message
    assert findings(denied)["credentials"] == ("ok", f"logged in as role {role}")
    assert unknown.returncode == 7, unknown.stdout
    level, message = findings(unknown)["credentials"]
    assert level == "FAIL"
    assert "nobody_here" in message
    assert findings(unknown)["advisory locks"][0] == "skip"


# -- a revision pending ---------------------------------------------------------


def test_a_new_revision_is_pending_and_plan_shows_only_its_sql(
    cli: Cli, project: Project
) -> None:
    assert cli("run").returncode == 0
    project.add(TAGS)

    status = cli("status", "--json")
    plan = cli("plan", "--json")

    assert status.returncode == 6, status.stdout
    pending = status.json()["revisions"]["pending"]
    assert [p["revision"] for p in pending] == ["r2_tags"]
    assert status.json()["seeds"]["pending"] == []
    assert plan.returncode == 0, plan.stderr
    assert [r["revision"] for r in plan.json()["revisions"]] == ["r2_tags"]
    assert "CREATE TABLE tags" in plan.json()["sql"]
    assert "CREATE TABLE items" not in plan.json()["sql"]


def test_check_fails_on_a_revision_file_changed_after_it_was_applied(
    cli: Cli, project: Project
) -> None:
    assert cli("run").returncode == 0
    path = project.versions / "r1_items.py"
    path.write_text(path.read_text() + "\n# edited after it was applied\n")
    project.add(TAGS)

    check = cli("check", "--json")
    run = cli("run")

    assert check.returncode == 7, check.stdout
    assert check.json()["ok"] is False
    level, message = findings(check)["changed revisions"]
    assert level == "FAIL"
    assert "revision r1_items was applied by run 1" in message
    assert run.returncode == 0, run.stderr
    assert "revision r1_items was applied by run 1" in run.stderr
    assert run.stderr.startswith("WARNING")


async def test_a_database_ahead_of_the_code_exits_5_and_fails_check(
    cli: Cli, db: DatabaseAdmin
) -> None:
    assert cli("run").returncode == 0
    await db.execute("UPDATE alembic_version SET version_num = 'r9_future'")

    status = cli("status", "--json")
    check = cli("check", "--json")
    plan = cli("plan")

    assert status.returncode == 5, status.stdout
    assert status.json()["revisions"]["unknown"] == ["r9_future"]
    assert check.returncode == 7
    assert findings(check)["heads"][0] == "FAIL"
    assert plan.returncode == 5
    assert "r9_future" in plan.error_line()


# -- a run in progress, held by another process ---------------------------------


async def test_a_run_in_progress_shows_its_holder_and_waiter_and_blocks_retry(
    cli: Cli, project: Project, db: DatabaseAdmin
) -> None:
    project.add(SLOW)
    with (
        cli.background("run") as holder,
        contextlib.ExitStack() as stack,
    ):
        await wait_for(
            db,
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE 'SELECT pg_sleep(60)%'",
        )
        waiter = stack.enter_context(cli.background("run"))
        await wait_for(
            db,
            "SELECT count(*) = 2 FROM pg_stat_activity "
            "WHERE application_name LIKE 'initgate:%'",
        )

        status = cli("status", "--json")
        plain = cli("status")
        retry = cli("retry")
        prune = cli("prune", "--keep", "0", "--json")
        running = cli("history", "--status", "running", "--json")
        plan = cli("plan", "--json")

    assert status.returncode == 6, status.stdout
    document = status.json()
    session = document["holder"]["session"]
    assert document["holder"]["run"]["id"] == 1
    assert (session["hostname"], session["pid"]) == (socket.gethostname(), holder.pid)
    assert session["state"] == "active"
    assert "pg_sleep" in session["query"]
    assert [(w["hostname"], w["pid"]) for w in document["waiters"]] == [
        (socket.gethostname(), waiter.pid)
    ]
    assert f"pid {holder.pid}" in plain.stdout
    assert retry.returncode == 3
    assert "is held by run 1" in retry.error_line()
    assert prune.json()["count"] == 0
    assert [run["id"] for run in running.json()] == [1]
    # Each revision commits on its own: r1 is in, r2 is under way.
    assert [r["revision"] for r in plan.json()["revisions"]] == ["r2_slow"]
    statuses = [r["status"] for r in await db.fetch("SELECT status FROM init_runs")]
    assert statuses == ["running"]


async def test_run_on_a_terminal_shows_a_spinner_naming_the_holder(
    cli: Cli, project: Project, database_name: str, database_url: str
) -> None:
    assert cli("run").returncode == 0
    project.add(TAGS)
    namespace = f"{database_name}:public"
    key = LockKey.for_namespace(namespace)
    holder = await asyncpg.connect(
        database_url,
        server_settings={"application_name": f"initgate:{namespace}:web-9:4242"},
    )
    try:
        assert await holder.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", key.classid, key.objid
        )
        await holder.execute(
            "INSERT INTO init_runs (namespace, target, status, hostname, pid, "
            "backend_pid) VALUES ($1, 'next', 'running', 'web-9', 4242, "
            "pg_backend_pid())",
            namespace,
        )
        status = cli("status", "--json")
        code, screen = run_on_a_terminal(
            cli,
            "run",
            env={"INITGATE_WAIT_TIMEOUT": "4", "INITGATE_POLL_INTERVAL": "0.5"},
        )
    finally:
        await holder.close()

    assert status.json()["holder"]["run"]["hostname"] == "web-9"
    assert status.json()["holder"]["session"]["pid"] == 4242
    assert code == 3, screen
    assert "waiting for the init lock held by run 2 on web-9 pid 4242" in screen
    # What the holder's session is doing, in brackets that are not markup.
    assert "[idle]" in screen
    assert CANARY not in screen


def run_on_a_terminal(cli: Cli, *args: str, env: Mapping[str, str]) -> tuple[int, str]:
    """Run ``initgate ARGS`` with a pseudo-terminal as stdout and stderr."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "initgate", *args],
        cwd=REPO_ROOT,
        env=cli.environment({"TERM": "xterm", "COLUMNS": "200", **env}),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError as exc:  # EIO: the child closed the terminal.
                    if exc.errno != errno.EIO:
                        raise
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif process.poll() is not None:
                break
        code = process.wait(timeout=30)
    finally:
        os.close(leader)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return code, b"".join(chunks).decode(errors="replace")


# -- the last run failed ----------------------------------------------------------


async def test_after_a_failed_run_status_exits_1_and_retry_lifts_fail_fast(
    cli: Cli, db: DatabaseAdmin
) -> None:
    broken = {"OPS_SEED_FAIL": "1", "INITGATE_MAX_ATTEMPTS": "1"}
    assert cli("run", env=broken).returncode == 1
    second = cli("run", env=broken)
    assert second.returncode == 1
    assert "not trying again" in second.error_line()

    status = cli("status", "--json", env=broken)
    check = cli("check", "--json", env=broken)
    show = cli("show", "1", "--traceback")
    show_json = cli("show", "1", "--json")
    retry = cli("retry", "--json")
    again = cli("run", env=broken)
    retry_again = cli("retry")
    fixed = cli("run", env={"INITGATE_MAX_ATTEMPTS": "1"})
    after = cli("status", "--json")

    assert status.returncode == 1, status.stdout
    document = status.json()
    assert (document["failures"], document["fail_fast"]) == (1, True)
    assert document["last_run"]["status"] == "failed"
    assert "the flag list is missing" in document["last_run"]["error"]
    assert check.returncode == 0
    assert findings(check)["fail-fast"][0] == "warn"
    assert show.returncode == 0
    assert "Traceback (most recent call last)" in show.stdout
    assert "FileNotFoundError: the flag list is missing" in show.stdout
    assert "FileNotFoundError" in show_json.json()["traceback"]
    assert retry.returncode == 0, retry.stderr
    assert retry.json() == {
        "namespace": document["namespace"],
        "run_id": 2,
        "lifted": [1],
    }
    # After the retry the same code tries again (and fails again) ...
    assert again.returncode == 1
    assert "not trying again" not in again.error_line()
    assert "Recorded retry as run 4" in retry_again.stdout
    # ... and once the cause is fixed, it runs.
    assert fixed.returncode == 0, fixed.stderr
    assert after.returncode == 0
    statuses = [r["status"] for r in await db.fetch("SELECT status FROM init_runs")]
    assert statuses == ["failed", "retry", "failed", "retry", "succeeded"]


# -- history filters and retention ----------------------------------------------


async def test_history_filters_by_since_limit_and_status(
    cli: Cli, db: DatabaseAdmin
) -> None:
    assert cli("run").returncode == 0
    for age in (dt.timedelta(days=10), dt.timedelta(hours=5)):
        await db.execute(
            "INSERT INTO init_runs (namespace, target, status, hostname, pid, "
            "backend_pid, started_at, finished_at) SELECT namespace, target, "
            "'failed', hostname, pid, backend_pid, now() - $1::interval, "
            "now() - $1::interval FROM init_runs WHERE id = 1",
            age,
        )
    iso = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()

    def ids(*args: str) -> list[int]:
        result = cli("history", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [run["id"] for run in result.json()]

    assert ids("--since", "2h") == [1]
    assert ids("--since", iso) == [3, 1]
    assert ids("--status", "failed", "--limit", "1") == [3]
    bad = cli("history", "--since", "last tuesday")
    assert bad.returncode == 2
    assert "--since: expected a duration" in bad.error_line()


async def test_prune_dry_run_then_delete_never_touches_the_latest_success(
    cli: Cli, db: DatabaseAdmin
) -> None:
    assert cli("run").returncode == 0
    # Run 1 seeded; then a failure, an abandoned run, the latest success
    # (without steps), and a newer failure.
    for status in ("failed", "abandoned", "succeeded", "failed"):
        await db.execute(
            "INSERT INTO init_runs (namespace, target, status, hostname, pid, "
            "backend_pid, finished_at) SELECT namespace, target, $1, hostname, "
            "pid, backend_pid, now() FROM init_runs WHERE id = 1",
            status,
        )

    dry = cli("prune", "--keep", "1", "--dry-run", "--json")
    untouched = await db.fetchval("SELECT count(*) FROM init_runs")
    deleted = cli("prune", "--keep", "1")
    neither = cli("prune")
    bad_age = cli("prune", "--older-than", "soon")

    assert dry.returncode == 0, dry.stderr
    assert dry.json() == {"dry_run": True, "count": 2, "run_ids": [2, 3]}
    assert untouched == 5
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith("Deleted 2 runs of ")
    left = [r["id"] for r in await db.fetch("SELECT id FROM init_runs ORDER BY id")]
    assert left == [1, 4, 5]
    assert await db.fetchval("SELECT count(*) FROM init_steps WHERE run_id = 1") == 2
    assert neither.returncode == 2
    assert "--keep N, --older-than DURATION" in neither.error_line()
    assert bad_age.returncode == 2
    assert "--older-than: expected a duration" in bad_age.error_line()


# -- help and exit codes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("status", "6 when init is pending"),
        ("check", "7 if any finding is FAIL"),
    ],
)
def test_help_documents_the_commands_own_exit_code(
    cli: Cli, command: str, says: str
) -> None:
    result = cli(command, "--help", env={"COLUMNS": "200"})

    assert result.returncode == 0, result.stderr
    assert says in " ".join(result.stdout.split())
    assert "Exit codes" in result.stdout
