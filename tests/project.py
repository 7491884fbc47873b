"""Throwaway Alembic projects for tests that need their own revisions.

A project is a directory with ``alembic.ini``, an ``env.py`` written the way
the README recommends (it uses the connection the gate hands in), and one file
per revision whose ``upgrade()`` runs the SQL given here.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

from initgate import InitGate, Settings

__all__ = ["Project", "Revision", "make_gate"]

_ENV_PY = """
from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("this test project only runs behind the gate")
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
"""

# env.py "written the usual way": it builds its own engine from a URL and
# ignores any connection handed in. Still works behind the gate, with a
# WARNING, because it migrates outside the lock's session.
_ENV_PY_OWN_ENGINE = """
import os
from alembic import context
from sqlalchemy import create_engine, pool

url = os.environ["TEST_PROJECT_SYNC_URL"]
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
"""

_REVISION = '''
"""{doc}"""
from alembic import op
import sqlalchemy as sa

revision = {revision!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{body}


def downgrade() -> None:
    pass
'''


@dataclasses.dataclass(frozen=True)
class Revision:
    """One revision: its id and the body of its ``upgrade()``.

    ``body`` is Python; ``Revision.sql`` builds a body of plain statements.
    """

    revision: str
    body: str
    doc: str = "test revision"

    @classmethod
    def sql(cls, revision: str, *statements: str, doc: str = "") -> Revision:
        """A revision running each statement with ``op.execute``."""
        body = "\n".join(f"op.execute({s!r})" for s in statements) or "pass"
        return cls(revision, body, doc or f"runs {len(statements)} statements")


class Project:
    """An Alembic project in ``root``; revisions form one linear chain."""

    def __init__(self, root: Path, *, own_engine: bool = False) -> None:
        self.root = root
        self.versions = root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        (root / "env.py").write_text(_ENV_PY_OWN_ENGINE if own_engine else _ENV_PY)
        (root / "script.py.mako").write_text("")
        self.ini = root / "alembic.ini"
        self.ini.write_text(f"[alembic]\nscript_location = {root}\n")
        self.head: str | None = None

    def add(self, revision: Revision) -> Project:
        """Append a revision on top of the current head."""
        body = textwrap.indent(revision.body, "    ")
        text = _REVISION.format(
            doc=revision.doc, revision=revision.revision, down=self.head, body=body
        )
        (self.versions / f"{revision.revision}.py").write_text(text)
        self.head = revision.revision
        return self


def make_gate(
    database_url: str,
    project: Project | Path | None,
    **settings: Any,
) -> InitGate:
    """An InitGate on ``database_url`` for ``project`` (None: seed steps only)."""
    if isinstance(project, Project):
        config: Path | None = project.ini
    else:
        config = project
    return InitGate(
        Settings(database_url=database_url, alembic_config=config, **settings)
    )
