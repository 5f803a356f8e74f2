"""The downstream HTTP/1 connection (services/http_app.py) and the static service, in-process
over real loopback sockets: keep-alive, pipelining order, HEAD, bodies both ways, 100-continue,
malformed requests, limits, timeouts, draining, upgrades, back-pressure."""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess

import pytest

from pyngora.config.schema import LimitsConf, ServiceConf, StaticConf
from pyngora.headers import Headers
from pyngora.services import http_app
from pyngora.services.http_app import Exchange, HttpApp
from pyngora.services.static import StaticService

from tests.protocol.test_http_app_helpers import AppService, Client, EchoApp, run, serving


def static(body: str = "hello", status: int = 200, **limits: object) -> StaticService:
    conf = ServiceConf("origin", "static", spec=StaticConf(
        status=status, headers=(("X-Origin", "yes"),), body=body, limits=LimitsConf(**limits)))
    return StaticService("origin", conf)


def test_static_keepalive_and_head() -> None:
    async def main() -> None:
        async with serving(static()) as (port, ctx):
            c = await Client.connect(port)
            for _ in range(3):
                r = await c.request()
                assert (r.status, r.body, r.header("x-origin")) == (200, b"hello", "yes")
                assert r.header("connection") is None and r.header("date")
            r = await c.request("HEAD")
            assert r.status == 200 and r.header("content-length") == "5"
            r = await c.request("GET")  # HEAD sent no body: the stream is still in step
            assert r.body == b"hello"
            assert len(ctx.connections) == 1
            c.close()
    run(main())


def test_static_discards_request_bodies_and_http10() -> None:
    async def main() -> None:
        async with serving(static()) as (port, _):
            c = await Client.connect(port)
            await c.send(b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n")
            r = await c.read_response()
            assert r.status == 200
            await c.send(b"3\r\nabc\r\n0\r\n\r\n")   # the rest of the body, dropped
            r = await c.request("POST", "/b", b"x" * 100000)
            assert r.body == b"hello"
            c.close()
            c = await Client.connect(port)
            await c.send(b"GET / HTTP/1.0\r\n\r\n")
            r = await c.read_response()
            assert r.status == 200 and r.header("connection") == "close"
            assert await c.at_eof()
            c = await Client.connect(port)
            await c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            r = await c.read_response()
            assert r.header("connection") == "keep-alive"
            r = await c.request()
            assert r.status == 200
    run(main())


def test_pipelining_answers_in_order() -> None:
    async def main() -> None:
        app = EchoApp()
        async with serving(AppService(app)) as (port, _):
            c = await Client.connect(port)
            # The first request is the slowest: its response must still come first.
            await c.send(b"GET /1 HTTP/1.1\r\nHost: t\r\nX-Delay: 0.2\r\n\r\n"
                         b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                         b"GET /3 HTTP/1.1\r\nHost: t\r\n\r\n")
            bodies = [(await c.read_response()).body for _ in range(3)]
            assert bodies == [b"/1", b"abc", b"/3"]
            c.close()
    run(main())


def test_chunked_upload_echo_with_trailers() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (port, _):
            c = await Client.connect(port)
            await c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Sum: 7\r\n\r\n")
            r = await c.read_response()
            assert r.body == b"abcdefg" and r.header("transfer-encoding") == "chunked"
            assert r.trailers is not None and r.trailers.get("x-sum") == b"7"
            c.close()
    run(main())


def test_expect_100_continue() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (port, _):
            c = await Client.connect(port)
            await c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            status, _, _ = await c.read_head()
            assert status == 100
            await c.send(b"body")
            r = await c.read_response()
            assert r.status == 200 and r.body == b"body"
            c.close()
        # The static service answers without reading: no 100, and the connection closes.
        async with serving(static()) as (port, _):
            c = await Client.connect(port)
            await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            r = await c.read_response()
            assert r.status == 200 and r.header("connection") == "close"
    run(main())


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                    # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 70000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n", 413),
])
def test_malformed_requests_get_error_and_close(raw: bytes, status: int) -> None:
    async def main() -> None:
        async with serving(static(max_body_bytes=1000)) as (port, _):
            c = await Client.connect(port)
            await c.send(raw)
            r = await c.read_response()
            assert r.status == status and r.body == b""
            assert r.header("cache-control") == "private, no-store"
            assert r.header("connection") == "close"
            assert await c.at_eof()
    run(main())


def test_chunked_body_over_limit_is_413_then_close() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp(), LimitsConf(max_body_bytes=10))) as (port, _):
            c = await Client.connect(port)
            await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                         b"X-Full: 1\r\n\r\n8\r\n12345678\r\n")
            await asyncio.sleep(0.05)
            await c.send(b"8\r\n12345678\r\n")
            r = await c.read_response()
            assert r.status == 413 and r.header("connection") == "close"
            assert await c.at_eof()
    run(main())


def test_header_timeout_408_and_idle_close() -> None:
    async def main() -> None:
        svc = static(header_read_timeout_seconds=0.3, keepalive_timeout_seconds=0.3)
        async with serving(svc) as (port, _):
            c = await Client.connect(port)
            await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # never finished
            r = await c.read_response()
            assert r.status == 408 and r.header("connection") == "close"
            assert await c.at_eof()
            c = await Client.connect(port)
            r = await c.request()
            assert r.status == 200
            # Idle keep-alive: closed silently.
            assert await c.at_eof()
            # Nothing sent at all: closed silently too.
            c = await Client.connect(port)
            assert await c.at_eof()
    run(main())


# TCP states (include/net/tcp_states.h), the first byte of struct tcp_info
_TCP_ESTABLISHED, _TCP_FIN_WAIT1, _TCP_FIN_WAIT2, _TCP_CLOSING = 1, 4, 5, 11


class _FinProbe(HttpApp):
    """Answers, then at once (same callback, no loop iteration in between) notes the TCP
    state of the server's socket: FIN_WAIT once its FIN went out, ESTABLISHED before."""

    def __init__(self) -> None:
        self.states: list[int] = []

    def handle(self, ex: Exchange) -> None:
        ex.respond(200, Headers([("Content-Type", "text/plain")]), b"bye")
        sock = ex.conn.transport.get_extra_info("socket")
        self.states.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0])


@pytest.mark.parametrize("request_close", [True, False])
def test_fin_goes_out_with_the_last_response(request_close: bool) -> None:
    """The server sends its FIN right after the last response (Connection: close from the
    client, or keepalive_requests reached), not an iteration later: so it closes first and
    keeps the TIME_WAIT, as nginx does, instead of leaving it to the client, whose next
    connect() pays for it. It still reads until the client's EOF (the lingering close)."""
    async def main() -> None:
        app = _FinProbe()
        limits = {} if request_close else {"keepalive_requests": 1}
        async with serving(AppService(app, LimitsConf(**limits))) as (port, ctx):
            loop = asyncio.get_running_loop()
            client = socket.create_connection(("127.0.0.1", port))
            client.setblocking(False)
            close = b"Connection: close\r\n" if request_close else b""
            await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: t\r\n" + close + b"\r\n")
            got = b""
            while chunk := await loop.sock_recv(client, 65536):  # up to the server's FIN
                got += chunk
            assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"bye"), got
            assert app.states and app.states[0] in (_TCP_FIN_WAIT1, _TCP_FIN_WAIT2,
                                                    _TCP_CLOSING), app.states
            assert len(ctx.connections) == 1  # lingering: still reading until the client's EOF
            client.close()
            while len(ctx.connections):
                await asyncio.sleep(0.01)
    run(main())


def test_keepalive_requests_limit() -> None:
    async def main() -> None:
        async with serving(static(keepalive_requests=2)) as (port, _):
            c = await Client.connect(port)
            assert (await c.request()).header("connection") is None
            assert (await c.request()).header("connection") == "close"
            assert await c.at_eof()
    run(main())


def test_close_when_idle_drains() -> None:
    async def main() -> None:
        app = EchoApp()
        async with serving(AppService(app)) as (port, ctx):
            idle = await Client.connect(port)
            await idle.request()
            busy = await Client.connect(port)
            await busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Delay: 0.3\r\n\r\n")
            for _ in range(100):
                if len(app.exchanges) == 2:
                    break
                await asyncio.sleep(0.01)
            ctx.connections.drain()
            assert await idle.at_eof()
            r = await busy.read_response()
            assert r.status == 200 and r.header("connection") == "close"
            assert await busy.at_eof()
            await asyncio.wait_for(ctx.connections.wait_empty(), 5)
    run(main())


def test_drain_answers_requests_on_their_way_on_idle_connections() -> None:
    """Keep-alive clients whose next request is on its way when the worker starts draining
    (in the kernel, in part read, or sent a moment later) get it answered, with Connection:
    close, not reset; a connection that stays idle is closed."""
    async def main() -> None:
        async with serving(static()) as (port, ctx):
            clients = [await Client.connect(port) for _ in range(4)]
            kernel, partial, later, idle = clients
            for c in clients:
                assert (await c.request()).status == 200
            await partial.send(b"GET /half HTTP/1.1\r\nHost: t\r\n")
            conn = next(x for x in ctx.connections._conns if x.client_addr ==
                        partial.writer.get_extra_info("sockname"))
            while not conn.parser.in_message:  # the loop has read the half head
                await asyncio.sleep(0.001)
            # No await from here to the drain: the loop cannot read what is written.
            kernel.writer.write(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
            assert kernel.writer.transport.get_write_buffer_size() == 0  # in the kernel
            ctx.connections.drain()
            await later.send(b"GET /later HTTP/1.1\r\nHost: t\r\n\r\n")
            await partial.send(b"\r\n")  # the rest of the head that was in part read
            for c in (kernel, partial, later):
                r = await c.read_response()
                assert (r.status, r.body, r.header("connection")) == (200, b"hello", "close")
                assert await c.at_eof()
            assert await idle.at_eof()
            await asyncio.wait_for(ctx.connections.wait_empty(), 5)
    run(main())


def test_drain_closes_a_connection_that_sent_only_a_stray_crlf() -> None:
    """A CRLF after a request (some clients send one after a body) starts no request: the
    draining worker closes the connection after its grace, without a 408."""
    async def main() -> None:
        async with serving(static()) as (port, ctx):
            c = await Client.connect(port)
            assert (await c.request()).status == 200
            await c.send(b"\r\n")
            conn = next(iter(ctx.connections._conns))
            while conn._state != http_app._S_HEAD:  # the loop has read the CRLF
                await asyncio.sleep(0.001)
            assert not conn.parser.in_message
            ctx.connections.drain()
            # The header timeout (10 s) would answer 408 first; the drain grace closes at 1 s.
            assert await asyncio.wait_for(c.reader.read(), 5) == b""
            await asyncio.wait_for(ctx.connections.wait_empty(), 5)
    run(main())


def test_app_exception_gives_500() -> None:
    class Boom(HttpApp):
        async def _run(self, ex: Exchange) -> None:
            raise RuntimeError("boom")

        def handle(self, ex: Exchange):  # type: ignore[no-untyped-def]
            return self._run(ex)

    async def main() -> None:
        async with serving(AppService(Boom())) as (port, _):
            c = await Client.connect(port)
            r = await c.request()
            assert r.status == 500 and r.header("connection") == "close"
    run(main())


def test_upgrade_tunnel_echo() -> None:
    class Upgrader(HttpApp):
        def handle(self, ex: Exchange):  # type: ignore[no-untyped-def]
            return self._run(ex)

        async def _run(self, ex: Exchange) -> None:
            ex.write_head(101, Headers([("Upgrade", "echo"), ("Connection", "Upgrade")]))
            t = ex.tunnel()
            while True:
                data = await t.read()
                if not data:
                    break
                t.write(data.upper())
                await t.drain()
            t.close()

    async def main() -> None:
        async with serving(AppService(Upgrader())) as (port, _):
            c = await Client.connect(port)
            await c.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                         b"Upgrade: echo\r\n\r\nearly")
            status, _, _ = await c.read_head()
            assert status == 101
            assert await c.reader.readexactly(5) == b"EARLY"
            await c.send(b"more")
            assert await c.reader.readexactly(4) == b"MORE"
            c.writer.write_eof()
            assert await c.at_eof()
    run(main())


def test_refused_upgrade_closes_at_the_clients_eof(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade request answered without 101: the connection closes after the response
    (nothing after the request head is parsed) and, like any lingering close, as soon as the
    client's EOF arrives -- not when the linger timer fires (here 60 s, past the test's 10 s)."""
    monkeypatch.setattr(http_app, "LINGER_SECONDS", 60.0)

    class Refuser(HttpApp):
        def handle(self, ex: Exchange):  # type: ignore[no-untyped-def]
            ex.respond(403, Headers(), b"no")

    async def main() -> None:
        async with serving(AppService(Refuser())) as (port, ctx):
            c = await Client.connect(port)
            await c.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                         b"Upgrade: echo\r\n\r\nearly")
            r = await c.read_response()
            assert r.status == 403 and r.header("connection") == "close"
            assert await c.at_eof()
            assert len(ctx.connections) == 1  # lingering: reading until the client's EOF
            c.writer.write_eof()
            await asyncio.wait_for(ctx.connections.wait_empty(), 10)
    run(main())


def test_a_client_that_reads_nothing_is_let_go_after_send_timeout() -> None:
    """nginx's send_timeout: the write buffer full for that long, the connection is closed,
    and the handler's drain fails (a proxy then closes its upstream connection)."""
    failed: list[BaseException] = []

    class Firehose(HttpApp):
        def handle(self, ex: Exchange):  # type: ignore[no-untyped-def]
            return self._run(ex)

        async def _run(self, ex: Exchange) -> None:
            ex.write_head(200, Headers([("Content-Length", str(1 << 30))]))
            try:
                while True:
                    ex.write_body(b"x" * 65536)
                    await ex.drain()
            except BaseException as e:  # the drain's error, or the cancel of a lost client
                failed.append(e)
                raise

    async def main() -> None:
        async with serving(AppService(Firehose(), LimitsConf(send_timeout_seconds=0.5))) \
                as (port, ctx):
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # and never reads
            await asyncio.wait_for(ctx.connections.wait_empty(), 15)
            while not failed:  # the handler is stopped (bounded by run()'s own timeout)
                await asyncio.sleep(0.01)
            client.close()
    run(main())


def test_a_body_that_stops_coming_gets_408_and_a_closed_connection() -> None:
    """nginx's client_body_timeout: a request announcing a body that stops arriving (a
    slowloris after the head) gets 408 and the connection closes; the handler's read fails."""
    failed: list[BaseException] = []

    class Reader(HttpApp):
        def handle(self, ex: Exchange):  # type: ignore[no-untyped-def]
            return self._run(ex)

        async def _run(self, ex: Exchange) -> None:
            try:
                while await ex.read_body() is not None:
                    pass
            except Exception as e:
                failed.append(e)
                raise
            ex.respond(200, Headers(), b"read")

    async def main() -> None:
        limits = LimitsConf(body_read_timeout_seconds=0.5)
        async with serving(AppService(Reader(), limits)) as (port, ctx):
            c = await Client.connect(port)
            await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
            r = await asyncio.wait_for(c.read_response(), 10)
            assert r.status == 408 and r.header("connection") == "close"
            assert await c.at_eof()
            await asyncio.wait_for(ctx.connections.wait_empty(), 10)
            assert failed and "timed out" in str(failed[0])
    run(main())


def test_the_rest_of_a_body_nobody_reads_is_waited_for_only_so_long() -> None:
    """Answered before its body came (the static service does that): the rest is read and
    dropped, but a client that stops sending it is let go after the body timeout (the
    connection used to stay open for ever)."""
    async def main() -> None:
        svc = static(body_read_timeout_seconds=0.5)
        async with serving(svc) as (port, ctx):
            c = await Client.connect(port)
            await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
            r = await asyncio.wait_for(c.read_response(), 10)
            assert r.status == 200
            await asyncio.wait_for(ctx.connections.wait_empty(), 10)
            assert await c.at_eof()
    run(main())


def test_a_client_waiting_for_100_continue_is_not_timed_out() -> None:
    """With ``Expect: 100-continue`` the client sends nothing until our 100, which goes out on
    the handler's first read: a handler that reads late (a proxy dialling its upstream) is no
    reason for a 408, and the client gets the whole body timeout after the 100."""
    async def main() -> None:
        limits = LimitsConf(body_read_timeout_seconds=0.5)
        async with serving(AppService(EchoApp(), limits)) as (port, _):
            c = await Client.connect(port)
            await c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nX-Delay: 1.2\r\n"
                         b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            status, _, _ = await asyncio.wait_for(c.read_head(), 10)
            assert status == 100
            await c.send(b"hello")
            r = await asyncio.wait_for(c.read_response(), 10)
            assert r.status == 200 and r.body == b"hello"
    run(main())


@pytest.mark.parametrize("case", ["end with a length", "not a length"])
def test_a_response_head_that_lies_about_its_length_never_desyncs(case: str) -> None:
    """A head that ends the response but promises a body closes the connection (the client
    sees it short); a Content-Length that is no number is dropped and the body is chunked."""
    class Liar(HttpApp):
        def handle(self, ex: Exchange):  # type: ignore[no-untyped-def]
            if case == "end with a length":
                ex.write_head(200, Headers([("Content-Length", "5")]), end=True)
            else:
                ex.write_head(200, Headers([("Content-Length", "5x")]))
                ex.write_body(b"seven b")
                ex.write_end()

    async def main() -> None:
        async with serving(AppService(Liar())) as (port, _):
            c = await Client.connect(port)
            await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, h, _ = await asyncio.wait_for(c.read_head(), 10)
            if case == "end with a length":
                assert h.get("connection") == b"close"
                assert await c.at_eof()
            else:
                assert h.get("content-length") is None
                assert h.get("transfer-encoding") == b"chunked"
                assert await asyncio.wait_for(c.reader.readuntil(b"0\r\n\r\n"), 10) == \
                    b"7\r\nseven b\r\n0\r\n\r\n"
    run(main())


def test_request_body_backpressure_bounds_buffering() -> None:
    """An app that does not read: the connection stops reading at the high-water mark, so the
    client's sends block (kernel buffers full) instead of the server buffering the body."""
    got: list[Exchange] = []

    class Stalled(HttpApp):
        def __init__(self) -> None:
            self.go: asyncio.Event | None = None

        def handle(self, ex: Exchange):  # type: ignore[no-untyped-def]
            got.append(ex)
            return self._run(ex)

        async def _run(self, ex: Exchange) -> None:
            assert self.go is not None
            await self.go.wait()
            n = 0
            while (data := await ex.read_body()) is not None:
                n += len(data)
            ex.respond(200, Headers(), str(n).encode())

    async def main() -> None:
        app = Stalled()
        app.go = asyncio.Event()
        total = 64 * 1024 * 1024
        async with serving(AppService(app)) as (port, _):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % total)
            chunk = b"z" * 65536
            sent = 0
            stalls = 0
            # Push until the kernel refuses more several times in a row (server not reading).
            while sent < total and stalls < 20:
                try:
                    sent += sock.send(chunk)
                    stalls = 0
                except BlockingIOError:
                    stalls += 1
                    await asyncio.sleep(0.02)
            assert sent < total, "the whole body went in: nothing pushed back"
            assert got and got[0]._buffered <= http_app.BODY_HIGH_WATER + 256 * 1024
            app.go.set()
            await loop.sock_sendall(sock, b"z" * (total - sent))
            data = b""
            while not data.endswith(str(total).encode()):
                more = await loop.sock_recv(sock, 65536)
                assert more
                data += more
            sock.close()
    run(main(), timeout=30)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_reuses_connection() -> None:
    async def main() -> None:
        async with serving(static()) as (port, _):
            url = f"http://127.0.0.1:{port}/"
            proc = await asyncio.create_subprocess_exec(
                "curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n",
                url, url,
                stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            assert out.decode().split("\n")[:2] == ["200 1", "200 0"]
    run(main())
