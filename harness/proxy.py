"""A TCP proxy that counts the PostgreSQL round trips of each client connection.

It forwards bytes unchanged in both directions and reads a copy of the
frontend stream (protocol v3). Tests assert with it how many round trips a
gate pass costs; the bench reports the same figure per worker.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import threading
from types import TracebackType
from urllib.parse import quote

from harness.urls import Upstream

__all__ = ["ProxiedConnection", "RoundTripProxy"]

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
        application_name: ``application_name`` from the startup packet,
            which tells whose connection it is.
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
    application_name: str | None = None
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
                    record.application_name = (
                        params.get(b"application_name", b"").decode() or None
                    )
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
