"""What the drills share: the drill project, results, events and lock probes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from initgate.lock import CLASSID
from tests.drills.servers import DRILL_ROLE, DrillPostgres
from tests.helpers import DatabaseAdmin, DdlLog, Herd, with_database
from tests.project import Project, Revision

__all__ = [
    "AGENT",
    "DRILL_ENVIRON",
    "SEEDS",
    "DrillResults",
    "Events",
    "agent_env",
    "agent_reports",
    "drill_project",
    "fresh_database",
    "lock_holders",
    "role_database",
    "round_rounds",
    "seed_executions",
    "summary",
]

AGENT = "from tests.drills.agent import main\nmain()\n"
"""Herd code for one gate run (see :mod:`tests.drills.agent`)."""

# initgate.lifespan rather than initgate: the package imports its modules on
# first use, so preloading it alone would leave the heavy imports until after
# the release, staggering a herd meant to start at one instant.
PRELOAD = ["asyncpg", "initgate.lifespan", "sqlalchemy.ext.asyncio", "alembic.command"]
"""Imported before a herd is released, so that import time stays out of it."""

SEEDS = ("first", "last")
"""Seed steps of every drill; ``last`` is the one ``before_succeeded`` follows."""

HEAD = "r3_tags"

_ENV_PY = """
from alembic import context

from tests.drills.agent import checkpoint

connection = context.config.attributes["connection"]
# The run row is committed before Alembic gets here.
checkpoint("after_running_row")
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
"""

_R2_BODY = """
from tests.drills.agent import checkpoint

checkpoint("between_migrations")
op.execute("CREATE TABLE first_half (id int)")
# Sleeps until the drill creates `resume`: a holder killed in here dies
# mid-statement; whoever takes over finds `resume` and runs straight on.
op.execute(
    "SELECT pg_sleep(CASE WHEN to_regclass('resume') IS NULL THEN 60 ELSE 0 END)"
)
op.execute("CREATE TABLE second_half (id int)")
"""


def drill_project(root: Path) -> Project:
    """Three revisions (the second may stop or sleep) and a checkpointed env.py."""
    project = Project(root)
    (root / "env.py").write_text(_ENV_PY)
    project.add(
        Revision.sql(
            "r1_items",
            "CREATE TABLE items (id int PRIMARY KEY)",
            "CREATE TABLE drill_seeded (name text NOT NULL, pid int NOT NULL)",
            doc="items and the seed effects table",
        )
    )
    project.add(Revision("r2_halves", _R2_BODY, doc="two halves around a sleep"))
    project.add(Revision.sql("r3_tags", "CREATE TABLE tags (id int)", doc="tags"))
    return project


def agent_env(
    url: str,
    project: Project | None,
    workdir: Path,
    **settings: object,
) -> dict[str, str]:
    """Environment for agent processes: the gate's settings and the drill's files.

    ``settings`` become ``INITGATE_<NAME>`` variables.
    """
    env = {
        "INITGATE_DATABASE_URL": url,
        "INITGATE_ALEMBIC_CONFIG": str(project.ini) if project else "",
        "DRILL_SEEDS": ",".join(SEEDS),
        "DRILL_TRACE": str(workdir / "seeds.trace"),
    }
    for name, value in settings.items():
        env[f"INITGATE_{name.upper()}"] = str(value)
    return env


def agent_reports(herd: Herd, timeout: float) -> list[dict[str, Any]]:
    """Wait for every agent of ``herd``; the JSON report each printed last.

    Fails the test, showing the process, if an agent printed nothing.
    """
    reports = []
    for result in herd.wait_all(timeout=timeout):
        lines = result.stdout.strip().splitlines()
        assert lines, result.describe()
        reports.append(json.loads(lines[-1]))
    return reports


def seed_executions(trace: Path) -> Counter[str]:
    """How often each seed body ran (committed or not), from the trace file."""
    if not trace.exists():
        return Counter()
    return Counter(line.split()[0] for line in trace.read_text().splitlines() if line)


# -- databases and the lock ---------------------------------------------------


async def role_database(server: DrillPostgres) -> tuple[str, str]:
    """Create the drill role and a fresh database it owns.

    Returns:
        The database's name, and the URL that logs in to it as the role.
    """
    await server.create_role()
    name = await fresh_database(server.admin_url, owner=DRILL_ROLE)
    return name, server.role_url(name)


async def fresh_database(admin_url: str, *, owner: str | None = None) -> str:
    """Create an empty database with the DDL log installed; return its name."""
    name = f"d_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        owned = f' OWNER "{owner}"' if owner else ""
        await conn.execute(f'CREATE DATABASE "{name}"{owned}')
    finally:
        await conn.close()
    admin = DatabaseAdmin(with_database(admin_url, name))
    await DdlLog(admin).install()
    # The event trigger runs as whoever ran the DDL: a gate logged in as a
    # plain role must be able to write the log too.
    await admin.execute("GRANT INSERT ON public.test_ddl_log TO PUBLIC")
    return name


async def drop_database(admin_url: str, name: str) -> None:
    """Drop a database, whoever is still connected to it."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def lock_holders(conn: Any) -> list[int]:
    """Backend pids holding an initgate session lock in this database."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND objsubid = 2 AND classid::bigint = $1 AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())",
        CLASSID,
    )
    return [r["pid"] for r in rows]


async def wait_for(
    check: Callable[[], Any], timeout: float, what: str, interval: float = 0.01
) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


# -- events written by agents ------------------------------------------------


class Events:
    """The JSON-lines event file of one or more agent processes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        """Every event so far (a line still being written is skipped)."""
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def find(self, event: str, contains: str = "") -> list[dict[str, Any]]:
        """Events of one kind whose message (if any) contains ``contains``."""
        return [
            e
            for e in self.all()
            if e["event"] == event and contains in e.get("msg", e.get("at", ""))
        ]


# -- results -------------------------------------------------------------------


class DrillResults:
    """Appends one JSON line per drill round, for ``tests.drills.report``.

    The file is ``$INITGATE_DRILL_RESULTS``, else
    ``tests/drills/results/latest.jsonl`` (emptied when a session starts).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, drill: str, **figures: Any) -> None:
        """Record one round (or one whole drill) of ``drill``."""
        line = {"drill": drill, "at": time.time(), **figures}
        with open(self.path, "a") as out:
            out.write(json.dumps(line, default=str) + "\n")


# Read at import, during collection: the session's clean_environment fixture
# removes every INITGATE_* variable but INITGATE_TEST_* before tests run.
DRILL_ENVIRON = {k: v for k, v in os.environ.items() if k.startswith("INITGATE_DRILL_")}


def round_rounds(variable: str, default: int) -> int:
    """A round count from ``INITGATE_DRILL_*`` in the environment, at least 1."""
    return max(1, int(DRILL_ENVIRON.get(variable, default)))


@dataclasses.dataclass(frozen=True)
class Summary:
    """Median and max of a list of seconds, for messages."""

    median: float
    maximum: float

    def __str__(self) -> str:
        return f"median {self.median:.2f} s, max {self.maximum:.2f} s"


def summary(values: list[float]) -> Summary:
    """Median and max of ``values`` (which must not be empty)."""
    return Summary(statistics.median(values), max(values))
