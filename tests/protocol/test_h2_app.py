"""The downstream HTTP/2 connection (services/h2_app.py) behind the dispatcher
(services/h2_dispatch.py), in-process over real loopback sockets, with an h2-library client:
h2c and HTTP/1 on one listener, TLS + ALPN, bodies and trailers both ways, flow control as
back-pressure, client resets, too many streams, GOAWAY on draining with a stream in flight."""
from __future__ import annotations

import asyncio
import shutil
import ssl
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import h2.settings
import pytest
import uvloop

from pyngora.config.schema import LimitsConf, ListenerConf, TlsConf, parse_address
from pyngora.headers import Headers
from pyngora.protocols.h2 import H2Limits
from pyngora.protocols.tls import server_context
from pyngora.services.base import ConnectionTracker
from pyngora.services.h2_app import H2Exchange
from pyngora.services.h2_dispatch import protocol_factory
from pyngora.services.http_app import HttpApp, HttpSettings
from pyngora.services.static import StaticApp

from tests.protocol.test_h2_helpers import H2Client
from tests.support import self_signed_cert


def run(coro: Any, timeout: float = 25.0) -> Any:
    """On uvloop, as in the workers (its SSL transport and set_protocol are what run)."""
    return uvloop.run(asyncio.wait_for(coro, timeout))


class Metrics:
    def __init__(self) -> None:
        self.requests: list[int] = []
        self.opened = self.closed = 0

    def request_done(self, status: int, duration: float, req: int, resp: int) -> None:
        self.requests.append(status)

    def connection_opened(self) -> None:
        self.opened += 1

    def connection_closed(self) -> None:
        self.closed += 1


@asynccontextmanager
async def serving(app: HttpApp, listener: Optional[ListenerConf] = None,
                  limits: Optional[H2Limits] = None, ssl_ctx: Optional[ssl.SSLContext] = None,
                  **lim: Any) -> AsyncIterator[tuple[int, ConnectionTracker, Metrics]]:
    loop = asyncio.get_running_loop()
    listener = listener or parse_address("127.0.0.1:0", h2c=True)
    tracker = ConnectionTracker()
    metrics = Metrics()
    settings = HttpSettings(LimitsConf(**lim))
    factory = protocol_factory(app, settings, listener, tracker, metrics, loop, limits)
    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=ssl_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, tracker, metrics
    finally:
        server.close()
        tracker.abort_all()
        await server.wait_closed()


class EchoApp(HttpApp):
    """Echoes method, path and body; trailers come back as trailers. ``X-Gate`` makes the
    handler wait for ``gate`` first; ``cancelled`` counts handlers cancelled by a reset."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = 0
        self.max_buffered = 0
        self.read_delay = 0.0

    def handle(self, ex: H2Exchange) -> Any:  # type: ignore[override]
        return self._run(ex)

    async def _run(self, ex: H2Exchange) -> None:
        try:
            self.started.set()
            if ex.head.headers.get(b"x-gate"):
                await self.gate.wait()
            size = ex.head.headers.get(b"x-download")
            if size:
                ex.write_head(200, Headers([(b"Content-Length", size)]))
                chunk = b"d" * 65536
                left = int(size)
                while left:
                    n = min(left, len(chunk))
                    ex.write_body(chunk[:n])
                    left -= n
                    await ex.drain()
                ex.write_end()
                return
            parts = []
            total = 0
            while True:
                self.max_buffered = max(self.max_buffered, ex._buffered)
                data = await ex.read_body()
                if data is None:
                    break
                total += len(data)
                if ex.head.headers.get(b"x-count-only"):
                    if self.read_delay:
                        await asyncio.sleep(self.read_delay)
                    continue
                parts.append(data)
            body = b"".join(parts) if not ex.head.headers.get(b"x-count-only") else str(total).encode()
            h = Headers([(b"X-Method", ex.head.method), (b"X-Path", ex.head.target),
                         (b"X-Version", ex.head.version), (b"Connection", b"keep-alive"),
                         (b"X-Host", ex.head.headers.get(b"host") or b"")])
            ex.write_head(200, h)
            ex.write_body(body)
            await ex.drain()
            ex.write_end(ex.trailers)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def test_h2c_static_and_http1_on_the_same_listener() -> None:
    async def main() -> None:
        async with serving(StaticApp(200, (("X-Origin", "yes"),), "hello")) as (port, tr, m):
            c = await H2Client.connect(port)
            results = await asyncio.gather(*(c.request() for _ in range(20)))
            for r in results:
                assert (r.status, bytes(r.body), r.header(b"x-origin")) == (200, b"hello", b"yes")
                assert r.header(b"content-length") == b"5" and r.header(b"date")
            r = await c.request("HEAD")
            assert r.status == 200 and bytes(r.body) == b"" and r.ended
            assert len(tr) == 1
            # HTTP/1 on the same h2c listener
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(5) == b"hello"
            writer.close()
            await c.close()
            assert m.requests.count(200) == 22
    run(main())


def test_bodies_trailers_and_translation() -> None:
    async def main() -> None:
        app = EchoApp()
        async with serving(app) as (port, _, _m):
            c = await H2Client.connect(port)
            sid = c.start("POST", "/grpc.Svc/M?x=1", (("te", "trailers"),
                                                     ("content-type", "application/grpc")),
                          end=False)
            await c.send_body(sid, b"abc" * 1000, end=False)
            c.conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
            c.flush()
            r = await c.wait(sid)
            assert r.status == 200 and bytes(r.body) == b"abc" * 1000
            assert r.header(b"x-path") == b"/grpc.Svc/M?x=1" and r.header(b"x-version") == b"2"
            assert r.header(b"x-host") == b"test"
            assert r.header(b"connection") is None  # connection-specific: dropped
            assert r.trailers == [(b"grpc-status", b"0")]
            r = await c.request("GET", "/g")
            assert r.status == 200 and bytes(r.body) == b"" and not r.trailers
            await c.close()
    run(main())


def test_upload_10mb_with_small_window_is_back_pressured() -> None:
    async def main() -> None:
        app = EchoApp()
        app.read_delay = 0.0005
        lim = H2Limits(stream_window=65535, connection_window=65535)
        async with serving(app, limits=lim) as (port, _, _m):
            c = await H2Client.connect(port)
            size = 10 * 1024 * 1024
            sid = c.start("POST", "/up", (("x-count-only", "1"),), end=False)
            await c.send_body(sid, b"u" * size)
            r = await c.wait(sid, 30)
            assert r.status == 200 and bytes(r.body) == str(size).encode()
            # never more buffered than the window we advertised
            assert app.max_buffered <= 65535
            await c.close()
    run(main(), 40)


def test_download_waits_for_the_client_window() -> None:
    async def main() -> None:
        app = EchoApp()
        async with serving(app) as (port, _, _m):
            c = await H2Client.connect(port, auto_ack=False)
            size = 2 * 1024 * 1024
            sid = c.start("GET", "/down", (("x-download", str(size)),))
            s = c.streams[sid]
            # without WINDOW_UPDATEs only the initial 65535 bytes may come
            for _ in range(1000):
                if len(s.body) >= 65535:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert len(s.body) == 65535 and not s.ended
            c.auto_ack = True
            c.conn.acknowledge_received_data(len(s.body), sid)
            c.flush()
            r = await c.wait(sid)
            assert len(r.body) == size and r.ended
            await c.close()
    run(main())


def test_a_stream_whose_window_stays_shut_is_reset_after_send_timeout() -> None:
    """A client that never opens its window holds no stream (nor the upstream behind it) for
    ever: after send_timeout without a byte going out, RST_STREAM(CANCEL); the connection and
    its other streams go on."""
    async def main() -> None:
        app = EchoApp()
        async with serving(app, send_timeout_seconds=0.5) as (port, _, _m):
            c = await H2Client.connect(port, auto_ack=False)
            sid = c.start("GET", "/down", (("x-download", str(2 * 1024 * 1024)),))
            s = c.streams[sid]
            await asyncio.wait_for(s.done.wait(), 10)
            assert s.reset == 0x8 and len(s.body) == 65535 and not s.ended  # CANCEL
            c.auto_ack = True
            c.conn.increment_flow_control_window(len(s.body))  # the connection's window
            c.flush()
            r = await asyncio.wait_for(c.request("GET", "/after"), 10)
            assert r.status == 200
            await c.close()
    run(main())


def test_a_stream_body_that_stops_coming_gets_408() -> None:
    """HTTP/2 as HTTP/1 (nginx's client_body_timeout): a request whose DATA stops arriving
    gets 408 after body_read_timeout, its handler's read fails, and the connection goes on."""
    async def main() -> None:
        app = EchoApp()
        async with serving(app, body_read_timeout_seconds=0.5) as (port, _, _m):
            c = await H2Client.connect(port)
            sid = c.start("POST", "/up", end=False)
            await c.send_body(sid, b"x" * 100, end=False)  # and nothing more
            s = c.streams[sid]
            await asyncio.wait_for(s.done.wait(), 10)
            assert s.status == 408, s.headers
            r = await asyncio.wait_for(c.request("GET", "/after"), 10)
            assert r.status == 200
            await c.close()
    run(main())


def test_client_reset_mid_body_cancels_the_handler() -> None:
    async def main() -> None:
        app = EchoApp()
        async with serving(app) as (port, _, m):
            c = await H2Client.connect(port)
            sid = c.start("POST", "/", (("x-gate", "1"),), end=False)
            await c.send_body(sid, b"x" * 1000, end=False)
            await asyncio.wait_for(app.started.wait(), 10)
            c.reset(sid)
            for _ in range(500):
                if app.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert app.cancelled == 1
            # the connection is fine
            app.gate.set()
            r = await c.request("GET", "/after")
            assert r.status == 200
            await c.close()
    run(main())


def test_too_many_streams_are_refused_when_handlers_still_run() -> None:
    async def main() -> None:
        app = EchoApp()
        async with serving(app, limits=H2Limits(max_concurrent_streams=4)) as (port, _, _m):
            c = await H2Client.connect(port)
            await asyncio.sleep(0.05)  # settings exchanged
            sids = [c.start("GET", "/", (("x-gate", "1"),)) for _ in range(4)]
            await asyncio.wait_for(app.started.wait(), 10)
            # reset them: their handlers still run until the cancellation lands; nothing
            # here may make the server run more than 4 handlers at once
            for sid in sids:
                c.reset(sid)
            more = [c.start("GET", "/") for _ in range(4)]
            results = [await c.wait(s) for s in more]
            assert all(r.reset == 0x7 or r.status == 200 for r in results)
            app.gate.set()
            r = await c.request("GET", "/")
            assert r.status == 200
            await c.close()
    run(main())


def test_goaway_on_close_when_idle_lets_the_in_flight_stream_finish() -> None:
    async def main() -> None:
        app = EchoApp()
        async with serving(app) as (port, tracker, _m):
            c = await H2Client.connect(port)
            sid = c.start("POST", "/slow", (("x-gate", "1"),), end=False)
            await c.send_body(sid, b"payload")
            await asyncio.wait_for(app.started.wait(), 10)
            tracker.drain()  # what a draining worker does
            await asyncio.wait_for(c.goaway_event.wait(), 10)
            for _ in range(1000):  # the final GOAWAY follows the PING's ACK
                if len(c.goaways) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert [g.last_stream_id for g in c.goaways] == [2 ** 31 - 1, sid]
            assert all(g.error_code == 0 for g in c.goaways)
            assert not c.closed.is_set()
            app.gate.set()
            r = await c.wait(sid)
            assert r.status == 200 and bytes(r.body) == b"payload" and r.ended
            await asyncio.wait_for(c.closed.wait(), 10)  # then the server closes
            await asyncio.wait_for(tracker.wait_empty(), 10)
            await c.close()
    run(main())


def test_the_close_after_draining_lingers_so_late_client_frames_cause_no_reset() -> None:
    """After the final GOAWAY the server half-closes (FIN) and reads on until the client's
    EOF: a client still sending (WINDOW_UPDATEs while it reads the end of a response) would
    otherwise get a reset, and the kernel throws away what it had not read yet."""
    async def main() -> None:
        async with serving(StaticApp(200, (), "hi")) as (port, tracker, _m):
            c = await H2Client.connect(port)
            assert (await c.request()).status == 200
            tracker.drain()
            await asyncio.wait_for(c.closed.wait(), 10)  # the server's FIN
            assert len(tracker) == 1  # still open: lingering until our EOF
            ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
            for _ in range(5):  # a closed socket would answer the first with a reset
                c.writer.write(ping)
                await c.writer.drain()
                await asyncio.sleep(0.02)
            assert not c.writer.is_closing() and len(tracker) == 1
            c.writer.close()  # our EOF: the server closes too
            await asyncio.wait_for(tracker.wait_empty(), 10)
    run(main())


def test_idle_connection_drains_at_once_and_new_one_during_drain() -> None:
    async def main() -> None:
        async with serving(StaticApp(200, (), "hi")) as (port, tracker, _m):
            c = await H2Client.connect(port)
            assert (await c.request()).status == 200
            tracker.drain()
            await asyncio.wait_for(c.closed.wait(), 10)
            assert [g.error_code for g in c.goaways][-1] == 0
            await asyncio.wait_for(tracker.wait_empty(), 10)
            await c.close()
    run(main())


def test_app_errors_become_500_or_reset() -> None:
    class Failing(HttpApp):
        def handle(self, ex: H2Exchange) -> Any:  # type: ignore[override]
            if ex.head.target == b"/sync":
                raise RuntimeError("boom")
            return self._run(ex)

        async def _run(self, ex: H2Exchange) -> None:
            if ex.head.target == b"/mid":
                ex.write_head(200, Headers([(b"content-length", b"100")]))
                ex.write_body(b"partial")
                await ex.drain()
            raise RuntimeError("boom")

    async def main() -> None:
        async with serving(Failing()) as (port, _, _m):
            c = await H2Client.connect(port)
            r = await c.request("GET", "/sync")
            assert r.status == 500 and r.header(b"cache-control") == b"private, no-store"
            r = await c.request("GET", "/async")
            assert r.status == 500
            r = await c.request("GET", "/mid")
            assert r.reset == 0x2  # a truncated response must not look complete
            assert (await c.request("GET", "/sync")).status == 500
            await c.close()
    run(main())


def test_max_body_bytes_gives_413() -> None:
    async def main() -> None:
        app = EchoApp()
        async with serving(app, max_body_bytes=1000) as (port, _, _m):
            c = await H2Client.connect(port)
            r = await c.request("POST", "/", b"x" * 2000)
            assert r.status == 413
            r = await c.request("POST", "/", b"y" * 500)
            assert r.status == 200 and len(r.body) == 500
            await c.close()
    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")
def test_tls_alpn_picks_h2_or_http1(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, "h2.test")
    tls = TlsConf(cert=cert, key=key)
    listener = parse_address("127.0.0.1:0", tls=tls)

    async def main() -> None:
        app = StaticApp(200, (), "tls")
        async with serving(app, listener, ssl_ctx=server_context(tls)) as (port, _, _m):
            cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            cctx.check_hostname = False
            cctx.verify_mode = ssl.CERT_NONE
            cctx.set_alpn_protocols(["h2", "http/1.1"])
            c = await H2Client.connect(port, ssl_ctx=cctx, server_hostname="h2.test")
            r = await c.request()
            assert r.status == 200 and bytes(r.body) == b"tls"
            await c.close()
            cctx1 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            cctx1.check_hostname = False
            cctx1.verify_mode = ssl.CERT_NONE
            cctx1.set_alpn_protocols(["http/1.1"])
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx1,
                                                           server_hostname="h2.test")
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(3) == b"tls"
            writer.close()
            if shutil.which("curl"):
                for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
                    rc, out, err = await _exec("curl", "-sSk", flag, "-o", "-", "-w",
                                               "\n%{http_version}", f"https://127.0.0.1:{port}/")
                    assert rc == 0, err
                    assert out.split("\n") == ["tls", version], out
    run(main())


async def _exec(*argv: str, timeout: float = 25.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl missing")
def test_curl_http2_prior_knowledge() -> None:
    # One URL per curl: curl 7.88 fails to reuse an h2c prior-knowledge connection for a
    # second URL ("Error in the HTTP2 framing layer", nginx gets the same).
    async def main() -> None:
        async with serving(StaticApp(200, (), "curl")) as (port, _, _m):
            for path in ("/", "/again"):
                rc, out, err = await _exec("curl", "-sS", "--http2-prior-knowledge", "-o", "-",
                                           "-w", "\n%{http_version}",
                                           f"http://127.0.0.1:{port}{path}")
                assert rc == 0, err
                assert out.split("\n") == ["curl", "2"], out
            rc, out, err = await _exec("curl", "-sS", "--http2-prior-knowledge",
                                       "--data-binary", "@-", "-o", "-",
                                       f"http://127.0.0.1:{port}/post")
            assert rc == 0 and out == "curl", err
    run(main())


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_h2load_100_concurrent_streams_no_failures() -> None:
    async def main() -> None:
        async with serving(StaticApp(200, (), "x" * 100)) as (port, _, m):
            rc, out, err = await _exec("h2load", "-n", "2000", "-c", "4", "-m", "100",
                                       f"http://127.0.0.1:{port}/", timeout=60)
            assert rc == 0, err
            assert "2000 succeeded, 0 failed, 0 errored" in out, out
            assert "status codes: 2000 2xx" in out, out
            assert m.requests.count(200) == 2000
    run(main(), 70)


def test_preface_and_http1_split_across_reads_and_silent_clients() -> None:
    async def main() -> None:
        async with serving(StaticApp(200, (), "ok"), header_read_timeout_seconds=0.3) as (port, tr, _m):
            # HTTP/1 whose first bytes look like nothing yet
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"G")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"ET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            writer.close()
            # the HTTP/2 preface in pieces
            import h2.config
            import h2.connection
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":path", "/"),
                                  (":authority", "t")], end_stream=True)
            data = conn.data_to_send()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for piece in (data[:3], data[3:20], data[20:]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)
            got = b""
            while b"ok" not in got:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                assert chunk
                got += chunk
            writer.close()
            # a client that says nothing is closed after the header timeout, HTTP/1 or not
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            # an HTTP/2 client that sends only its preface gets GOAWAY, then EOF
            c = await H2Client.connect(port)
            await asyncio.wait_for(c.closed.wait(), 10)
            assert c.goaways and c.goaways[-1].error_code == 0
            await c.close()
            await asyncio.wait_for(tr.wait_empty(), 10)
    run(main())


def test_rapid_reset_flood_on_a_live_connection_gets_goaway() -> None:
    async def main() -> None:
        app = EchoApp()
        lim = H2Limits(max_concurrent_streams=20, max_premature_resets=30)
        async with serving(app, limits=lim) as (port, _, _m):
            c = await H2Client.connect(port)
            await asyncio.sleep(0.05)
            for _ in range(200):
                if c.goaway_event.is_set() or c.closed.is_set():
                    break
                sid = c.start("GET", "/", (("x-gate", "1"),))
                c.reset(sid)
                await asyncio.sleep(0)
            await asyncio.wait_for(c.closed.wait(), 10)
            assert c.goaways and c.goaways[-1].error_code == 0xB  # ENHANCE_YOUR_CALM
            await c.close()
    run(main())


def test_undecodable_header_block_gets_goaway_compression_error() -> None:
    """RFC 9113 4.3: a header block HPACK cannot decode is a connection error of type
    COMPRESSION_ERROR (the h2 library says PROTOCOL_ERROR); the stream before it is answered."""
    async def main() -> None:
        async with serving(EchoApp()) as (port, _, _m):
            c = await H2Client.connect(port)
            r = await c.request("GET", "/first")
            assert r.status == 200
            # HEADERS on stream 3 (END_STREAM | END_HEADERS): field index 255, in no table.
            c.writer.write(b"\x00\x00\x03\x01\x05\x00\x00\x00\x03" + b"\xff\x80\x01")
            await asyncio.wait_for(c.closed.wait(), 10)
            assert [g.error_code for g in c.goaways] == [0x9]
            assert c.goaways[0].last_stream_id == 1
            await c.close()
    run(main())


def test_expect_100_continue_and_early_hints() -> None:
    class Hints(HttpApp):
        def handle(self, ex: H2Exchange) -> Any:  # type: ignore[override]
            return self._run(ex)

        async def _run(self, ex: H2Exchange) -> None:
            ex.write_informational(103, Headers([(b"Link", b"</a.css>; rel=preload")]))
            body = await ex.read_full_body()
            ex.respond(200, Headers([(b"X-Len", str(len(body)).encode())]), body)

    async def main() -> None:
        async with serving(Hints()) as (port, _, _m):
            c = await H2Client.connect(port)
            sid = c.start("PUT", "/", (("expect", "100-continue"), ("content-length", "5")),
                          end=False)
            s = c.streams[sid]
            for _ in range(500):  # the client waits for 100 before sending its body
                if len(s.informational) == 2:
                    break
                await asyncio.sleep(0.01)
            statuses = [dict(h)[b":status"] for h in s.informational]
            assert statuses == [b"103", b"100"]
            assert dict(s.informational[0])[b"link"] == b"</a.css>; rel=preload"
            await c.send_body(sid, b"hello")
            r = await c.wait(sid)
            assert r.status == 200 and bytes(r.body) == b"hello" and r.header(b"x-len") == b"5"
            await c.close()
    run(main())
