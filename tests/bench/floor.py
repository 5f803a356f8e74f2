"""The Python floor: the least a uvloop + httptools server can do, as a third column of the
bench (``--floor``). It shows what the interpreter allows on this machine in the same run, so
the gap between it and pyngora is the cost of pyngora's own layers.

    python -m tests.bench.floor STATIC_PORT PROXY_PORT ORIGIN_PORT BODY

- STATIC_PORT answers every request with BODY (one prebuilt response, one write).
- PROXY_PORT forwards each client connection's bytes, as they are, to its own upstream
  connection (opened with the client's; no pool, no header work, no phases) and the answer
  back; httptools parses the requests only to count them. Not a correct proxy: a floor.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Optional

import httptools
import uvloop


class Static(asyncio.Protocol):
    """One prebuilt keep-alive response per parsed request."""

    def __init__(self, response: bytes, close_response: bytes) -> None:
        self.response, self.close_response = response, close_response
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self.parser.should_keep_alive():
            self.transport.write(self.response)  # type: ignore[union-attr]
        else:
            self.transport.write(self.close_response)  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]


class Upstream(asyncio.Protocol):
    """The origin side of one spliced pair."""

    def __init__(self, down: "Splice") -> None:
        self.down = down

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Back-pressure, the least a floor needs: stop reading the origin while the client's
        # side has too much queued.
        self.down.up_transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.down.transport.write(data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.down.transport.close()


class Splice(asyncio.Protocol):
    """A client connection glued to its own upstream connection."""

    def __init__(self, origin_port: int) -> None:
        self.origin_port = origin_port
        self.parser = httptools.HttpRequestParser(self)
        self.up: Optional[asyncio.Transport] = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport
        self.up_transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            up, _ = await asyncio.get_running_loop().create_connection(
                lambda: Upstream(self), "127.0.0.1", self.origin_port)
        except OSError:
            self.transport.close()
            return
        self.up = up  # type: ignore[assignment]
        if self.pending:
            up.write(b"".join(self.pending))
            self.pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
            return
        if self.up is None:
            self.pending.append(data)
        else:
            self.up.write(data)

    def pause_writing(self) -> None:
        if self.up_transport is not None:
            self.up_transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up_transport is not None:
            self.up_transport.resume_reading()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.up is not None:
            self.up.close()


def response(body: bytes, close: bool) -> bytes:
    """A complete 200 response with ``body``."""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
            % (len(body), b"Connection: close\r\n" if close else b"")) + body


async def main(static_port: int, proxy_port: int, origin_port: int, body: bytes) -> None:
    loop = asyncio.get_running_loop()
    ok, closing = response(body, False), response(body, True)
    s1 = await loop.create_server(lambda: Static(ok, closing), "127.0.0.1", static_port,
                                  backlog=1024)
    s2 = await loop.create_server(lambda: Splice(origin_port), "127.0.0.1", proxy_port,
                                  backlog=1024)
    async with s1, s2:
        await asyncio.Event().wait()  # until the driver kills the process group


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                     sys.argv[4].encode()))
