"""The proxy engine end to end, in-process over loopback: client -> ProxyService -> origin.

Origins are the static service, the echo app, or small asyncio servers that misbehave on
purpose (silent, closing pooled connections, endless responses). Connection counts at the
origin prove upstream reuse and that nothing is retried when it must not be.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any, Awaitable, Callable, Optional

import pytest

from pyngora.config.schema import LimitsConf
from pyngora.errors import Error, ErrorType
from pyngora.headers import Headers
from pyngora.proxy import ProxyHttp, Session, http_proxy_service
from pyngora.proxy.engine import plan_for
from pyngora.services.http_app import Exchange, HttpApp
from pyngora.upstreams.peer import HttpPeer, PeerOptions

from tests.protocol.test_http_app import static
from tests.protocol.test_http_app_helpers import AppService, Client, EchoApp, run, serving


class ToPort(ProxyHttp):
    """Proxies everything to one local port."""

    def __init__(self, port: int, read_timeout: float = 10.0) -> None:
        self.port = port
        self.read_timeout = read_timeout

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return HttpPeer(f"127.0.0.1:{self.port}",
                        options=PeerOptions(read_timeout=self.read_timeout, connection_timeout=2))


def proxy_to(port: int, read_timeout: float = 10.0, **limits: Any) -> Any:
    return http_proxy_service(None, ToPort(port, read_timeout), limits=LimitsConf(**limits))


async def raw_origin(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter, int],
                                       Awaitable[None]]) -> tuple[asyncio.AbstractServer, list[int]]:
    """An origin whose ``handler(reader, writer, n)`` runs per connection (n = its index)."""
    conns: list[int] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = len(conns)
        conns.append(n)
        try:
            await handler(r, w, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, conns


def port_of(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


def test_keepalive_reuse_both_sides() -> None:
    async def main() -> None:
        origin_conns: list[int] = []
        async with serving(static(), accepted=origin_conns) as (oport, _):
            client_conns: list[int] = []
            async with serving(proxy_to(oport), accepted=client_conns) as (pport, pctx):
                c = await Client.connect(pport)
                for _ in range(5):
                    r = await c.request()
                    assert (r.status, r.body, r.header("x-origin")) == (200, b"hello", "yes")
                c.close()
                c = await Client.connect(pport)  # a new client connection, same pooled upstream
                assert (await c.request()).status == 200
                assert len(client_conns) == 2
                assert len(origin_conns) == 1
                c.close()
    run(main())


def test_pipelining_head_and_bodies_through_proxy() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            async with serving(proxy_to(oport)) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"GET /1 HTTP/1.1\r\nHost: t\r\nX-Delay: 0.1\r\n\r\n"
                             b"HEAD /2 HTTP/1.1\r\nHost: t\r\n\r\n"
                             b"POST /3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
                             b"GET /4 HTTP/1.1\r\nHost: t\r\n\r\n")
                r1 = await c.read_response()
                r2 = await c.read_response(head_request=True)
                r3 = await c.read_response()
                r4 = await c.read_response()
                assert r1.body == b"/1" and r2.header("content-length") == "2"
                assert r3.body == b"abcde" and r3.header("transfer-encoding") == "chunked"
                assert r4.body == b"/4"
                c.close()
    run(main())


def test_expect_100_continue_through_proxy() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            async with serving(proxy_to(oport)) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"PUT /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                             b"Expect: 100-continue\r\n\r\n")
                status, _, _ = await c.read_head()
                assert status == 100
                await c.send(b"hello")
                r = await c.read_response()
                assert r.status == 200 and r.body == b"hello"
                c.close()
    run(main())


def _ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


class WsOrigin(HttpApp):
    """A WebSocket-ish origin: checks the handshake, answers 101, then echoes raw bytes."""

    def handle(self, ex: Exchange) -> Any:
        return self._run(ex)

    async def _run(self, ex: Exchange) -> None:
        h = ex.head.headers
        assert h.get("upgrade") == b"websocket" and b"upgrade" in (h.get("connection") or b"").lower()
        key = h.get("sec-websocket-key") or b""
        ex.write_head(101, Headers([("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                    ("Sec-WebSocket-Accept", _ws_accept(key))]))
        t = ex.tunnel()
        while data := await t.read():
            t.write(data)
            await t.drain()
        t.write_eof()
        t.close()


def test_websocket_echo_tunnel() -> None:
    async def main() -> None:
        async with serving(AppService(WsOrigin())) as (oport, _):
            async with serving(proxy_to(oport)) as (pport, _):
                c = await Client.connect(pport)
                key = base64.b64encode(os.urandom(16))
                await c.send(b"GET /chat HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                             b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
                status, h, _ = await c.read_head()
                assert status == 101
                assert h.get("sec-websocket-accept") == _ws_accept(key)
                assert h.get("upgrade") == b"websocket"
                # A masked text frame "hi": bytes go through untouched both ways.
                frame = b"\x81\x82\x01\x02\x03\x04" + bytes([ord("h") ^ 1, ord("i") ^ 2])
                for _ in range(3):
                    await c.send(frame)
                    assert await c.reader.readexactly(len(frame)) == frame
                big = os.urandom(1 << 20)
                await c.send(big)
                assert await c.reader.readexactly(len(big)) == big
                c.writer.write_eof()
                assert await c.at_eof()
    run(main())


_SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\n\r\n")


def _half_closing(pushes: list[bytes], pause: float, saw: list[bytes],
                  ended: asyncio.Event) -> Any:
    """An origin that takes the upgrade, sends ``pushes`` (``pause`` s apart), half-closes,
    then keeps what the client still sends (``saw``) until the client's EOF (``ended``)."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(_SWITCHING)
        for data in pushes:
            w.write(data)
            if pause:
                await asyncio.sleep(pause)
        w.write_eof()
        while data := await r.read(65536):
            saw.append(data)
        ended.set()
    return handler


async def _upgraded_client(port: int) -> Client:
    """A client whose WebSocket upgrade the origin (behind the proxy on ``port``) took."""
    c = await Client.connect(port)
    await c.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\n\r\n")
    status, _h, _ = await c.read_head()
    assert status == 101
    return c


def test_tunnel_the_origin_half_closed_ends_when_the_client_stays_silent() -> None:
    """After the origin's FIN the client's direction goes on (half-close is forwarded), but
    its silence is bounded by read_timeout, or one client would hold both connections."""
    async def main() -> None:
        origin_saw: list[bytes] = []
        origin_eof = asyncio.Event()
        server, _ = await raw_origin(_half_closing([b"bye"], 0.0, origin_saw, origin_eof))
        async with serving(proxy_to(port_of(server), read_timeout=0.5)) as (pport, _):
            c = await _upgraded_client(pport)
            assert await c.reader.readexactly(3) == b"bye"
            assert await asyncio.wait_for(c.reader.read(), 5) == b""  # the origin's FIN
            await c.send(b"late")  # the client's direction still flows...
            for _ in range(200):
                if origin_saw:
                    break
                await asyncio.sleep(0.01)
            assert origin_saw == [b"late"]
            # ...until it stays silent past read_timeout: both connections end.
            await asyncio.wait_for(origin_eof.wait(), 5)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                for _ in range(100):
                    await c.send(b"x")
                    await asyncio.sleep(0.02)
        server.close()
    run(main())


def test_tunnel_a_client_silent_while_the_origin_pushed_may_still_answer_its_eof() -> None:
    """The client's silence counts from the origin's FIN, not from the tunnel's start: a
    client that only listened to a push stream still gets read_timeout to say goodbye."""
    async def main() -> None:
        origin_saw: list[bytes] = []
        done = asyncio.Event()
        # 0.9 s of pushing: longer than read_timeout
        server, _ = await raw_origin(_half_closing([b"tick"] * 6, 0.15, origin_saw, done))
        async with serving(proxy_to(port_of(server), read_timeout=0.5)) as (pport, _):
            c = await _upgraded_client(pport)
            assert await asyncio.wait_for(c.reader.read(), 5) == b"tick" * 6  # then EOF
            await c.send(b"goodbye")
            c.writer.write_eof()
            await asyncio.wait_for(done.wait(), 5)
            assert b"".join(origin_saw) == b"goodbye"
        server.close()
    run(main())


class EditsFraming(ToPort):
    """An upstream_request_filter that meddles with the body's framing fields."""

    async def upstream_request_filter(self, session: Session, up: Any, ctx: Any) -> None:
        target = session.req_header.uri
        if "cl1" in target:
            up.insert_header("Content-Length", "1")
        if "nocl" in target:
            up.remove_header("Content-Length")
        if "note" in target:
            up.remove_header("Transfer-Encoding")


@pytest.mark.parametrize("target,framing,body", [
    ("/cl1", b"Content-Length: 5", b"hello"),
    ("/nocl", b"Content-Length: 5", b"hello"),
    ("/note", b"Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n")])
def test_upstream_request_filter_cannot_unframe_the_body(target: str, framing: bytes,
                                                         body: bytes) -> None:
    """The body goes up framed as pyngora sends it, whatever the filter did to Content-Length
    or Transfer-Encoding: otherwise body bytes stay on the pooled connection and the origin
    reads them as the start of the next client's request."""
    async def main() -> None:
        origin = EchoApp()
        async with serving(AppService(origin)) as (oport, _):
            svc = http_proxy_service(None, EditsFraming(oport))
            async with serving(svc) as (pport, _):
                c = await Client.connect(pport)
                await c.send(f"POST {target} HTTP/1.1\r\nHost: t\r\n".encode() + framing +
                             b"\r\n\r\n" + body)
                r = await c.read_response()
                assert r.status == 200 and r.body == b"hello", (r.status, r.body)
                r = await c.request("GET", "/next")  # the same pooled upstream connection
                assert r.status == 200 and r.header("x-target") == "/next", r.status
        assert [ex.head.target for ex in origin.exchanges] == [target.encode(), b"/next"]
    run(main())


def test_read_timeout_starts_once_the_body_is_sent_not_during_a_slow_upload() -> None:
    """nginx's proxy_read_timeout starts when the request is sent: an origin that reads a big
    upload slowly but steadily for longer than read_timeout still answers (it got 504); once
    the body is up, its silence is bounded by read_timeout again."""
    size = 24 << 20

    async def slow_reader(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        got = reads = 0
        while got < size:
            got += len(await r.read(512 * 1024))
            reads += 1
            if reads <= 30:  # the origin's own pace: 1.5 s for the first 15 MB, then at once
                await asyncio.sleep(0.05)
        if n == 0:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        else:
            await r.read()  # the second origin never answers

    async def main() -> None:
        server, _ = await raw_origin(slow_reader)
        async with serving(proxy_to(port_of(server), read_timeout=1.0)) as (pport, _):
            for expect in (200, 504):
                c = await Client.connect(pport)
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                r = await asyncio.wait_for(c.request("POST", "/up", b"x" * size), 20)
                assert r.status == expect, (r.status, loop.time() - t0)
                assert loop.time() - t0 > 1.0  # longer than read_timeout either way
        server.close()
    run(main())


def test_an_answer_before_the_whole_body_was_read_is_a_success_not_a_client_gone() -> None:
    """An origin may answer (413, a redirect, ...) before it read the request body: the body's
    sender is stopped, and the request is a success for the logging phase, not the
    "downstream closed" a cancelled sender was mistaken for."""
    class Logs(ToPort):
        def __init__(self, port: int) -> None:
            super().__init__(port)
            self.errors: list[Optional[Error]] = []

        async def logging(self, session: Session, e: Optional[Error], ctx: Any) -> None:
            self.errors.append(e)

    async def early(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n")
        await w.drain()

    async def main() -> None:
        server, _ = await raw_origin(early)
        proxy = Logs(port_of(server))
        async with serving(http_proxy_service(None, proxy)) as (pport, _):
            c = await Client.connect(pport)
            await c.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n"
                         + b"x" * 65536)  # the rest never comes
            r = await c.read_response()
            assert r.status == 413
            for _ in range(500):
                if proxy.errors:
                    break
                await asyncio.sleep(0.01)
            assert proxy.errors == [None], proxy.errors
        server.close()
    run(main())


def test_upstream_refused_is_502_and_silent_is_504() -> None:
    async def main() -> None:
        # A port nobody listens on.
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead = port_of(srv)
        srv.close()
        await srv.wait_closed()
        async with serving(proxy_to(dead)) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request()
            assert r.status == 502 and r.body == b""
            assert r.header("cache-control") == "private, no-store"

        async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await r.read()  # never answers

        server, _ = await raw_origin(silent)
        async with serving(proxy_to(port_of(server), read_timeout=0.3)) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request()
            assert r.status == 504 and r.body == b""
        server.close()
    run(main())


async def _one_response_then_drop(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int,
                                  seen: list[bytes]) -> None:
    """Answers the first request of each connection with keep-alive; on the second request
    (head and body read) closes without a byte: what a server timing out keep-alive does."""
    count = 0
    while True:
        head = await r.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                await r.readexactly(int(line.split(b":")[1]))
        count += 1
        if count == 2:
            return
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()


def test_retry_on_dead_pooled_connection_but_not_post_with_body() -> None:
    async def main() -> None:
        seen: list[bytes] = []
        server, conns = await raw_origin(
            lambda r, w, n: _one_response_then_drop(r, w, n, seen))
        async with serving(proxy_to(port_of(server))) as (pport, _):
            c = await Client.connect(pport)
            assert (await c.request("GET", "/a")).status == 200
            # The pooled connection dies when used: a GET is retried on a new connection.
            r = await c.request("GET", "/b")
            assert r.status == 200 and r.body == b"ok"
            assert len(conns) == 2 and seen.count(b"GET /b HTTP/1.1") == 2
            # Now connection 2 is pooled; a POST with a body sent on it must not be retried.
            r = await c.request("POST", "/c", b"payload")
            assert r.status == 502
            assert len(conns) == 2 and seen.count(b"POST /c HTTP/1.1") == 1
        server.close()
    run(main())


def test_client_disconnect_mid_response_frees_upstream() -> None:
    async def main() -> None:
        closed = asyncio.Event()

        async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(100000):
                    w.write(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
                    await w.drain()
            except ConnectionError:
                closed.set()
            else:
                raise AssertionError("the proxy kept reading after the client left")

        server, conns = await raw_origin(endless)
        async with serving(proxy_to(port_of(server))) as (pport, pctx):
            c = await Client.connect(pport)
            await c.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            await c.read_head()
            await c.reader.readexactly(100000)
            c.writer.transport.abort()
            await asyncio.wait_for(closed.wait(), 10)
            assert len(pctx.state["connector"].pool) == 0
        server.close()
    run(main())


def test_malformed_and_limits_never_reach_upstream() -> None:
    async def main() -> None:
        origin_conns: list[int] = []
        async with serving(static(), accepted=origin_conns) as (oport, _):
            svc = proxy_to(oport, max_body_bytes=100, max_header_bytes=4096,
                           header_read_timeout_seconds=0.3)
            async with serving(svc) as (pport, _):
                for raw, status in [
                    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
                    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
                    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 5000 + b"\r\n\r\n", 431),
                    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n", 413),
                    (b"GET / HTTP/1.1\r\nHost: a\r\n", 408),
                ]:
                    c = await Client.connect(pport)
                    await c.send(raw)
                    r = await c.read_response()
                    assert r.status == status, raw
                    assert r.header("connection") == "close" and r.body == b""
                    assert await c.at_eof()
                assert origin_conns == []
    run(main())


def test_chunked_body_over_limit_midway_is_413() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            async with serving(proxy_to(oport, max_body_bytes=10)) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                             b"X-Full: 1\r\n\r\n8\r\n12345678\r\n")
                await asyncio.sleep(0.05)
                await c.send(b"8\r\n12345678\r\n")
                r = await c.read_response()
                assert r.status == 413
    run(main())


class Recorder(ProxyHttp):
    """Overrides every phase and records the order they run in."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls: list[str] = []

    def new_ctx(self) -> Any:
        self.calls.append("new_ctx")
        return {}

    async def early_request_filter(self, session: Session, ctx: Any) -> None:
        self.calls.append("early_request_filter")

    async def request_filter(self, session: Session, ctx: Any) -> bool:
        self.calls.append("request_filter")
        if session.req_header.uri == "/deny":
            await session.respond(403, b"no")
            return True
        return False

    async def proxy_upstream_filter(self, session: Session, ctx: Any) -> bool:
        self.calls.append("proxy_upstream_filter")
        return True

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        self.calls.append("upstream_peer")
        return HttpPeer(f"127.0.0.1:{self.port}")

    async def connected_to_upstream(self, session: Session, reused: bool, peer: HttpPeer,
                                    ctx: Any) -> None:
        self.calls.append("connected_to_upstream")

    async def fail_to_connect(self, session: Session, peer: HttpPeer, ctx: Any, e: Error) -> Error:
        self.calls.append("fail_to_connect")
        return e

    async def upstream_request_filter(self, session: Session, upstream_request: Any,
                                      ctx: Any) -> None:
        self.calls.append("upstream_request_filter")
        upstream_request.insert_header("X-Up", "1")

    def request_body_filter(self, session: Session, body: Optional[bytes], end: bool,
                            ctx: Any) -> Optional[bytes]:  # a plain def works too
        self.calls.append("request_body_filter")
        return body.upper() if body else body

    async def upstream_response_filter(self, session: Session, resp: Any, ctx: Any) -> None:
        self.calls.append("upstream_response_filter")

    async def response_filter(self, session: Session, resp: Any, ctx: Any) -> None:
        self.calls.append("response_filter")
        resp.insert_header("X-Down", "1")

    async def upstream_response_body_filter(self, session: Session, body: Optional[bytes],
                                            end: bool, ctx: Any) -> Optional[bytes]:
        self.calls.append("upstream_response_body_filter")
        return body

    async def response_body_filter(self, session: Session, body: Optional[bytes], end: bool,
                                   ctx: Any) -> Optional[bytes]:
        self.calls.append("response_body_filter")
        return body

    async def error_while_proxy(self, peer: HttpPeer, session: Session, e: Error, ctx: Any,
                                client_reused: bool) -> Error:
        self.calls.append("error_while_proxy")
        return e

    async def fail_to_proxy(self, session: Session, e: Error, ctx: Any) -> int:
        self.calls.append("fail_to_proxy")
        return await super().fail_to_proxy(session, e, ctx)

    async def logging(self, session: Session, e: Optional[Error], ctx: Any) -> None:
        self.calls.append("logging")

    def request_summary(self, session: Session, ctx: Any) -> str:
        self.calls.append("request_summary")
        return "summary"


def _dedupe(calls: list[str]) -> list[str]:
    out: list[str] = []
    for c in calls:
        if not out or out[-1] != c:
            out.append(c)
    return out


def test_phases_run_in_pingora_order() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            rec = Recorder(oport)
            async with serving(http_proxy_service(None, rec)) as (pport, _):
                c = await Client.connect(pport)
                r = await c.request("POST", "/x", b"abc")
                assert r.body == b"ABC" and r.header("x-down") == "1"
                assert _dedupe(rec.calls) == [
                    "new_ctx", "early_request_filter", "request_filter", "proxy_upstream_filter",
                    "upstream_peer", "connected_to_upstream", "upstream_request_filter",
                    "request_body_filter", "upstream_response_filter", "response_filter",
                    "upstream_response_body_filter", "response_body_filter",
                    "upstream_response_body_filter", "response_body_filter", "logging"]
                rec.calls.clear()
                r = await c.request("GET", "/deny")
                assert (r.status, r.body) == (403, b"no")
                assert rec.calls == ["new_ctx", "early_request_filter", "request_filter",
                                     "logging"]
                c.close()
            # Upstream down: fail_to_connect, then fail_to_proxy and logging.
            rec2 = Recorder(1)
            async with serving(http_proxy_service(None, rec2)) as (pport, _):
                c = await Client.connect(pport)
                r = await c.request("GET", "/")
                assert r.status == 502
                assert rec2.calls[-5:] == ["upstream_peer", "fail_to_connect", "fail_to_proxy",
                                           "request_summary", "logging"]
    run(main())


def test_async_phases_under_a_wrapping_decorator_are_awaited() -> None:
    """A timing/tracing decorator made with functools.wraps hides ``async def`` from
    iscoroutinefunction; its phases still return coroutines and must be awaited (an
    upstream_peer taken for a plain one went to the fast path, which got a coroutine)."""
    import functools

    def traced(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            return fn(*a, **k)
        return wrapper

    class Decorated(ProxyHttp):
        def __init__(self, port: int) -> None:
            self.port = port
            self.filtered = 0

        @traced
        async def request_filter(self, session: Session, ctx: Any) -> bool:
            self.filtered += 1
            return False

        @traced
        async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
            return HttpPeer(f"127.0.0.1:{self.port}")

    async def main() -> None:
        async with serving(static(b"hi")) as (oport, _):
            proxy = Decorated(oport)
            async with serving(http_proxy_service(None, proxy)) as (pport, _):
                c = await Client.connect(pport)
                for _ in range(2):
                    r = await c.request("GET", "/")
                    assert r.status == 200 and r.body == b"hi", r.status
            assert proxy.filtered == 2
        plan = plan_for(Decorated)
        assert plan.request_filter is True and plan.upstream_peer is True
    run(main())


def test_a_1xx_from_a_phase_is_informational_and_never_the_final_response() -> None:
    """Session.write_response_header(103) sends Early Hints and the origin's response still
    follows (Pingora's behaviour); a response_filter that makes the final status a 1xx gets
    500, never a 1xx the next pipelined response would then seem to answer."""
    from pyngora.headers import ResponseHeader

    class Hints(ToPort):
        async def request_filter(self, session: Session, ctx: Any) -> bool:
            if session.req_header.uri == "/error-103":
                raise Error.new(ErrorType.HTTPStatus, status=103)
            if session.req_header.uri == "/hints":
                await session.write_response_header(
                    ResponseHeader.build(103, [("Link", "</s.css>; rel=preload")]))
            return False

        async def response_filter(self, session: Session, resp: Any, ctx: Any) -> None:
            if session.req_header.uri == "/one-hundred":
                resp.set_status(100)

    async def main() -> None:
        async with serving(static(b"hi")) as (oport, _):
            async with serving(http_proxy_service(None, Hints(oport))) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"GET /hints HTTP/1.1\r\nHost: t\r\n\r\n"
                             b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await c.reader.readuntil(b"\r\n\r\n")).startswith(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n")
                for _ in range(2):  # the final response, then the pipelined one
                    r = await c.read_response()
                    assert r.status == 200 and r.body == b"hi", r.status
                c = await Client.connect(pport)
                r = await c.request("GET", "/one-hundred")
                assert r.status == 500 and r.body == b""
                c = await Client.connect(pport)
                r = await c.request("GET", "/error-103")  # Error.new(..., status=103)
                assert r.status == 500 and r.body == b""
    run(main())


def test_fail_to_proxy_status_and_logging_when_the_client_leaves_meanwhile() -> None:
    """fail_to_proxy returns the status it sent: one that sent nothing gets that status sent
    for it (0: the connection closes, no response); a client gone while it awaits still gets
    its logging phase, once."""
    class Failing(ProxyHttp):
        def __init__(self) -> None:
            self.logged: list[str] = []
            self.waiting = asyncio.Event()

        async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
            raise Error.new(ErrorType.ConnectRefused)

        async def fail_to_proxy(self, session: Session, e: Error, ctx: Any) -> int:
            uri = session.req_header.uri
            if uri == "/slow":
                self.waiting.set()
                await asyncio.sleep(30)  # the client leaves meanwhile: we are cancelled
            return 0 if uri == "/none" else 404

        async def logging(self, session: Session, e: Optional[Error], ctx: Any) -> None:
            self.logged.append(session.req_header.uri)

    async def main() -> None:
        proxy = Failing()
        async with serving(http_proxy_service(None, proxy)) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("GET", "/claims-404")
            assert r.status == 404 and r.body == b""
            c = await Client.connect(pport)
            await c.send(b"GET /none HTTP/1.1\r\nHost: t\r\n\r\n")
            assert await asyncio.wait_for(c.reader.read(), 5) == b""  # closed, no response
            c = await Client.connect(pport)
            await c.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.wait_for(proxy.waiting.wait(), 5)
            c.writer.close()
            for _ in range(500):
                if len(proxy.logged) == 3:
                    break
                await asyncio.sleep(0.01)
            assert proxy.logged == ["/claims-404", "/none", "/slow"]
    run(main())


def test_unoverridden_phases_are_not_called(monkeypatch: Any) -> None:
    plan = plan_for(ToPort)
    assert plan.upstream_peer is True
    for name in ("new_ctx", "request_filter", "upstream_request_filter", "response_filter",
                 "response_body_filter", "logging", "fail_to_proxy", "error_while_proxy"):
        assert getattr(plan, name) is None, name

    # Proof by behaviour: every default phase of the base class now raises if called; a
    # subclass overriding only upstream_peer still proxies (its plan is computed afresh).
    calls: list[str] = []
    for name in ("new_ctx", "early_request_filter", "request_filter", "proxy_upstream_filter",
                 "connected_to_upstream", "upstream_request_filter", "upstream_response_filter",
                 "response_filter", "upstream_response_body_filter", "response_body_filter",
                 "logging", "request_summary"):
        def boom(*a: Any, _n: str = name, **k: Any) -> Any:
            calls.append(_n)
            raise AssertionError(f"{_n} called")
        monkeypatch.setattr(ProxyHttp, name, boom)

    class Fresh(ToPort):
        pass

    async def main() -> None:
        async with serving(static()) as (oport, _):
            async with serving(http_proxy_service(None, Fresh(oport))) as (pport, _):
                c = await Client.connect(pport)
                r = await c.request()
                assert (r.status, r.body) == (200, b"hello")
    run(main())
    assert calls == []


def test_errors_map_to_statuses() -> None:
    class Failing(ProxyHttp):
        async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
            uri = session.req_header.uri
            if uri == "/503":
                raise Error.new(ErrorType.NoUpstream)
            if uri == "/418":
                raise Error.http_status(418)
            raise RuntimeError("bug")

    async def main() -> None:
        async with serving(http_proxy_service(None, Failing())) as (pport, _):
            for path, status in (("/503", 503), ("/418", 418), ("/bug", 500)):
                c = await Client.connect(pport)
                r = await c.request("GET", path)
                assert r.status == status and r.body == b""
                assert r.header("cache-control") == "private, no-store"
    run(main())


def test_a_failing_new_ctx_or_request_summary_still_gets_logging() -> None:
    """``logging`` runs always, last: a review found an async ``new_ctx`` that raised left its
    coroutine as ``ctx`` for the later phases, and a ``request_summary`` that raised skipped
    ``logging`` (and the access line) altogether."""
    seen: list[tuple[str, Any]] = []

    class Fragile(ProxyHttp):
        async def new_ctx(self) -> Any:
            raise RuntimeError("no ctx")

        async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
            raise AssertionError("not reached")

        async def fail_to_proxy(self, session: Session, e: Error, ctx: Any) -> int:
            seen.append(("fail_to_proxy", ctx))
            await session.respond_error(500)
            return 500

        def request_summary(self, session: Session, ctx: Any) -> str:
            raise RuntimeError("no summary")

        async def logging(self, session: Session, e: Optional[Error], ctx: Any) -> None:
            seen.append(("logging", ctx))

    async def main() -> None:
        async with serving(http_proxy_service(None, Fragile())) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("GET", "/")
            assert r.status == 500
    run(main())
    assert seen == [("fail_to_proxy", None), ("logging", None)], seen


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_a_body_filter_that_changes_the_length_never_desyncs_the_connection(change: str
                                                                             ) -> None:
    """A ``response_body_filter`` that changes the body but leaves Content-Length: the bytes
    on the wire still match the head (extra ones dropped; a short body cuts the connection),
    so the next response on the connection is never read as this one's body (or the reverse),
    as Pingora's body writer does."""
    class Filter(ToPort):
        def response_body_filter(self, session: Session, body: Optional[bytes],
                                 end_of_stream: bool, ctx: Any) -> Optional[bytes]:
            if body is None or session.req_header.uri != "/f":
                return body
            return body + b"EXTRA" if change == "grow" else body[:1]

    async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")

    async def main() -> None:
        server, _ = await raw_origin(origin)
        async with serving(http_proxy_service(None, Filter(port_of(server)))) as (pport, _):
            r, w = await asyncio.open_connection("127.0.0.1", pport)
            w.write(b"GET /f HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"GET /next HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            got = await asyncio.wait_for(r.read(), 10)  # to the proxy's close or its answers
            w.close()
        server.close()
        head, _, rest = got.partition(b"\r\n\r\n")
        assert b"Content-Length: 6" in head, got
        if change == "grow":  # the declared 6 bytes, then the next response, intact
            assert rest.startswith(b"hello\nHTTP/1.1 200 OK\r\n"), got
            assert rest.endswith(b"\r\n\r\nhello\n"), got
        else:  # 1 byte of 6, then the connection closed: the client sees it cut short
            assert rest == b"h", got
    run(main())


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_large_bodies_stream_with_flat_memory() -> None:
    """128 MiB up through the proxy and back down (echo origin), client reading slowly at
    first: the process's RSS must not grow by anything like the body size."""
    size = 128 * 1024 * 1024

    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            async with serving(proxy_to(oport)) as (pport, _):
                base = _rss_kb()
                peak = [base]
                stop = asyncio.Event()

                async def sample() -> None:
                    while not stop.is_set():
                        peak[0] = max(peak[0], _rss_kb())
                        await asyncio.sleep(0.05)

                sampler = asyncio.ensure_future(sample())
                r, w = await asyncio.open_connection("127.0.0.1", pport)
                w.write(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)

                async def send() -> None:
                    chunk = b"a" * (256 * 1024)
                    for _ in range(size // len(chunk)):
                        w.write(chunk)
                        await w.drain()

                sender = asyncio.ensure_future(send())
                await asyncio.sleep(0.5)  # let buffers fill up while nobody reads
                head = await r.readuntil(b"\r\n\r\n")
                assert b" 200 " in head and b"chunked" in head.lower()
                got = 0
                while True:
                    line = await r.readuntil(b"\r\n")
                    n = int(line, 16)
                    if n == 0:
                        await r.readuntil(b"\r\n")
                        break
                    got += len(await r.readexactly(n))
                    await r.readexactly(2)
                await sender
                stop.set()
                await sampler
                assert got == size
                grown_mb = (peak[0] - base) / 1024
                print(f"RSS growth while proxying {size >> 20} MiB both ways: {grown_mb:.1f} MiB")
                assert grown_mb < 48
                w.close()
    run(main(), timeout=60)


def test_hop_by_hop_fields_are_removed_both_ways() -> None:
    class HopOrigin(HttpApp):
        def handle(self, ex: Exchange) -> None:
            seen = b",".join(sorted(n.lower() for n, _ in ex.head.headers))
            ex.respond(200, Headers([("Connection", "X-Resp-Hop"), ("X-Resp-Hop", "1"),
                                     ("Keep-Alive", "timeout=5"), ("X-Kept", "1"),
                                     ("Proxy-Connection", "keep-alive")]), seen)
            return None

    async def main() -> None:
        async with serving(AppService(HopOrigin())) as (oport, _):
            async with serving(proxy_to(oport)) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Hop\r\n"
                             b"X-Hop: 1\r\nKeep-Alive: 300\r\nTE: trailers\r\n"
                             b"Proxy-Connection: x\r\nTrailer: X-T\r\nX-End: 1\r\n\r\n")
                r = await c.read_response()
                assert r.body == b"host,x-end"
                names = {n.lower() for n, _ in r.headers}
                assert b"x-kept" in names
                assert not names & {b"x-resp-hop", b"keep-alive", b"proxy-connection"}
                assert r.header("connection") is None  # keep-alive, HTTP/1.1: nothing to say
                c.close()
    run(main())


def test_trailers_both_ways_and_http10_client() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            async with serving(proxy_to(oport)) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"4\r\nwxyz\r\n0\r\nX-Checksum: 42\r\n\r\n")
                r = await c.read_response()
                assert r.body == b"wxyz" and r.trailers is not None
                assert r.trailers.get("x-checksum") == b"42"
                c.close()
                # HTTP/1.0 client, chunked upstream response: close-delimited downstream.
                c = await Client.connect(pport)
                await c.send(b"POST /t HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
                r = await c.read_response()
                assert r.status == 200 and r.body == b"abc"
                assert r.header("transfer-encoding") is None and r.header("connection") == "close"
    run(main())


def test_client_gone_while_waiting_for_upstream_closes_it() -> None:
    async def main() -> None:
        closed = asyncio.Event()

        async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await r.readuntil(b"\r\n\r\n")
            if await r.read() == b"":  # EOF: the proxy closed its upstream connection
                closed.set()

        server, _ = await raw_origin(silent)
        async with serving(proxy_to(port_of(server), read_timeout=30)) as (pport, pctx):
            c = await Client.connect(pport)
            await c.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.sleep(0.1)
            c.writer.transport.abort()
            await asyncio.wait_for(closed.wait(), 5)  # long before the 30 s read timeout
            assert len(pctx.state["connector"].pool) == 0
        server.close()
    run(main())
