"""Count the round trips a client makes to PostgreSQL, on the wire.

A TCP proxy in front of the server reads what the client sends and counts the messages
that make the server answer: a simple `Query` ('Q') and the `Sync` ('S') that ends each
extended-protocol exchange (Parse/Bind/Describe/Execute ... Sync is one round trip, and
asyncpg pipelines an executemany's executions before one Sync). BEGIN and COMMIT count like
any statement. Nothing the client library reports about itself is trusted: what is counted
is what crossed the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_ANSWERED = {ord("Q"), ord("S")}


@dataclass
class WireCounter:
    round_trips: int = 0
    messages: list[str] = field(default_factory=list)
    counting: bool = False

    @contextlib.contextmanager
    def window(self) -> Iterator[WireCounter]:
        self.round_trips, self.messages, self.counting = 0, [], True
        try:
            yield self
        finally:
            self.counting = False


async def _pipe_server_to_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    writer.close()


async def _pipe_client_to_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: WireCounter
) -> None:
    parsed: list[str] = []  # the queries parsed since the last round trip
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        # Untyped messages first: SSL/GSS requests (answered 'N' by a server without TLS),
        # then the startup message.
        while True:
            length = struct.unpack("!i", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            writer.write(struct.pack("!i", length) + body)
            await writer.drain()
            code = struct.unpack("!i", body[:4])[0]
            if code not in (_SSL_REQUEST, _GSS_REQUEST):
                break
        while True:
            kind = await reader.readexactly(1)
            length = struct.unpack("!i", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            if kind == b"P":  # Parse: statement name, NUL, the query, NUL, ...
                parsed.append(body.split(b"\0")[1].decode(errors="replace"))
            if counter.counting and kind[0] in _ANSWERED:
                counter.round_trips += 1
                if kind == b"Q":
                    parsed.append(body[:-1].decode(errors="replace"))
                counter.messages.append(" | ".join(q[:60] for q in parsed) or "(prepared)")
            if kind[0] in _ANSWERED:
                parsed.clear()
            writer.write(kind + struct.pack("!i", length) + body)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def counting_proxy(host: str, port: int) -> AsyncIterator[tuple[int, WireCounter]]:
    """A proxy to `host:port` on a free local port; yields (its port, its counter)."""
    counter = WireCounter()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter):
        server_reader, server_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(
            _pipe_client_to_server(client_reader, server_writer, counter),
            _pipe_server_to_client(server_reader, client_writer),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], counter
    finally:
        server.close()
