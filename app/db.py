"""The service's tables and the engine its request handlers use.

The tables are declared once here, as SQLAlchemy Core, and used three ways: by
the seed steps to insert, by the endpoints to query, and by ``alembic revision
--autogenerate`` to compare against the migrations in ``migrations/versions``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from initgate import async_database_url

__all__ = [
    "Database",
    "countries",
    "currencies",
    "database",
    "languages",
    "metadata",
]

# Fixed constraint names, so that a migration can drop or alter a constraint by
# name and autogenerate compares like with like.
metadata = sa.MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    }
)

# ISO 3166-1. Numeric codes are text: "004" (Afghanistan) keeps its zeros.
countries = sa.Table(
    "countries",
    metadata,
    sa.Column("alpha_2", sa.String(2), primary_key=True),
    sa.Column("alpha_3", sa.String(3), nullable=False, unique=True),
    sa.Column("numeric", sa.String(3), nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("official_name", sa.Text),
    # Built CONCURRENTLY by revision 0004; it serves the name-ordered listing.
    sa.Index(None, "name"),
)

# ISO 4217.
currencies = sa.Table(
    "currencies",
    metadata,
    sa.Column("alpha_3", sa.String(3), primary_key=True),
    sa.Column("numeric", sa.String(3), nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
)

# ISO 639-3; only the major languages also have a two-letter ISO 639-1 code.
languages = sa.Table(
    "languages",
    metadata,
    sa.Column("alpha_3", sa.String(3), primary_key=True),
    sa.Column("alpha_2", sa.String(2), unique=True),
    sa.Column("name", sa.Text, nullable=False),
)


class Database:
    """Holds the service's engine from the app's startup to its shutdown.

    The engine is built in :meth:`lifespan` rather than at import: asyncpg
    connections belong to the event loop that opened them, and each uvicorn
    worker process runs its own loop, so each needs a pool of its own.
    """

    def __init__(self) -> None:
        self._engine: AsyncEngine | None = None

    @property
    def engine(self) -> AsyncEngine:
        """The engine; only between the start and the end of :meth:`lifespan`.

        Raises:
            RuntimeError: The app's lifespan has not started, or has ended.
        """
        if self._engine is None:
            raise RuntimeError(
                "the database engine is used outside the app's lifespan; "
                "start the app with its lifespan (uvicorn does), or enter "
                "Database.lifespan first"
            )
        return self._engine

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Create the engine, and dispose of it when the app stops.

        Args:
            app: The application; unused, accepted so that this is a
                Starlette lifespan.

        Raises:
            ConfigurationError: No database URL is set, or it is invalid.
        """
        # Small pools: the demo runs 3 replicas of 4 workers each, and 12 pools
        # of SQLAlchemy's default 5 + 10 would outgrow PostgreSQL's default
        # max_connections of 100.
        self._engine = create_async_engine(
            async_database_url(), pool_size=2, max_overflow=3, pool_pre_ping=True
        )
        try:
            yield
        finally:
            engine, self._engine = self._engine, None
            await engine.dispose()

    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """Yield a pooled connection: a FastAPI dependency for the endpoints."""
        async with self.engine.connect() as connection:
            yield connection


database = Database()
"""The one holder of the service, shared by the app and its endpoints."""
