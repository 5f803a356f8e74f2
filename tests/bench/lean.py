"""The least a pooled HTTP/1 proxy does, as a bench column beside floor.py (``--floor-module``).

    python -m tests.bench.lean STATIC_PORT PROXY_PORT ORIGIN_PORT BODY    (as floor.py)

floor.py splices each client connection to its own upstream connection and parses no
response. This one does the least a proxy that pools must: llhttp parses the request (URL and
fields through its callbacks) and the response (to know where it ends), the hop-by-hop fields
are dropped both ways with plain Python, the heads are rebuilt, and the upstream connection
goes back to a pool after each response. No timeouts, metrics, logs, limits or error answers,
and it assumes what wrk does (no pipelining): an experiment that says what the interpreter
allows a correct proxy, not a proxy. tests/bench/lean_raw.py is the same without field
callbacks.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any, Callable, Optional

import httptools
import uvloop

from tests.bench.floor import Static, response

HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                 b"transfer-encoding", b"upgrade"))
POOL: list = []
ORIGIN = [0]  # the origin's port, set by serve()
CRLF = b"\r\n"


class PooledUp(asyncio.Protocol):
    """An upstream connection that goes back to ``pool`` after each response (subclasses set
    ``parser``, ``down`` and ``transport``)."""

    pool: list[Any] = POOL
    parser: Any
    down: Any
    transport: Any

    def connection_made(self, t: Any) -> None:
        self.transport = t

    def on_message_complete(self) -> None:
        down = self.down
        self.down = None
        if self.parser.should_keep_alive():
            self.pool.append(self)
        down.busy = False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.down is not None:
            self.down.transport.close()


class Up(PooledUp):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.down = None
        self.transport = None
        self.fields: list = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        fields = self.fields
        self.fields = []
        out = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()]
        for n, v in fields:
            if n.lower() not in HOP:
                out.append(b"%s: %s\r\n" % (n, v))
        out.append(CRLF)
        self.down.transport.write(b"".join(out))

    def on_body(self, body: bytes) -> None:
        self.down.transport.write(body)


class Down(asyncio.Protocol):
    __slots__ = ("parser", "transport", "url", "fields", "busy")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list = []
        self.busy = False

    def connection_made(self, t) -> None:
        self.transport = t

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_message_complete(self) -> None:
        out = [b"%s %s HTTP/1.1\r\n" % (self.parser.get_method(), self.url)]
        for n, v in self.fields:
            if n.lower() not in HOP:
                out.append(b"%s: %s\r\n" % (n, v))
        out.append(CRLF)
        self.url = b""
        self.fields = []
        self.busy = True
        forward(self, b"".join(out), POOL, Up)


def forward(down: Any, head: bytes, pool: list[Any], up_factory: Callable[[], Any]) -> None:
    """Send ``head`` upstream for ``down``: on a pooled connection, else on a new one."""
    if pool:
        up = pool.pop()
        up.down = down
        up.transport.write(head)
    else:
        asyncio.get_running_loop().create_task(_dial(down, head, up_factory))


async def _dial(down: Any, head: bytes, up_factory: Callable[[], Any]) -> None:
    _, up = await asyncio.get_running_loop().create_connection(up_factory, "127.0.0.1",
                                                               ORIGIN[0])
    up.down = down
    up.transport.write(head)


async def _main(down_factory: Callable[[], Any], static_port: int, proxy_port: int,
                origin_port: int, body: bytes) -> None:
    ORIGIN[0] = origin_port
    loop = asyncio.get_running_loop()
    ok, closing = response(body, False), response(body, True)
    s1 = await loop.create_server(lambda: Static(ok, closing), "127.0.0.1", static_port,
                                  backlog=1024)
    s2 = await loop.create_server(down_factory, "127.0.0.1", proxy_port, backlog=1024)
    async with s1, s2:
        await asyncio.Event().wait()


def serve(down_factory: Callable[[], Any]) -> None:
    """The program: floor.py's arguments, ``down_factory`` on the proxy port."""
    uvloop.install()
    asyncio.run(_main(down_factory, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                      sys.argv[4].encode()))


if __name__ == "__main__":
    serve(Down)
