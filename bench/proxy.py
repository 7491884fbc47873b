"""A TCP proxy that counts PostgreSQL round trips per client connection.

It forwards bytes unchanged and reads a copy of the frontend stream
(protocol v3). A round trip is a message after which the client waits for
the server: a simple query ('Q'), a Sync ('S') ending an extended-protocol
exchange, or a Flush ('H'), which asyncpg sends to get a statement's
description before it binds. Startup and authentication are not counted:
the figures are round trips *beyond connecting*, and connections are counted
separately.

SSL and GSSAPI encryption requests are refused by the proxy itself, so the
stream stays readable whatever the server offers. The startup packet names
the client's ``application_name``, which maps each connection to a worker.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import Any

from bench.connections import pid_of

__all__ = ["ProxiedConnection", "RoundTripProxy"]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


@dataclasses.dataclass
class ProxiedConnection:
    """One client connection through the proxy."""

    application_name: str = ""
    round_trips: int = 0
    queries: list[str] = dataclasses.field(default_factory=list)


class RoundTripProxy:
    """Listens on 127.0.0.1 and forwards to the server, counting round trips.

    Runs its own event loop in a daemon thread, so forked worker processes
    can use it while the bench waits.
    """

    def __init__(self, unix_socket: str | None, host: str, port: int) -> None:
        self.unix_socket = unix_socket
        self.host = host
        self.upstream_port = port
        self.port: int | None = None
        self.connections: list[ProxiedConnection] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="round-trip-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None

    def __enter__(self) -> RoundTripProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def url_for(self, database: str, user: str) -> str:
        """A plain URL to ``database`` through the proxy."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def reset(self) -> None:
        """Forget every connection counted so far."""
        with self._lock:
            self.connections = []

    def by_worker(self) -> dict[int, dict[str, Any]]:
        """Connections and round trips of each worker pid seen so far."""
        out: dict[int, dict[str, Any]] = collections.defaultdict(
            lambda: {"connections": 0, "round_trips": 0, "queries": []}
        )
        with self._lock:
            for conn in self.connections:
                pid = pid_of(conn.application_name)
                if pid is None:
                    continue
                out[pid]["connections"] += 1
                out[pid]["round_trips"] += conn.round_trips
                out[pid]["queries"].extend(conn.queries)
        return dict(out)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        record = ProxiedConnection()
        with self._lock:
            self.connections.append(record)
        try:
            startup = await self._startup(record, reader, writer)
            if self.unix_socket is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(
                    self.unix_socket
                )
            else:
                up_reader, up_writer = await asyncio.open_connection(
                    self.host, self.upstream_port
                )
            up_writer.write(startup)
            pumps = [
                asyncio.create_task(self._frontend(record, reader, up_writer)),
                asyncio.create_task(_pump(up_reader, writer)),
            ]
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            up_writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # Either side hanging up mid-message is normal at close.
        finally:
            writer.close()

    async def _startup(
        self,
        record: ProxiedConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bytes:
        # The first message has no type byte; an encryption request is
        # answered "N" here and followed by the real startup packet.
        while True:
            header = await reader.readexactly(8)
            length = int.from_bytes(header[:4], "big")
            code = int.from_bytes(header[4:], "big")
            body = await reader.readexactly(length - 8)
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            fields = body.split(b"\0")
            params = dict(zip(fields[0::2], fields[1::2], strict=False))
            record.application_name = params.get(b"application_name", b"").decode()
            return header + body

    async def _frontend(
        self,
        record: ProxiedConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        pending = bytearray()
        while data := await reader.read(65536):
            writer.write(data)
            pending += data
            self._count(record, pending)
            await writer.drain()

    def _count(self, record: ProxiedConnection, pending: bytearray) -> None:
        while len(pending) >= 5:
            length = int.from_bytes(pending[1:5], "big")
            if len(pending) < 1 + length:
                return
            kind = chr(pending[0])
            body = bytes(pending[5 : 1 + length])
            del pending[: 1 + length]
            with self._lock:
                if kind in ("Q", "S", "H"):
                    record.round_trips += 1
                if kind == "Q":
                    record.queries.append(body.split(b"\0", 1)[0].decode()[:80])
                elif kind == "P":
                    record.queries.append(body.split(b"\0", 2)[1].decode()[:80])


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
