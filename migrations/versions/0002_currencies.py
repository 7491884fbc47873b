"""Create currencies (ISO 4217).

Revision ID: 0002_currencies
Revises: 0001_countries
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_currencies"
down_revision = "0001_countries"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "currencies",
        sa.Column("alpha_3", sa.String(3), nullable=False),
        sa.Column("numeric", sa.String(3), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("alpha_3", name="pk_currencies"),
        sa.UniqueConstraint("numeric", name="uq_currencies_numeric"),
    )


def downgrade() -> None:
    op.drop_table("currencies")
