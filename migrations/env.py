"""Alembic environment: run by the init gate, or by ``alembic`` on its own.

Three ways in:

* The gate calls Alembic with ``config.attributes["connection"]`` set to the
  sync connection that holds its lock (an ``AsyncConnection`` seen through
  ``run_sync``). Migrations must run on that very connection: then they stop
  when the holder dies, and nothing else can migrate meanwhile.
* ``alembic upgrade head`` from the repository root connects by itself, to
  ``DATABASE_URL``, with asyncpg like the service.
* ``alembic upgrade head --sql`` prints the SQL and connects to nothing.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from app.db import metadata
from initgate import async_database_url

config = context.config


def run_migrations(connection: Connection) -> None:
    """Run the migrations on a sync connection that is not in a transaction."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # One transaction per revision, not one for the whole upgrade: 0004
        # builds an index CONCURRENTLY, which cannot run in a transaction, so
        # its autocommit block commits whatever came before it anyway.
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_standalone() -> None:
    """Connect to ``DATABASE_URL`` and run the migrations there."""
    # NullPool: one connection for one upgrade, closed with it.
    engine = create_async_engine(async_database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    """Print the migrations' SQL; only the dialect is needed, not a database."""
    context.configure(
        dialect_name="postgresql",
        literal_binds=True,
        target_metadata=metadata,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


given = config.attributes.get("connection")
if given is not None:
    # No fileConfig here: it would replace the logging set up by the service
    # (uvicorn's loggers, the gate's) with alembic.ini's.
    if not isinstance(given, Connection):
        raise TypeError(
            "config.attributes['connection'] must be a sync sqlalchemy "
            "Connection (from AsyncConnection.run_sync), got "
            f"{type(given).__name__}"
        )
    run_migrations(given)
else:
    # `initgate plan` sets configure_logger to False (Alembic's cookbook
    # flag for env.py run from code) to keep its own output.
    if config.config_file_name is not None and config.attributes.get(
        "configure_logger", True
    ):
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():
        run_migrations_offline()
    else:
        # asyncio.run needs a thread with no running loop; async code calls
        # Alembic with a connection instead (the first branch).
        asyncio.run(run_migrations_standalone())
