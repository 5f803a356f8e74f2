"""pyngora.upstreams.connector against small real origins on 127.0.0.1 (port 0) and Unix sockets.

Each test runs its own event loop (plain asyncio and uvloop, both), starts an asyncio origin
written here, and talks to it through a Connector. Nothing is mocked: real sockets, real TLS
(a self-signed certificate made with the openssl CLI). Waits are on conditions, never on
wall-clock measurements; the only timeouts are the connector's own (a few tenths of a second)
and generous upper bounds that fail a test instead of hanging it.
"""
from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import pytest
import uvloop

from pyngora.errors import Error, ErrorType
from pyngora.headers import Headers
from pyngora.protocols.events import Data, InformationalResponse, MessageEnd, ResponseHead
from pyngora.upstreams import HttpPeer, PeerOptions
from pyngora.upstreams.connector import HIGH_WATER, Connector, UpstreamConnection
from tests.support import self_signed_cert

pytestmark = pytest.mark.timeout(60)

BIG = 10 * 1024 * 1024


# --- running coroutines on both loops ---------------------------------------------------------

@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    def runner(coro: Awaitable[Any]) -> Any:
        if request.param == "uvloop":
            return uvloop.run(coro)  # type: ignore[arg-type]
        return asyncio.run(coro)  # type: ignore[arg-type]
    return runner


async def until(predicate: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (bounded: fails the test after ``limit`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


# --- a small origin ---------------------------------------------------------------------------

class Origin:
    """An HTTP/1.1 origin whose behaviour is picked by the request path (see ``_respond``)."""

    def __init__(self, ssl_ctx: Optional[ssl.SSLContext] = None,
                 unix_path: Optional[str] = None) -> None:
        self.ssl_ctx = ssl_ctx
        self.unix_path = unix_path
        self.accepted = 0
        self.requests: list[tuple[bytes, bytes, dict[bytes, bytes], bytes]] = []
        self.server: Optional[asyncio.AbstractServer] = None
        self.port = 0
        self.go = asyncio.Event()  # releases the origin where a path waits for the test
        self.saw_eof = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> "Origin":
        if self.unix_path:
            self.server = await asyncio.start_unix_server(self._serve, self.unix_path)
        else:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                     ssl=self.ssl_ctx)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"127.0.0.1:{self.port}"

    async def close(self) -> None:
        """Stop listening, cut every connection, and wait for the handlers to end."""
        assert self.server is not None
        self.server.close()
        self.go.set()
        for w in self.writers:
            w.transport.abort()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        nth = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.saw_eof.set()
                    return
                nth += 1
                lines = head[:-4].split(b"\r\n")
                method, path, _ = lines[0].split(b" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                if path == b"/sink-later":
                    await self.go.wait()  # let the client's writes back up first
                try:
                    body = await self._read_body(reader, headers)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client gave up mid-upload (the write-timeout test)
                self.requests.append((method, path, headers, body))
                if not await self._respond(method, path, body, nth, reader, writer):
                    return
        finally:
            writer.transport.abort()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
        if headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readline()) != b"\r\n":
                        pass  # trailers
                    return b"".join(parts)
                parts.append(await reader.readexactly(size))
                await reader.readline()
        length = int(headers.get(b"content-length", b"0"))
        return await reader.readexactly(length) if length else b""

    async def _respond(self, method: bytes, path: bytes, body: bytes, nth: int,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False to end the connection."""
        w = writer.write
        if path == b"/cl" or path == b"/sink-later":
            payload = b"hello world" if path == b"/cl" else b"got %d" % len(body)
            w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload))
        elif path == b"/head":
            w(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        elif path == b"/echo":
            w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        elif path == b"/chunked":
            w(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"2\r\nab\r\n2\r\ncd\r\n2\r\nef\r\n0\r\nX-Trailer: yes\r\n\r\n")
        elif path == b"/eof":
            w(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            await writer.drain()
            return False
        elif path == b"/close":
            w(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            return False
        elif path == b"/close-after":  # keep-alive promised, then closed anyway once idle
            w(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await self.go.wait()
            writer.close()
            return False
        elif path == b"/junk-after":
            w(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await self.go.wait()
            w(b"X")
        elif path == b"/drop-second":
            if nth >= 2:
                return False  # close without answering: the keep-alive race
            w(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif path == b"/drop":
            return False
        elif path == b"/silent":
            await reader.read()  # never answers; returns when the client gives up
            return False
        elif path == b"/bad":
            w(b"HTTP/1.1 2x0 Nope\r\nContent-Length: 0\r\n\r\n")
        elif path == b"/continue":
            w(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif path == b"/big":
            w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
            block = b"x" * 65536
            for _ in range(BIG // len(block)):
                w(block)
                await writer.drain()
        elif path == b"/upgrade":
            w(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
              b"hello")
            while True:
                data = await reader.read(65536)
                if not data:
                    self.saw_eof.set()
                    return False
                w(data)
        else:
            w(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        return True


async def fetch(connector: Connector, peer: HttpPeer, path: bytes, method: bytes = b"GET",
                body: Optional[bytes] = None, chunked: bool = False
                ) -> tuple[UpstreamConnection, ResponseHead, bytes, MessageEnd, list[Any]]:
    """One request through ``connector``; returns (conn, head, body, end, informational)."""
    conn = await connector.get(peer)
    headers = Headers([(b"Host", b"origin.test")])
    if body is not None:
        if chunked:
            headers.add(b"Transfer-Encoding", b"chunked")
        else:
            headers.add(b"Content-Length", str(len(body)).encode())
    conn.send_head(method, path, headers)
    if body is not None:
        conn.send_body(body, chunked)
        conn.send_end(chunked)
        await conn.drain()
    infos: list[Any] = []
    head: Optional[ResponseHead] = None
    parts: list[bytes] = []
    for _ in range(100_000):
        ev = await conn.read_event()
        if isinstance(ev, InformationalResponse):
            infos.append(ev)
        elif isinstance(ev, ResponseHead):
            head = ev
        elif isinstance(ev, Data):
            parts.append(ev.data)
        elif isinstance(ev, MessageEnd):
            assert head is not None
            return conn, head, b"".join(parts), ev, infos
    raise AssertionError("response never ended")


def opts(**kw: Any) -> PeerOptions:
    return PeerOptions(**kw)


# --- keep-alive and framing ---------------------------------------------------------------------

def test_keepalive_reuse_ten_requests_one_connection(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector(pool_size=8)
        try:
            peer = HttpPeer(origin.address)
            for i in range(10):
                conn, head, body, _, _ = await fetch(connector, peer, b"/cl")
                assert head.status == 200 and body == b"hello world"
                assert conn.reused is (i > 0)
                assert conn.connect_duration >= 0.0
                connector.release(conn, reusable=True)
            assert origin.accepted == 1
            assert len(connector.pool) == 1
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_framings_chunked_length_eof_head_1xx(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address)
            conn, head, body, end, _ = await fetch(connector, peer, b"/chunked")
            assert head.body == "chunked" and body == b"abcdef"
            assert end.trailers is not None and end.trailers.get(b"x-trailer") == b"yes"
            connector.release(conn, True)

            conn, head, body, _, infos = await fetch(connector, peer, b"/continue")
            assert [i.status for i in infos] == [100] and body == b"ok"
            assert conn.reused
            connector.release(conn, True)

            conn, head, body, _, _ = await fetch(connector, peer, b"/head", method=b"HEAD")
            assert head.body == "none" and head.content_length == 5 and body == b""
            assert conn.reused
            connector.release(conn, True)

            conn, head, body, _, _ = await fetch(connector, peer, b"/eof")
            assert head.body == "close" and body == b"until the end"
            assert conn.reused and not conn.can_reuse()
            connector.release(conn, True)  # read-to-EOF: closed, not pooled
            assert len(connector.pool) == 0

            conn, head, body, _, _ = await fetch(connector, peer, b"/close")
            assert body == b"ok" and not head.keep_alive and not conn.reused
            connector.release(conn, True)
            assert len(connector.pool) == 0

            conn, _, _, _, _ = await fetch(connector, peer, b"/cl")
            assert not conn.reused
            connector.release(conn, True)
            assert origin.accepted == 3
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_request_bodies_length_and_chunked(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address)
            conn, _, body, _, _ = await fetch(connector, peer, b"/echo", b"POST", b"a" * 1000)
            assert body == b"a" * 1000
            connector.release(conn, True)
            conn, _, body, _, _ = await fetch(connector, peer, b"/echo", b"POST", b"chunky",
                                              chunked=True)
            assert body == b"chunky" and conn.reused
            assert origin.requests[-1][2][b"transfer-encoding"] == b"chunked"
            connector.release(conn, True)
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_unix_socket_peer(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        origin = await Origin(unix_path=str(tmp_path / "o.sock")).start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address)
            for _ in range(3):
                conn, _, body, _, _ = await fetch(connector, peer, b"/cl")
                assert body == b"hello world"
                connector.release(conn, True)
            assert origin.accepted == 1
        finally:
            connector.close_all()
            await origin.close()
    run(main())


# --- connect errors and timeouts ----------------------------------------------------------------

def _free_port() -> int:
    from tests.support import free_port
    return free_port()


def test_refused(run: Any) -> None:
    async def main() -> None:
        connector = Connector()
        with pytest.raises(Error) as info:
            await connector.get(HttpPeer(f"127.0.0.1:{_free_port()}"))
        err = info.value
        assert err.etype is ErrorType.ConnectRefused and err.retry and err.status == 502
    run(main())


def test_connect_timeout_against_full_backlog(run: Any) -> None:
    """A listener with backlog 0 whose accept queue is filled by pending connects drops SYNs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        addr = listener.getsockname()
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(addr)
            fillers.append(s)

        async def main() -> None:
            connector = Connector()
            peer = HttpPeer(f"127.0.0.1:{addr[1]}", options=opts(connection_timeout=0.3))
            with pytest.raises(Error) as info:
                await connector.get(peer)
            err = info.value
            assert err.etype is ErrorType.ConnectTimedout, err
            assert err.retry and err.status == 504
        run(main())
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_read_timeout_silent_origin(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            conn, _, _, _, _ = await fetch(connector, HttpPeer(origin.address), b"/cl")
            connector.release(conn, True)
            # Timeouts are not part of the reuse key: the pooled connection takes the new
            # peer's read_timeout.
            peer = HttpPeer(origin.address, options=opts(read_timeout=0.3))
            with pytest.raises(Error) as info:
                await fetch(connector, peer, b"/silent")
            err = info.value
            assert err.etype is ErrorType.ReadTimedout and err.status == 504 and not err.retry
            assert conn.reused and not conn.can_reuse()
            connector.release(conn, True)  # refused: a timed-out exchange is never pooled
            assert len(connector.pool) == 0
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_bad_response_is_502(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            with pytest.raises(Error) as info:
                await fetch(connector, HttpPeer(origin.address), b"/bad")
            assert info.value.etype is ErrorType.InvalidHTTPHeader
            assert info.value.status == 502
        finally:
            connector.close_all()
            await origin.close()
    run(main())


# --- the pool: dead and dirty connections are never reused ------------------------------------

def test_origin_closes_pooled_connection_not_reused(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address)
            conn, _, body, _, _ = await fetch(connector, peer, b"/close-after")
            connector.release(conn, True)
            assert len(connector.pool) == 1
            origin.go.set()  # the origin now closes the idle connection
            await until(lambda: len(connector.pool) == 0, "the pool to drop the connection")
            conn2, _, body, _, _ = await fetch(connector, peer, b"/cl")
            assert not conn2.reused and body == b"hello world"
            assert origin.accepted == 2
            connector.release(conn2, True)
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_bytes_while_idle_drop_connection(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address)
            conn, _, _, _, _ = await fetch(connector, peer, b"/junk-after")
            connector.release(conn, True)
            assert len(connector.pool) == 1
            origin.go.set()  # one stray byte arrives while the connection is idle
            await until(lambda: len(connector.pool) == 0, "the pool to drop the connection")
            assert not conn.is_idle_usable()
            conn2 = await connector.get(peer)
            assert conn2 is not conn and not conn2.reused
            conn2.close()
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_reused_connection_closed_before_response_is_retryable(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address)
            conn, _, _, _, _ = await fetch(connector, peer, b"/drop-second")
            connector.release(conn, True)
            with pytest.raises(Error) as info:
                await fetch(connector, peer, b"/drop-second")
            err = info.value
            assert err.etype in (ErrorType.ConnectionClosed, ErrorType.ReadError), err
            assert err.retry and err.status == 502
            assert len(connector.pool) == 0
            # The same failure on a fresh connection is not retryable.
            with pytest.raises(Error) as info:
                await fetch(connector, peer, b"/drop")
            assert not info.value.retry
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_idle_timeout_closes_pooled_connection(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address, options=opts(idle_timeout=0.2))
            conn, _, _, _, _ = await fetch(connector, peer, b"/cl")
            connector.release(conn, True)
            assert len(connector.pool) == 1
            await until(lambda: len(connector.pool) == 0, "the idle timer")
            await until(origin.saw_eof.is_set, "the origin to see the close")
            conn2, _, _, _, _ = await fetch(connector, peer, b"/cl")
            assert not conn2.reused
            connector.release(conn2, False)
            assert len(connector.pool) == 0
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_pool_bound_and_distinct_keys(run: Any) -> None:
    async def main() -> None:
        a, b = await Origin().start(), await Origin().start()
        connector = Connector(pool_size=1)
        try:
            pa, pb = HttpPeer(a.address), HttpPeer(b.address)
            ca, _, _, _, _ = await fetch(connector, pa, b"/cl")
            cb, _, _, _, _ = await fetch(connector, pb, b"/cl")
            connector.release(ca, True)
            connector.release(cb, True)  # evicts ca (least recently released)
            assert len(connector.pool) == 1
            await until(a.saw_eof.is_set, "the evicted connection to close")
            again, _, _, _, _ = await fetch(connector, pb, b"/cl")
            assert again is cb and again.reused
            connector.release(again, True)
        finally:
            connector.close_all()
            await a.close()
            await b.close()
    run(main())


# --- back-pressure ------------------------------------------------------------------------------

def test_big_response_streams_with_bounded_buffer(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address)
            conn = await connector.get(peer)
            conn.send_head(b"GET", b"/big", Headers([(b"Host", b"o")]))
            head = await conn.read_event()
            assert isinstance(head, ResponseHead) and head.content_length == BIG
            # Do not read: the connection must stop reading once enough is buffered.
            await until(lambda: conn.pause_count >= 1, "reading to pause")
            await asyncio.sleep(0.05)  # give a misbehaving reader the chance to over-buffer
            assert conn._buffered <= HIGH_WATER + 1024 * 1024
            total = 0
            peak = 0
            while True:
                ev = await conn.read_event()
                peak = max(peak, conn._buffered)
                if isinstance(ev, MessageEnd):
                    break
                assert isinstance(ev, Data)
                total += len(ev.data)
            assert total == BIG
            assert peak <= HIGH_WATER + 1024 * 1024
            connector.release(conn, True)
            assert len(connector.pool) == 1
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_upload_back_pressure_and_write_timeout(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            # An origin that reads nothing until told: drain() must block, then finish.
            peer = HttpPeer(origin.address)
            conn = await connector.get(peer)
            size = 8 * 1024 * 1024
            conn.send_head(b"POST", b"/sink-later",
                           Headers([(b"Host", b"o"), (b"Content-Length", str(size).encode())]))
            block = b"u" * 65536
            blocked = False
            for _ in range(size // len(block)):
                conn.send_body(block, False)
                if conn._write_paused and not blocked:
                    blocked = True
                    drain = asyncio.ensure_future(conn.drain())
                    await asyncio.sleep(0.05)
                    assert not drain.done()
                    origin.go.set()
                    await drain
                else:
                    await conn.drain()
            assert blocked
            ev = await conn.read_event()
            assert isinstance(ev, ResponseHead) and ev.status == 200
            data = await conn.read_event()
            assert isinstance(data, Data) and data.data == b"got %d" % size
            connector.release(conn, False)

            # An origin that never reads: write_timeout.
            origin.go.clear()
            peer = HttpPeer(origin.address, options=opts(write_timeout=0.3))
            conn = await connector.get(peer)
            conn.send_head(b"POST", b"/sink-later",
                           Headers([(b"Host", b"o"), (b"Content-Length", str(size).encode())]))
            with pytest.raises(Error) as info:
                for _ in range(size // len(block)):
                    conn.send_body(block, False)
                    await conn.drain()
            assert info.value.etype is ErrorType.WriteTimedout and info.value.status == 504
            assert not conn.can_reuse()
            conn.close()
        finally:
            origin.go.set()
            connector.close_all()
            await origin.close()
    run(main())


# --- upgrade tunnel -----------------------------------------------------------------------------

def test_upgrade_into_tunnel(run: Any) -> None:
    async def main() -> None:
        origin = await Origin().start()
        connector = Connector()
        try:
            conn = await connector.get(HttpPeer(origin.address))
            conn.send_head(b"GET", b"/upgrade",
                           Headers([(b"Host", b"o"), (b"Connection", b"Upgrade"),
                                    (b"Upgrade", b"echo")]))
            head = await conn.read_event()
            assert isinstance(head, ResponseHead) and head.status == 101
            assert isinstance(await conn.read_event(), MessageEnd)
            early = b"".join(conn.into_tunnel())
            while len(early) < 5:
                early += await conn.read_raw()
            assert early == b"hello"
            conn.write_raw(b"ping")
            got = b""
            while len(got) < 4:
                got += await conn.read_raw()
            assert got == b"ping"
            conn.write_eof()
            assert await conn.read_raw() == b""
            assert not conn.can_reuse()
            connector.release(conn, True)
            assert len(connector.pool) == 0
        finally:
            connector.close_all()
            await origin.close()
    run(main())


# --- TLS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


def _server_ctx(cert: tuple[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def test_tls_upstream_verified_and_reused(run: Any, cert: tuple[str, str]) -> None:
    async def main() -> None:
        origin = await Origin(ssl_ctx=_server_ctx(cert)).start()
        connector = Connector()
        try:
            peer = HttpPeer(origin.address, tls=True, sni="localhost",
                            options=opts(ca_file=cert[0]))
            for i in range(3):
                conn, _, body, _, _ = await fetch(connector, peer, b"/cl")
                assert body == b"hello world" and conn.reused is (i > 0)
                assert conn.transport.get_extra_info("ssl_object").selected_alpn_protocol() \
                    == "http/1.1"
                connector.release(conn, True)
            assert origin.accepted == 1
            # The server-wide ca_file serves peers that name none.
            connector2 = Connector(ca_file=cert[0])
            conn, _, body, _, _ = await fetch(connector2, HttpPeer(origin.address, tls=True,
                                                                   sni="localhost"), b"/chunked")
            assert body == b"abcdef"
            connector2.release(conn, False)
            # A big body over TLS, with back-pressure.
            conn, _, body, _, _ = await fetch(connector, peer, b"/big")
            assert len(body) == BIG
            connector.release(conn, True)
        finally:
            connector.close_all()
            await origin.close()
    run(main())


def test_tls_wrong_sni_and_unknown_ca_fail(run: Any, cert: tuple[str, str]) -> None:
    async def main() -> None:
        origin = await Origin(ssl_ctx=_server_ctx(cert)).start()
        connector = Connector()
        try:
            wrong = HttpPeer(origin.address, tls=True, sni="wrong.example",
                             options=opts(ca_file=cert[0]))
            with pytest.raises(Error) as info:
                await connector.get(wrong)
            err = info.value
            assert err.etype is ErrorType.TLSHandshakeFailure and err.retry
            assert err.status == 502
            unknown_ca = HttpPeer(origin.address, tls=True, sni="localhost")
            with pytest.raises(Error) as info:
                await connector.get(unknown_ca)
            assert info.value.etype is ErrorType.TLSHandshakeFailure
            # verify_hostname=False accepts the wrong name; verify_cert=False anything.
            for o in (opts(ca_file=cert[0], verify_hostname=False), opts(verify_cert=False)):
                peer = HttpPeer(origin.address, tls=True, sni="wrong.example", options=o)
                conn, _, body, _, _ = await fetch(connector, peer, b"/cl")
                assert body == b"hello world"
                connector.release(conn, True)
            # Different TLS settings never share a pooled connection.
            assert len(connector.pool) == 2
        finally:
            connector.close_all()
            await origin.close()
    run(main())


async def _answers_400(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


@pytest.mark.parametrize("origin,options,etype", [
    # a plaintext origin: the handshake fails (retryable)
    (_answers_400, {"total_connection_timeout": 5}, ErrorType.TLSHandshakeFailure),
    # one that never answers the ClientHello, with no total_connection_timeout: the handshake
    # gets connection_timeout (nginx's proxy_connect_timeout covers its SSL handshake too),
    # not asyncio's 60 s per attempt
    (_silent, {"connection_timeout": 0.3}, ErrorType.TLSHandshakeTimedout),
])
def test_tls_to_an_origin_that_speaks_no_tls_fails(run: Any, origin: Any, options: dict,
                                                   etype: ErrorType) -> None:
    async def main() -> None:
        server = await asyncio.start_server(origin, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connector = Connector()
        try:
            peer = HttpPeer(f"127.0.0.1:{port}", tls=True,
                            options=opts(verify_cert=False, **options))
            with pytest.raises(Error) as info:
                await asyncio.wait_for(connector.get(peer), 10)
            assert info.value.etype is etype, info.value
            assert info.value.retry
        finally:
            server.close()
    run(main())


def test_reuse_key() -> None:
    a = HttpPeer("127.0.0.1:80")
    assert a.reuse_key == HttpPeer("127.0.0.1:80").reuse_key
    assert a.reuse_key != HttpPeer("127.0.0.1:81").reuse_key
    assert a.reuse_key != HttpPeer("127.0.0.1:80", tls=True).reuse_key
    t1 = HttpPeer("127.0.0.1:443", tls=True, sni="a.example")
    assert t1.reuse_key != HttpPeer("127.0.0.1:443", tls=True, sni="b.example").reuse_key
    assert t1.reuse_key != HttpPeer("127.0.0.1:443", tls=True, sni="a.example",
                                    options=opts(verify_cert=False)).reuse_key
    assert HttpPeer("[::1]:8080").host == "::1"
    assert HttpPeer("unix:/tmp/x.sock").unix_path == "/tmp/x.sock"
    for bad in ("nope", "1.2.3.4:0", "1.2.3.4:x", "::1:80", "[::1]80", "unix:"):
        with pytest.raises(ValueError):
            HttpPeer(bad)
