"""Helpers shared by the test suite: URLs, a counting proxy, processes, servers.

Nothing here knows about initgate itself. The fixtures in ``conftest.py`` wrap
these helpers so that tests get cleanup for free; tests may also use them
directly when a fixture's lifetime does not fit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import (
    SplitResult,
    parse_qsl,
    quote,
    unquote,
    urlsplit,
    urlunsplit,
)

import asyncpg

__all__ = [
    "MAX_SOCKET_DIR_LENGTH",
    "PG_ROOT_VARIABLE",
    "REPO_ROOT",
    "DatabaseAdmin",
    "DdlEntry",
    "DdlLog",
    "Herd",
    "ProcessResult",
    "ProxiedConnection",
    "RoundTripProxy",
    "SystemPostgres",
    "Upstream",
    "UvicornServer",
    "find_pg_bindir",
    "free_port",
    "live_processes_in_group",
    "short_temp_dir",
    "spawn_python",
    "start_uvicorn",
    "wait_for_http",
    "with_database",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Room for "/.s.PGSQL.NNNNN" after a socket directory: sun_path holds 108 bytes
# on Linux including the terminating NUL, so longer directories cannot serve.
MAX_SOCKET_DIR_LENGTH = 107 - len("/.s.PGSQL.65535")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the caller binds it; callers that
    start servers retry on "address in use" rather than trusting this.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def short_temp_dir(prefix: str) -> Path:
    """Create a fresh directory directly under /tmp.

    PostgreSQL puts its unix socket in such directories, and pytest's own
    temporary paths are often too long for a socket path.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- URLs -----------------------------------------------------------------


def with_database(url: str, database: str) -> str:
    """Return ``url`` pointing at ``database``, as a plain ``postgresql://`` URL.

    A driver suffix (``postgresql+asyncpg``) is dropped, an empty password is
    left out, and the query (for example ``host=/socket/dir``) is kept.
    """
    parts = urlsplit(url)
    return urlunsplit(
        ("postgresql", _netloc(parts), "/" + quote(database), parts.query, "")
    )


def _netloc(parts: SplitResult) -> str:
    credentials = ""
    if parts.username:
        credentials = quote(unquote(parts.username), safe="")
        if parts.password:
            credentials += ":" + quote(unquote(parts.password), safe="")
        credentials += "@"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{credentials}{host}{port}"


@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where a PostgreSQL server listens, and who to log in as."""

    user: str
    password: str | None
    unix_socket: str | None
    host: str | None
    port: int

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        """Read the address from a libpq-style URL (``?host=`` wins over netloc)."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "localhost"
        port = int(query.get("port") or parts.port or 5432)
        user = unquote(parts.username or query.get("user") or "postgres")
        password = unquote(parts.password) if parts.password else None
        if host.startswith("/"):
            return cls(user, password, f"{host}/.s.PGSQL.{port}", None, port)
        return cls(user, password, None, host, port)


# --- SQL against one database ---------------------------------------------


class DatabaseAdmin:
    """Runs SQL against one database, one short connection per call.

    A fresh connection each time keeps the test's own session out of the
    way of the code under test: no open transaction, no held lock, nothing
    left in ``pg_stat_activity`` between calls.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    async def execute(self, sql: str, *args: object) -> str:
        """Run ``sql`` and return the command status (``"CREATE TABLE"``)."""
        conn = await asyncpg.connect(self.url)
        try:
            status: str = await conn.execute(sql, *args)
            return status
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """Run ``sql`` and return all rows."""
        conn = await asyncpg.connect(self.url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        """Run ``sql`` and return the first row, or None."""
        conn = await asyncpg.connect(self.url)
        try:
            row: asyncpg.Record | None = await conn.fetchrow(sql, *args)
            return row
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run ``sql`` and return the first column of the first row."""
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()


# --- DDL log ----------------------------------------------------------------

DDL_LOG_TABLE = "test_ddl_log"

# The trigger function names its table with the schema so that code under
# test which changes search_path still logs into the same place. Rows are
# written inside the transaction of the DDL itself, so DDL that is rolled
# back leaves no row: the log holds applied DDL only.
_DDL_LOG_SETUP = f"""
CREATE TABLE public.{DDL_LOG_TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_tag text NOT NULL,
    object_type text,
    object_identity text,
    backend_pid integer NOT NULL,
    logged_at timestamptz NOT NULL
);

CREATE FUNCTION public.{DDL_LOG_TABLE}_record() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    command record;
BEGIN
    FOR command IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
        IF command.object_identity IS DISTINCT FROM 'public.{DDL_LOG_TABLE}' THEN
            INSERT INTO public.{DDL_LOG_TABLE}
                (command_tag, object_type, object_identity, backend_pid, logged_at)
            VALUES (
                command.command_tag,
                command.object_type,
                command.object_identity,
                pg_catalog.pg_backend_pid(),
                pg_catalog.clock_timestamp()
            );
        END IF;
    END LOOP;
END
$$;

CREATE EVENT TRIGGER {DDL_LOG_TABLE}_trigger ON ddl_command_end
    EXECUTE FUNCTION public.{DDL_LOG_TABLE}_record();
"""


@dataclasses.dataclass(frozen=True)
class DdlEntry:
    """One DDL command as the event trigger saw it."""

    command_tag: str
    object_type: str | None
    object_identity: str | None
    backend_pid: int
    logged_at: datetime.datetime


class DdlLog:
    """Reads what the ``ddl_command_end`` event trigger recorded.

    Object identities are spelled the way PostgreSQL prints them
    (``public.init_runs``); a name without a schema means ``public``.
    """

    def __init__(self, admin: DatabaseAdmin) -> None:
        self.admin = admin

    async def install(self) -> None:
        """Create the log table, its function and the event trigger.

        Raises:
            asyncpg.InsufficientPrivilegeError: the role is not a superuser.
        """
        await self.admin.execute(_DDL_LOG_SETUP)

    async def entries(self) -> list[DdlEntry]:
        """Return every logged command, oldest first."""
        rows = await self.admin.fetch(
            "SELECT command_tag, object_type, object_identity, backend_pid,"
            f" logged_at FROM public.{DDL_LOG_TABLE} ORDER BY id"
        )
        return [DdlEntry(**dict(row)) for row in rows]

    async def count(self, command_tag: str, identity: str | None = None) -> int:
        """Count logged commands with this tag, for one object or for any.

        Args:
            command_tag: As PostgreSQL reports it, e.g. ``"CREATE TABLE"``.
            identity: The object, e.g. ``"init_runs"`` or ``"app.items"``;
                None counts the tag for every object.
        """
        if identity is not None and "." not in identity:
            identity = f"public.{identity}"
        count: int = await self.admin.fetchval(
            f"SELECT count(*) FROM public.{DDL_LOG_TABLE}"
            " WHERE command_tag = $1 AND ($2::text IS NULL OR object_identity = $2)",
            command_tag,
            identity,
        )
        return count


# --- Round-trip counting proxy ---------------------------------------------

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


@dataclasses.dataclass
class ProxiedConnection:
    """What one client connection sent through a :class:`RoundTripProxy`.

    Attributes:
        index: Order in which the proxy accepted the connection, from 0.
        user: ``user`` from the startup packet.
        database: ``database`` from the startup packet.
        cancel: True for a CancelRequest connection (no session, no queries).
        encryption_refused: SSLRequest/GSSENCRequest packets answered "N".
        round_trips: Simple-query ('Q') plus Sync ('S') messages: each makes
            the client wait for ReadyForQuery, so each costs one round trip.
        flushes: Flush ('H') messages. asyncpg prepares a statement it has
            not cached with Parse, Describe, Flush and waits for the answer
            before it sends Bind, Execute, Sync, so a first execution costs
            two network round trips while ``round_trips`` counts one. See
            :attr:`network_round_trips`.
        queries: SQL text of every 'Q' and 'P' (Parse) message, in order.
        message_types: How many frontend messages of each type were seen.
        closed: The client side has gone away.
    """

    index: int
    user: str | None = None
    database: str | None = None
    cancel: bool = False
    encryption_refused: int = 0
    round_trips: int = 0
    flushes: int = 0
    queries: list[str] = dataclasses.field(default_factory=list)
    message_types: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    closed: bool = False

    @property
    def network_round_trips(self) -> int:
        """Round trips plus flushes: every time a client such as asyncpg waits."""
        return self.round_trips + self.flushes


class RoundTripProxy:
    """A TCP proxy on 127.0.0.1 that counts PostgreSQL round trips.

    It forwards bytes unchanged in both directions and reads a copy of the
    frontend stream (PostgreSQL protocol v3) to count, per client
    connection, the messages that make the client wait for the server.

    The proxy answers SSLRequest and GSSENCRequest with "N" itself instead
    of forwarding them, so the stream it reads is always plaintext, whatever
    the upstream server supports. Clients that insist on encryption fail.

    It runs its own event loop in a daemon thread, so it keeps forwarding
    while the test blocks, and serves subprocesses as well as the test.

    Example::

        with RoundTripProxy(admin_url) as proxy:
            conn = await asyncpg.connect(proxy.url_for("t_abc"))
            ...
            assert proxy.round_trips == 3
    """

    def __init__(self, upstream_url: str) -> None:
        self.upstream = Upstream.from_url(upstream_url)
        self.port: int | None = None
        self._connections: list[ProxiedConnection] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> RoundTripProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start listening on an ephemeral port; returns once it accepts."""
        if self._loop is not None:
            raise RuntimeError("RoundTripProxy.start() called twice")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="round-trip-proxy", daemon=True
        )
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = started.result(timeout=10)

    def stop(self) -> None:
        """Close the listener and every proxied connection; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    def url_for(self, database: str) -> str:
        """Return a ``postgresql://`` URL that reaches ``database`` through here.

        The URL carries no SSL option: asyncpg wants ``sslmode=disable`` in a
        DSN (``ssl=disable`` there is sent to the server as a setting and
        rejected), while SQLAlchemy's asyncpg dialect passes query items as
        keyword arguments and wants ``ssl=disable``. Since the proxy refuses
        encryption itself, either client works without the option.
        """
        if self.port is None:
            raise RuntimeError("RoundTripProxy.url_for() called before start()")
        credentials = quote(self.upstream.user, safe="")
        if self.upstream.password:
            credentials += ":" + quote(self.upstream.password, safe="")
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{quote(database)}"

    @property
    def connections(self) -> list[ProxiedConnection]:
        """A snapshot of every connection so far, cancel requests included."""
        with self._lock:
            return copy.deepcopy(self._connections)

    @property
    def sessions(self) -> list[ProxiedConnection]:
        """A snapshot of the connections that opened a session (no cancels)."""
        return [c for c in self.connections if not c.cancel]

    @property
    def round_trips(self) -> int:
        """Round trips over all connections so far."""
        return sum(c.round_trips for c in self.connections)

    @property
    def flushes(self) -> int:
        """Flush messages over all connections so far."""
        return sum(c.flushes for c in self.connections)

    @property
    def network_round_trips(self) -> int:
        """Round trips plus flushes over all connections so far."""
        return self.round_trips + self.flushes

    @property
    def queries(self) -> list[str]:
        """SQL of all connections so far, connection by connection."""
        return [q for c in self.connections for q in c.queries]

    def reset(self) -> None:
        """Forget what was counted; open connections count again from zero."""
        with self._lock:
            for conn in self._connections:
                conn.round_trips = 0
                conn.flushes = 0
                conn.queries.clear()
                conn.message_types.clear()
            self._connections = [c for c in self._connections if not c.closed]

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            record = ProxiedConnection(index=len(self._connections))
            self._connections.append(record)
        try:
            await self._serve(record, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # Either side hanging up mid-message is normal at close.
        finally:
            with self._lock:
                record.closed = True
            writer.close()
            self._tasks.discard(task)

    async def _serve(
        self,
        record: ProxiedConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        startup = await self._read_startup(record, reader, writer)
        if self.upstream.unix_socket is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(
                self.upstream.unix_socket
            )
        else:
            assert self.upstream.host is not None
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream.host, self.upstream.port
            )
        try:
            up_writer.write(startup)
            pumps = [
                asyncio.create_task(self._pump_frontend(record, reader, up_writer)),
                asyncio.create_task(_pump(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            up_writer.close()

    async def _read_startup(
        self,
        record: ProxiedConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bytes:
        # The first frontend message has no type byte: int32 length, then
        # int32 code. Encryption requests are answered here and followed by
        # another untyped message, so loop until a real startup or cancel.
        while True:
            header = await reader.readexactly(8)
            length = int.from_bytes(header[:4], "big")
            code = int.from_bytes(header[4:], "big")
            body = await reader.readexactly(length - 8)
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                with self._lock:
                    record.encryption_refused += 1
                continue
            with self._lock:
                if code == _CANCEL_REQUEST:
                    record.cancel = True
                else:
                    fields = body.split(b"\0")
                    params = dict(zip(fields[0::2], fields[1::2], strict=False))
                    record.user = params.get(b"user", b"").decode() or None
                    record.database = params.get(b"database", b"").decode() or None
            return header + body

    async def _pump_frontend(
        self,
        record: ProxiedConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # Bytes are forwarded as soon as they arrive; the parser only reads a
        # copy, so a message split across reads never delays the stream.
        pending = bytearray()
        while data := await reader.read(65536):
            writer.write(data)
            pending += data
            self._parse_typed(record, pending)
            await writer.drain()

    def _parse_typed(self, record: ProxiedConnection, pending: bytearray) -> None:
        while len(pending) >= 5:
            length = int.from_bytes(pending[1:5], "big")
            if len(pending) < 1 + length:
                return
            kind = chr(pending[0])
            body = bytes(pending[5 : 1 + length])
            del pending[: 1 + length]
            with self._lock:
                record.message_types[kind] += 1
                if kind in ("Q", "S"):
                    record.round_trips += 1
                elif kind == "H":
                    record.flushes += 1
                if kind == "Q":
                    record.queries.append(body.split(b"\0", 1)[0].decode())
                elif kind == "P":
                    # Parse: statement name, then query text, both NUL-ended.
                    record.queries.append(body.split(b"\0", 2)[1].decode())


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


# --- Racing Python processes -------------------------------------------------

# Runs in each child: import what the caller wants out of the race, say ready,
# then block until the parent closes the go pipe. Closing (EOF) wakes every
# child at once, which writing bytes to a shared pipe would not guarantee.
_HERD_BOOTSTRAP = """\
import importlib, os, runpy, sys
for _name in filter(None, os.environ["INITGATE_TEST_HERD_PRELOAD"].split(",")):
    importlib.import_module(_name)
_ready = int(os.environ["INITGATE_TEST_HERD_READY_FD"])
os.write(_ready, b"r")
os.close(_ready)
_go = int(os.environ["INITGATE_TEST_HERD_GO_FD"])
while os.read(_go, 1):
    pass
os.close(_go)
_path = os.environ["INITGATE_TEST_HERD_SCRIPT"]
sys.argv = [_path]
runpy.run_path(_path, run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    """How one herd process ended.

    Attributes:
        index: The process's ``INITGATE_TEST_HERD_INDEX``.
        returncode: Exit status; negative means killed by that signal.
        stdout: Everything it wrote to standard output.
        stderr: Everything it wrote to standard error.
        timed_out: It was still running at the deadline and was killed.
    """

    index: int
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool

    def describe(self) -> str:
        """Return a report for an assertion message."""
        state = "timed out" if self.timed_out else f"exit {self.returncode}"
        return (
            f"--- process {self.index}: {state}\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )


class Herd:
    """N Python processes waiting at one gate; made by :func:`spawn_python`."""

    def __init__(
        self, processes: list[subprocess.Popen[bytes]], go_fd: int, workdir: Path
    ) -> None:
        self.processes = processes
        self.workdir = workdir
        self.released_at: float | None = None
        self._go_fd: int | None = go_fd

    def __enter__(self) -> Herd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def release(self) -> None:
        """Let every process run its code, all at the same instant."""
        if self._go_fd is None:
            raise RuntimeError("Herd.release() called twice")
        self.released_at = time.time()
        os.close(self._go_fd)
        self._go_fd = None

    def wait_all(self, timeout: float) -> list[ProcessResult]:
        """Wait for every process, killing those still running at the deadline.

        Args:
            timeout: Seconds from now for all of them together.

        Returns:
            One result per process, in index order.

        Raises:
            RuntimeError: :meth:`release` was not called, so none would end.
        """
        if self.released_at is None:
            raise RuntimeError("Herd.wait_all() before release(): nothing can end")
        deadline = time.monotonic() + timeout
        timed_out: set[int] = set()
        for index, process in enumerate(self.processes):
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out.add(index)
                _kill_group(process)
        return [
            ProcessResult(
                index=index,
                returncode=process.returncode,
                stdout=self._output(index, "out"),
                stderr=self._output(index, "err"),
                timed_out=index in timed_out,
            )
            for index, process in enumerate(self.processes)
        ]

    def kill(self) -> None:
        """Kill whatever is still running (and its children); idempotent."""
        if self._go_fd is not None:
            os.close(self._go_fd)
            self._go_fd = None
        for process in self.processes:
            if process.poll() is None:
                _kill_group(process)

    def _output(self, index: int, stream: str) -> str:
        return (self.workdir / f"herd-{index}.{stream}").read_text(errors="replace")


def spawn_python(
    code_or_path: str | Path,
    *,
    n: int,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    preload: Sequence[str] = (),
    ready_timeout: float = 60.0,
) -> Herd:
    """Start ``n`` Python processes that wait to be released together.

    Each runs ``sys.executable`` from the repository root with the root on
    ``PYTHONPATH``, imports the modules in ``preload`` (so that import time
    stays out of the race), signals that it is ready and blocks. This
    function returns once all are ready; :meth:`Herd.release` then lets them
    run the script at the same instant. Each child sees its number in
    ``INITGATE_TEST_HERD_INDEX``. Output goes to ``herd-<i>.out`` and
    ``herd-<i>.err`` in ``workdir``.

    Args:
        code_or_path: Python source (``str``) or a script to run (``Path``).
        n: How many processes.
        workdir: Directory for the script copy and the output files.
        env: Variables added to this process's environment.
        preload: Modules to import before signalling ready.
        ready_timeout: Seconds to wait for all of them to be ready.

    Raises:
        RuntimeError: A process died or was too slow before becoming ready;
            all of them have been killed, and the message has its stderr.
    """
    if isinstance(code_or_path, Path):
        script = code_or_path.resolve()
    else:
        script = workdir / "herd_script.py"
        script.write_text(code_or_path)

    go_read, go_write = os.pipe()
    ready_read, ready_write = os.pipe()
    base_env = _child_env(env)
    base_env.update(
        INITGATE_TEST_HERD_PRELOAD=",".join(preload),
        INITGATE_TEST_HERD_READY_FD=str(ready_write),
        INITGATE_TEST_HERD_GO_FD=str(go_read),
        INITGATE_TEST_HERD_SCRIPT=str(script),
    )
    processes: list[subprocess.Popen[bytes]] = []
    herd = Herd(processes, go_write, workdir)
    try:
        for index in range(n):
            with (
                open(workdir / f"herd-{index}.out", "wb") as out,
                open(workdir / f"herd-{index}.err", "wb") as err,
            ):
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-c", _HERD_BOOTSTRAP],
                        cwd=REPO_ROOT,
                        env={**base_env, "INITGATE_TEST_HERD_INDEX": str(index)},
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        pass_fds=(go_read, ready_write),
                        start_new_session=True,
                    )
                )
    except BaseException:
        herd.kill()
        raise
    finally:
        # Only the children hold these ends now: the ready pipe reaches EOF
        # when the last child has closed its copy or died.
        os.close(go_read)
        os.close(ready_write)

    try:
        _await_ready(ready_read, herd, ready_timeout)
    except BaseException:
        herd.kill()
        raise
    finally:
        os.close(ready_read)
    return herd


def _await_ready(fd: int, herd: Herd, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    ready = 0
    died = False
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while ready < len(herd.processes) and time.monotonic() < deadline:
            # Short selects, so that one child dying is noticed at once even
            # while the others keep the pipe open.
            if selector.select(0.1):
                chunk = os.read(fd, 64)
                ready += len(chunk)
                if not chunk:
                    break  # Every child has closed its end.
            if any(p.poll() is not None for p in herd.processes):
                died = True
                break
    if ready < len(herd.processes) or died:
        herd.kill()
        for process in herd.processes:
            process.wait(timeout=10)
        errors = "\n".join(
            f"process {i}: {herd._output(i, 'err')[-2000:]}"
            for i in range(len(herd.processes))
        )
        raise RuntimeError(
            f"only {ready} of {len(herd.processes)} herd processes got ready"
            f" within {timeout} s; their stderr:\n{errors}"
        )


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _kill_group(process: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    """SIGTERM the process group, then SIGKILL it after ``grace`` seconds."""
    if grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    # SIGKILL the group even after a clean exit of the leader: children it
    # forked (uvicorn workers, say) may still be alive in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def live_processes_in_group(pgid: int) -> list[int]:
    """Return the pids in process group ``pgid`` that are not zombies.

    Zombies are left out because they are already dead: an orphan in this
    group is reaped by whatever init the machine has, possibly late.
    Reads ``/proc``, so it works on Linux only.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # Gone between listing and reading.
        # The command name is in parentheses and may contain spaces, so the
        # fields are counted from the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


# --- uvicorn -----------------------------------------------------------------


class UvicornServer:
    """A uvicorn process group started by :func:`start_uvicorn`."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, log_path: Path
    ) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    def __enter__(self) -> UvicornServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, path: str = "/") -> str:
        """Return ``http://127.0.0.1:<port><path>``."""
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        """Return everything uvicorn and the app wrote so far (stdout+stderr)."""
        return self.log_path.read_text(errors="replace")

    def wait_until_ok(self, path: str = "/", timeout: float = 60.0) -> bytes:
        """Poll ``path`` until it answers 200; return the body.

        Raises:
            AssertionError: Timeout, or uvicorn exited; the message has the log.
        """
        return wait_for_http(self.url(path), timeout=timeout, server=self)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` s; return the exit code.

        Idempotent. The exit code is the master's, or None if it was never
        started.
        """
        _kill_group(self.process, grace=grace)
        return self.process.returncode


def start_uvicorn(
    *,
    workers: int,
    log_dir: Path,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    app: str = "app.main:app",
    extra_args: Sequence[str] = (),
) -> UvicornServer:
    """Start ``uvicorn <app> --workers N`` from the repository root.

    It runs in its own process group (so stopping it also stops the
    workers), with this environment plus ``env``, and writes its output to
    ``<log_dir>/uvicorn-<port>.log``. Returns at once: use
    :meth:`UvicornServer.wait_until_ok` to wait for it to serve.
    """
    port = port or free_port()
    log_path = log_dir / f"uvicorn-{port}.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return UvicornServer(process, port, log_path)


def wait_for_http(
    url: str, *, timeout: float = 60.0, server: UvicornServer | None = None
) -> bytes:
    """Poll ``url`` until it answers 200 and return the body.

    Args:
        url: What to GET.
        timeout: Seconds to keep trying.
        server: If given, stop early when its process has exited, and put
            its log in the failure message.

    Raises:
        AssertionError: No 200 in time, or the server exited first.
    """
    # An empty ProxyHandler: a proxy from the environment must not be asked
    # for a loopback address.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if server is not None and server.process.poll() is not None:
            last = f"uvicorn exited with {server.process.returncode}"
            break
        try:
            with opener.open(url, timeout=5) as response:
                body: bytes = response.read()
                if response.status == 200:
                    return body
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}: {error.read()[:500]!r}"
        except (OSError, urllib.error.URLError) as error:
            last = repr(error)
        time.sleep(0.1)
    log = f"\n--- uvicorn log:\n{server.log()[-5000:]}" if server is not None else ""
    raise AssertionError(f"GET {url}: no 200 within {timeout} s ({last}){log}")


# --- PostgreSQL from the machine's binaries ---------------------------------


PG_ROOT_VARIABLE = "INITGATE_TEST_PG_ROOT"
"""A directory of ``<major>/bin`` server builds, as ``.ci/fetch-postgres`` makes."""


def find_pg_bindir(major: str) -> Path | None:
    """Find the server binaries of PostgreSQL ``major`` on this machine.

    Looks at ``$INITGATE_TEST_PG_ROOT/<major>/bin`` when that variable is set,
    then at Debian's ``/usr/lib/postgresql/<major>/bin``, then at what
    ``pg_config --bindir`` reports if ``pg_config --version`` is that major.
    """
    root = os.environ.get(PG_ROOT_VARIABLE)
    if root and (Path(root) / major / "bin" / "initdb").exists():
        return Path(root) / major / "bin"
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "initdb").exists():
        return debian
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    version = subprocess.run(
        [pg_config, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    if len(version) < 2 or version[1].split(".")[0] != major:
        return None
    bindir = subprocess.run(
        [pg_config, "--bindir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(bindir) if (Path(bindir) / "initdb").exists() else None


class SystemPostgres:
    """A throwaway PostgreSQL server built from the machine's own binaries.

    It listens on 127.0.0.1 only, on a free TCP port, with trust auth and no
    unix socket. As root, ``initdb`` and the server run as the system user
    ``postgres``, because ``initdb`` refuses to run as root.

    Example::

        server = SystemPostgres(find_pg_bindir("15"))
        server.start()
        try:
            ...  # server.admin_url
        finally:
            server.stop()
    """

    def __init__(self, bindir: Path, base_dir: Path | None = None) -> None:
        self.bindir = bindir
        self.base_dir = base_dir or short_temp_dir("igpg")
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "server.log"
        self.port: int | None = None
        self._owner = _server_owner()

    @property
    def admin_url(self) -> str:
        """The superuser's URL for the ``postgres`` database."""
        if self.port is None:
            raise RuntimeError("SystemPostgres.admin_url before start()")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, attempts: int = 3) -> None:
        """Run initdb and start the server; returns when it accepts connections.

        Raises:
            RuntimeError: The server did not start; the message has its log.
        """
        if self._owner is not None:
            os.chown(self.base_dir, self._owner.pw_uid, self._owner.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        for _ in range(attempts):
            port = free_port()
            self._configure(port)
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    "60",
                )
            except RuntimeError:
                # The usual cause is losing the port to another process.
                continue
            self.port = port
            return
        raise RuntimeError(
            f"PostgreSQL from {self.bindir} did not start after {attempts} tries;"
            f" its log:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory."""
        if self.port is not None:
            with contextlib.suppress(RuntimeError):
                self._run(
                    "pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w"
                )
            self.port = None
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _configure(self, port: int) -> None:
        # postgresql.conf takes the last value of a setting, so appending
        # again on a retry replaces the port chosen before.
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"port = {port}\n"
                "unix_socket_directories = ''\n"
            )

    def _run(self, program: str, *args: str) -> None:
        owner = self._owner
        result = subprocess.run(
            [str(self.bindir / program), *args],
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            extra_groups=[] if owner else None,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} failed with {result.returncode}:\n{result.stdout}"
                f"{result.stderr}\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        if not self.log_path.exists():
            return "(no server log)"
        return self.log_path.read_text(errors="replace")[-3000:]


def _server_owner() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root, but there is no system user 'postgres' to run"
            " initdb as; install the PostgreSQL server package or create it"
        ) from None
