"""Index countries by name, built CONCURRENTLY.

The index serves ``GET /countries``, which lists countries by name. It is
built the way one would on a live table: CONCURRENTLY, so writers are not
blocked while it builds. PostgreSQL refuses that inside a transaction, hence
the autocommit block. It is also a case an init gate has to get right: the
block commits mid-upgrade on the connection that holds the gate's lock, so
that lock has to be a session lock, not one that ends with the transaction.

Revision ID: 0004_countries_name_index
Revises: 0003_languages
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0004_countries_name_index"
down_revision = "0003_languages"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        # An index of this name can only be left over from an attempt that was
        # interrupted before its version row was committed (say, the worker
        # running it was killed). It may be INVALID, half-built; build anew.
        op.drop_index(
            "ix_countries_name",
            table_name="countries",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.create_index(
            "ix_countries_name",
            "countries",
            ["name"],
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_countries_name",
            table_name="countries",
            postgresql_concurrently=True,
            if_exists=True,
        )
