"""Create countries (ISO 3166-1).

Revision ID: 0001_countries
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_countries"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "countries",
        sa.Column("alpha_2", sa.String(2), nullable=False),
        sa.Column("alpha_3", sa.String(3), nullable=False),
        # Text, not an integer: numeric codes keep their leading zeros ("004").
        sa.Column("numeric", sa.String(3), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("official_name", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("alpha_2", name="pk_countries"),
        sa.UniqueConstraint("alpha_3", name="uq_countries_alpha_3"),
        sa.UniqueConstraint("numeric", name="uq_countries_numeric"),
    )


def downgrade() -> None:
    op.drop_table("countries")
