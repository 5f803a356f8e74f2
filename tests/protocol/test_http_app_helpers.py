"""Shared helpers for the in-process HTTP tests (no tests here): serve a Service on a loopback
port inside the running loop, and a small raw-socket HTTP/1.1 client that reads responses
exactly (Content-Length, chunked, or until close; HEAD-aware)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Optional

import uvloop

from pyngora.config.schema import ServerConf, parse_address
from pyngora.headers import Headers
from pyngora.services.base import Service, WorkerContext
from pyngora.services.http_app import Exchange, HttpApp


def run(coro: Any, timeout: float = 20.0) -> Any:
    """Run ``coro`` on a fresh uvloop loop, bounded by ``timeout`` seconds."""
    return uvloop.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving_unix(svc: Service, server_conf: Optional[ServerConf], path: str
                       ) -> AsyncIterator[WorkerContext]:
    """Start ``svc`` as one worker would, on a Unix socket at ``path``; yields the ctx."""
    loop = asyncio.get_running_loop()
    ctx = WorkerContext(svc, 0, 0, server_conf or ServerConf(), loop)
    await svc.start_worker(ctx)
    server = await loop.create_unix_server(
        svc.protocol_factory(ctx, parse_address(f"unix:{path}")), path)
    try:
        yield ctx
    finally:
        server.close()
        ctx.connections.abort_all()
        await svc.stop_worker(ctx)


@contextlib.asynccontextmanager
async def serving(svc: Service, server_conf: Optional[ServerConf] = None,
                  accepted: Optional[list[int]] = None, h2c: bool = False
                  ) -> AsyncIterator[tuple[int, WorkerContext]]:
    """Start ``svc`` as one worker would, on 127.0.0.1:0; yields (port, ctx). ``accepted``
    (a list) gets one item per accepted connection; ``h2c``: the listener also speaks
    HTTP/2 with prior knowledge."""
    loop = asyncio.get_running_loop()
    ctx = WorkerContext(svc, 0, 0, server_conf or ServerConf(), loop)
    await svc.start_worker(ctx)
    factory = svc.protocol_factory(ctx, parse_address("127.0.0.1:0", h2c=h2c))
    if accepted is not None:
        inner = factory

        def factory() -> Any:  # type: ignore[no-redef]
            accepted.append(1)
            return inner()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], ctx
    finally:
        server.close()
        ctx.connections.abort_all()
        await svc.stop_worker(ctx)


class Response:
    __slots__ = ("status", "headers", "body", "raw_head", "trailers")

    def __init__(self, status: int, headers: Headers, body: bytes, raw_head: bytes,
                 trailers: Optional[Headers] = None) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head
        self.trailers = trailers

    def header(self, name: str) -> Optional[str]:
        v = self.headers.get(name)
        return v.decode("latin-1") if v is not None else None


class Client:
    """A raw HTTP/1.1 client over one TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> "Client":
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self) -> tuple[int, Headers, bytes]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        h = Headers()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            h.add(name, value.strip())
        return status, h, raw

    async def read_response(self, head_request: bool = False) -> Response:
        while True:
            status, h, raw = await self.read_head()
            if status >= 200 or status == 101:
                break
        if head_request or status in (204, 304, 101):
            return Response(status, h, b"", raw)
        te = h.get("transfer-encoding")
        cl = h.get("content-length")
        if te is not None and te.rpartition(b",")[2].strip().lower() == b"chunked":
            body = bytearray()
            while True:
                line = await self.reader.readuntil(b"\r\n")
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    trailers = Headers()
                    while True:
                        line = await self.reader.readuntil(b"\r\n")
                        if line == b"\r\n":
                            break
                        n, _, v = line[:-2].partition(b":")
                        trailers.add(n, v.strip())
                    return Response(status, h, bytes(body), raw, trailers or None)
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
        if cl is not None:
            return Response(status, h, await self.reader.readexactly(int(cl)), raw)
        return Response(status, h, await self.reader.read(), raw)

    async def request(self, method: str = "GET", target: str = "/", body: bytes = b"",
                      headers: tuple[tuple[str, str], ...] = ()) -> Response:
        hdrs = "".join(f"{n}: {v}\r\n" for n, v in headers)
        if body:
            hdrs += f"Content-Length: {len(body)}\r\n"
        await self.send(f"{method} {target} HTTP/1.1\r\nHost: t\r\n{hdrs}\r\n".encode() + body)
        return await self.read_response(head_request=method == "HEAD")

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (reads until EOF, bounded)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionError, asyncio.TimeoutError):
            return False
        return rest == b"" or self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class EchoApp(HttpApp):
    """Test app: streams the request body back (chunked), with the target in X-Target."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def handle(self, ex: Exchange) -> Any:
        self.exchanges.append(ex)
        return self._run(ex)

    async def _run(self, ex: Exchange) -> None:
        delay = ex.head.headers.get("x-delay")
        if delay:
            await asyncio.sleep(float(delay))
        h = Headers([("X-Target", ex.head.target)])
        if ex.head.headers.get("x-full"):
            ex.respond(200, h, await ex.read_full_body())
            return
        if ex.head.method == b"POST" or ex.head.body != "none":
            data = await ex.read_body()  # first (sends 100 Continue when asked), then the head
            ex.write_head(200, h)
            while data is not None:
                ex.write_body(data)
                await ex.drain()
                data = await ex.read_body()
            ex.write_end(ex.trailers)
        else:
            ex.respond(200, h, ex.head.target)


class AppService(Service):
    """Wraps any HttpApp in an HttpService for tests."""

    def __new__(cls, app: HttpApp, limits: Any = None) -> Any:  # type: ignore[misc]
        from pyngora.services.http_app import HttpService

        class _Svc(HttpService):
            def new_app(self, ctx: WorkerContext) -> HttpApp:
                return app

        return _Svc("test", None, limits)
