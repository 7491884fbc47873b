"""The work every strategy does: an Alembic project the bench writes, and a seed.

The project is generated, so every strategy runs exactly the same revisions:

* ``revisions`` revisions creating ``tables`` tables (``t01`` ...) between
  them, each table with a primary key, a unique constraint and an index;
* with ``concurrent_index``, the middle revision also builds an index with
  ``CREATE INDEX CONCURRENTLY`` inside ``op.get_context().autocommit_block()``;
* ``env.py`` migrates on ``config.attributes["connection"]`` when it is given
  (initgate hands in the connection that holds its lock, and so do the
  re-implemented lock strategies) and otherwise connects by itself to
  ``BENCH_SQLALCHEMY_URL``, as a plain ``alembic upgrade head`` would.

Each revision's ``upgrade()`` and the seed append a line to the file named by
``BENCH_TRACE``: an application-level count of who ran what, rolled back or
not, to set beside the DDL that PostgreSQL logged as committed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "ROLLING_REVISION",
    "Workload",
    "add_rolling_revision",
    "seed_async",
    "seed_sync",
    "write_project",
]

ROLLING_REVISION = "r_rolling"
"""Revision id of the one revision a rolling deploy adds."""

_ENV_PY = '''\
"""Alembic environment of the bench workload (written by bench.workload)."""

import os

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config


def run(connection):
    # One transaction per revision: the concurrent index cannot run inside
    # one, and its autocommit block commits whatever came before anyway.
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


given = config.attributes.get("connection")
if given is not None:
    run(given)
else:
    engine = create_engine(os.environ["BENCH_SQLALCHEMY_URL"], poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run(connection)
    finally:
        engine.dispose()
'''

_REVISION = '''\
"""{doc}"""

import os

import sqlalchemy as sa
from alembic import op

revision = {revision!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def _trace():
    path = os.environ.get("BENCH_TRACE")
    if path:
        with open(path, "a") as trace:
            trace.write(f"{{revision}} {{os.getpid()}}\\n")


def upgrade():
    _trace()
{body}


def downgrade():
    pass
'''

_TABLE = """\
    op.create_table(
        {name!r},
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("code", sa.Text, nullable=False, unique=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("rank", sa.Integer, nullable=False, server_default="0"),
        sa.Column("payload", sa.JSON),
        sa.Column("created_at", sa.DateTime(timezone=True),
                  server_default=sa.func.now(), nullable=False),
    )
    op.create_index({index!r}, {name!r}, ["name", "rank"])
"""

_CONCURRENT_INDEX = """\
    with op.get_context().autocommit_block():
        op.create_index(
            "t01_rank_concurrently", "t01", ["rank"], postgresql_concurrently=True
        )
"""

_ROLLING_BODY = """\
    op.add_column("t01", sa.Column("note", sa.Text))
    with op.get_context().autocommit_block():
        op.create_index(
            "t01_note_concurrently", "t01", ["note"], postgresql_concurrently=True
        )
"""


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shape of the generated project and seed.

    Attributes:
        revisions: How many revisions, in one linear chain.
        tables: Tables created across them (at least one per revision).
        seed_rows: Rows the seed inserts into ``t01``.
        concurrent_index: Whether the middle revision builds an index with
            ``CREATE INDEX CONCURRENTLY``.
    """

    revisions: int = 20
    tables: int = 40
    seed_rows: int = 300
    concurrent_index: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.revisions <= self.tables:
            raise ValueError(
                f"expected 1 <= revisions <= tables, got {self.revisions} "
                f"revisions for {self.tables} tables"
            )

    @property
    def label(self) -> str:
        """One line describing it, for the report."""
        cic = ", one CREATE INDEX CONCURRENTLY" if self.concurrent_index else ""
        return (
            f"{self.revisions} revisions, {self.tables} tables with indexes{cic}, "
            f"seed of {self.seed_rows} rows"
        )

    @property
    def head(self) -> str:
        """The last revision's id."""
        return _revision_id(self.revisions)

    @property
    def first(self) -> str:
        """The first revision's id."""
        return _revision_id(1)


def _revision_id(number: int) -> str:
    return f"r{number:03d}"


def write_project(root: Path, workload: Workload) -> Path:
    """Write the Alembic project into ``root``; return its ``alembic.ini``."""
    versions = root / "versions"
    versions.mkdir(parents=True)
    (root / "env.py").write_text(_ENV_PY)
    (root / "script.py.mako").write_text("")
    ini = root / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {root}\n")

    # Tables are dealt out as evenly as the counts allow, earliest first.
    per_revision = [workload.tables // workload.revisions] * workload.revisions
    for extra in range(workload.tables % workload.revisions):
        per_revision[extra] += 1
    middle = (workload.revisions + 1) // 2
    table = 0
    for number, count in enumerate(per_revision, start=1):
        parts = []
        for _ in range(count):
            table += 1
            name = f"t{table:02d}"
            parts.append(_TABLE.format(name=name, index=f"{name}_name_rank_idx"))
        if workload.concurrent_index and number == middle:
            parts.append(_CONCURRENT_INDEX)
        _write_revision(
            versions,
            _revision_id(number),
            _revision_id(number - 1) if number > 1 else None,
            f"creates {count} tables",
            "".join(parts).rstrip("\n"),
        )
    return ini


def add_rolling_revision(root: Path, workload: Workload) -> None:
    """Add the rolling deploy's revision on top of the head.

    It adds a column to ``t01`` (the table old workers keep reading) and
    indexes it concurrently, as a careful online migration would.
    """
    _write_revision(
        root / "versions",
        ROLLING_REVISION,
        workload.head,
        "adds t01.note, indexed concurrently",
        _ROLLING_BODY.rstrip("\n"),
    )


def _write_revision(
    versions: Path, revision: str, down: str | None, doc: str, body: str
) -> None:
    text_ = _REVISION.format(doc=doc, revision=revision, down=down, body=body)
    (versions / f"{revision}.py").write_text(text_)


# -- the seed -----------------------------------------------------------------

_COUNT_SQL = "SELECT count(*) FROM t01"
_INSERT_SQL = "INSERT INTO t01 (code, name, rank) VALUES (:code, :name, :rank)"


def _rows(count: int) -> list[dict[str, Any]]:
    return [
        {"code": f"C{i:04d}", "name": f"reference item {i}", "rank": i % 17}
        for i in range(count)
    ]


def _trace_seed() -> None:
    path = os.environ.get("BENCH_TRACE")
    if path:
        with open(path, "a") as trace:
            trace.write(f"seed {os.getpid()}\n")


def seed_sync(conn: Connection, rows: int) -> None:
    """Insert the reference rows unless ``t01`` has some; commits.

    The check-then-insert is what a hand-written "seed once" usually does:
    safe under a lock, racy without one (``t01.code`` is unique, so a racing
    second seeder fails instead of duplicating rows).
    """
    with conn.begin():
        if conn.execute(text(_COUNT_SQL)).scalar_one() == 0:
            _trace_seed()
            conn.execute(text(_INSERT_SQL), _rows(rows))


async def seed_async(conn: AsyncConnection, rows: int) -> None:
    """The same seed for an initgate seed step (the gate owns the transaction)."""
    if (await conn.execute(text(_COUNT_SQL))).scalar_one() == 0:
        _trace_seed()
        await conn.execute(text(_INSERT_SQL), _rows(rows))
