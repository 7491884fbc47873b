"""Create languages (ISO 639-3, with the ISO 639-1 code where there is one).

Revision ID: 0003_languages
Revises: 0002_currencies
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_languages"
down_revision = "0002_currencies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "languages",
        sa.Column("alpha_3", sa.String(3), nullable=False),
        # Most of the 8,000 languages have no two-letter code; a unique
        # constraint still allows any number of NULLs in PostgreSQL.
        sa.Column("alpha_2", sa.String(2), nullable=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("alpha_3", name="pk_languages"),
        sa.UniqueConstraint("alpha_2", name="uq_languages_alpha_2"),
    )


def downgrade() -> None:
    op.drop_table("languages")
