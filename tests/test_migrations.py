"""The demo's migrations: ``alembic`` on its own, and the gate after it."""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import pytest

from initgate import Outcome
from initgate.lifespan import InitGate
from initgate.migrate import Migrations
from initgate.settings import Settings
from tests.helpers import REPO_ROOT, DatabaseAdmin, DdlLog, run_python
from tests.project import Project


def alembic(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(
        "-m", "alembic", *args, env={**os.environ, "DATABASE_URL": database_url}
    )


async def test_alembic_upgrade_head_works_on_its_own(
    database_url: str, db: DatabaseAdmin, ddl_log: DdlLog
) -> None:
    done = alembic(database_url, "upgrade", "head")

    assert done.returncode == 0, done.stderr
    assert await db.fetchval("SELECT version_num FROM alembic_version") == (
        "0004_countries_name_index"
    )
    assert await ddl_log.count("CREATE TABLE", "countries") == 1
    assert await db.fetchval("SELECT to_regclass('init_runs')") is None


async def test_gate_after_a_manual_upgrade_only_seeds(
    database_url: str,
    db: DatabaseAdmin,
    ddl_log: DdlLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert alembic(database_url, "upgrade", "head").returncode == 0
    gate = InitGate(
        Settings(database_url=database_url, alembic_config=REPO_ROOT / "alembic.ini")
    )
    # The demo's steps, registered on a gate of this test's own: the demo
    # module builds its gate from DATABASE_URL at import.
    monkeypatch.setenv("DATABASE_URL", database_url)
    demo_seeds = importlib.import_module("app.seeds")

    for step in demo_seeds.gate.seeds:
        gate.seeds.add(step.name, step.version, step.function)

    result = await gate.run()

    assert result.outcome is Outcome.RAN
    assert result.migrated == ()
    assert len(result.seeded) == 3
    assert await ddl_log.count("CREATE TABLE", "countries") == 1
    assert await db.fetchval("SELECT count(*) FROM countries") > 200


def test_offline_sql_needs_no_database() -> None:
    done = alembic("postgresql://nobody@127.0.0.1:1/none", "upgrade", "head", "--sql")

    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE countries" in done.stdout
    assert "CREATE INDEX CONCURRENTLY" in done.stdout


def test_plan_of_the_demo_prints_its_sql_and_no_alembic_log_lines(
    database_url: str,
) -> None:
    done = run_python(
        "-m", "initgate", "plan", env={**os.environ, "DATABASE_URL": database_url}
    )

    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE countries" in done.stdout
    assert "INFO" not in done.stderr, done.stderr


BRANCHES = {
    # Two branches from a base, merged, then a third branch left open.
    "a0": None,
    "b1": "a0",
    "c1": "a0",
    "m2": ("b1", "c1"),
    "d3": "m2",
    "e3": "m2",
}


def test_heads_from_source_agree_with_alembic(tmp_path: Path) -> None:
    project = Project(tmp_path / "p")
    for revision, down in BRANCHES.items():
        (project.versions / f"{revision}.py").write_text(
            f"revision: str = {revision!r}\n"
            f"down_revision: str | tuple[str, ...] | None = {down!r}\n"
            f"depends_on = {'a0' if revision == 'e3' else None!r}\n"
            "def upgrade():\n    pass\n"
        )
    (project.versions / "__init__.py").write_text("revision = 'not one'\n")

    for ini in (project.ini, REPO_ROOT / "alembic.ini"):
        migrations = Migrations(ini)
        expected = tuple(sorted(migrations.script.get_heads()))
        assert migrations._heads_from_source() == expected, ini
    assert Migrations(project.ini)._heads_from_source() == ("d3", "e3")
