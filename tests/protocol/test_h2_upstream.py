"""HTTP/2 to upstreams (issue 6 point 4), in-process over real loopback sockets: HTTP/1 and
h2c clients -> ProxyService -> an HTTP/2 origin written with the h2 library."""
from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import pytest

from pyngora.protocols import h2_client
from tests.protocol.test_h2_helpers import H2Client
from tests.protocol.test_h2_upstream_origin import H2Origin, ToH2, proxy_to, server_tls
from tests.protocol.test_http_app import static
from tests.protocol.test_http_app_helpers import Client, run, serving
from tests.support import free_port


def test_requests_bodies_and_headers_over_h2() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port) as (port, app):
                c = await Client.connect(port)
                r = await c.request("GET", "/echo?x=1", headers=(("X-Custom", "v"),
                                                                  ("Connection", "keep-alive")))
                assert r.status == 200 and r.body == b""
                assert r.header("x-got-x-custom") == "v"
                assert r.header("x-got-authority") == "t"  # Host -> :authority
                assert r.header("x-got-connection") is None and r.header("x-got-host") is None
                body = bytes(range(256)) * 1000
                r = await c.request("POST", "/echo", body)
                assert r.status == 200 and r.body == body
                assert r.header("x-got-content-length") == str(len(body))
                # chunked upload with trailers: trailers go up, and come back
                await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                             b"TE: trailers\r\n\r\n5\r\nhello\r\n0\r\nX-Req-Trailer: 1\r\n\r\n")
                r = await c.read_response()
                assert r.status == 200 and r.body == b"hello"
                assert r.trailers is not None and r.trailers.get("x-trailer-back") == b"yes"
                assert origin.seen[-1]["trailers"] == {b"x-req-trailer": b"1"}
                assert origin.seen[-1]["headers"].get(b"te") == b"trailers"
                r = await c.request("HEAD", "/echo")
                assert r.status == 200
                c.close()
                # every request so far went over one multiplexed connection
                assert len(origin.conns) == 1
        finally:
            origin.close()
    run(main())


def test_max_concurrent_streams_opens_another_connection() -> None:
    async def main() -> None:
        origin = await H2Origin(max_streams=2).start()
        try:
            async with proxy_to(origin.port) as (port, app):
                clients = [await Client.connect(port) for _ in range(5)]
                tasks = [asyncio.ensure_future(c.request("GET", "/slow")) for c in clients]
                for _ in range(500):  # bounded: until all five reached the origin
                    if len(origin.seen) == 5:
                        break
                    await asyncio.sleep(0.01)
                assert len(origin.seen) == 5
                assert len(origin.conns) == 3  # 2 + 2 + 1
                assert all(c.max_active <= 2 for c in origin.conns)
                origin.release.set()
                for r in await asyncio.gather(*tasks):
                    assert r.status == 200
                # later requests reuse the pooled connections, no new dial
                for c in clients:
                    assert (await c.request("GET", "/echo")).status == 200
                    c.close()
                assert len(origin.conns) == 3
        finally:
            origin.close()
    run(main())


def test_goaway_refused_stream_is_retried_and_in_flight_ones_finish() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port) as (port, app):
                c1, c2 = await Client.connect(port), await Client.connect(port)
                # stream 1 is in flight when the origin says GOAWAY(last=1) on stream 3
                t1 = asyncio.ensure_future(c1.request("GET", "/slow"))
                for _ in range(500):
                    if origin.seen:
                        break
                    await asyncio.sleep(0.01)
                t2 = asyncio.ensure_future(c2.request("POST", "/goaway", b"not idempotent"))
                for _ in range(500):
                    if len(origin.conns) == 2 and len(origin.seen) == 3:
                        break
                    await asyncio.sleep(0.01)
                assert origin.goaways == 1
                assert len(origin.conns) == 2  # the refused POST went to a new connection
                origin.release.set()
                r1, r2 = await asyncio.gather(t1, t2)
                assert r1.status == 200 and r2.status == 200
                assert r2.body == b"not idempotent"
                # no new stream goes to the connection that said GOAWAY
                assert (await c1.request("GET", "/echo")).status == 200
                assert len(origin.conns[0].requests) == 2
                c1.close()
                c2.close()
        finally:
            origin.close()
    run(main())


def test_refused_stream_is_retried() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port) as (port, app):
                c = await Client.connect(port)
                r = await c.request("POST", "/refuse", b"payload")
                assert r.status == 200 and r.body == b"payload"
                assert len(origin.seen) == 2
                c.close()
        finally:
            origin.close()
    run(main())


def test_graceful_goaway_lets_the_stream_finish() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port) as (port, app):
                c = await Client.connect(port)
                t = asyncio.ensure_future(c.request("GET", "/drain-goaway"))
                for _ in range(500):
                    if origin.goaways:
                        break
                    await asyncio.sleep(0.01)
                origin.release.set()
                r = await t
                assert r.status == 200
                r = await c.request("GET", "/echo")  # a new connection
                assert r.status == 200 and len(origin.conns) == 2
                c.close()
        finally:
            origin.close()
    run(main())


def test_flow_control_is_back_pressure_both_ways() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port) as (port, app):
                # download: a client that does not read stops the origin (windows closed)
                total = 16 * 1024 * 1024
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
                s.setblocking(False)
                await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
                r, w = await asyncio.open_connection(sock=s, limit=64 * 1024)
                w.write(f"GET /big?{total} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                await asyncio.wait_for(origin.blocked.wait(), 15)
                # the origin's windows closed long before the whole body was sent
                assert origin.sent < total // 2
                head = await r.readuntil(b"\r\n\r\n")
                assert b"200" in head.split(b"\r\n")[0]
                got = 0
                while got < total:
                    data = await r.read(1 << 20)
                    assert data
                    got += len(data)
                assert got == total
                w.close()
                # upload: an origin that does not read stops the proxy from sending
                origin.ack_body = False
                c = await Client.connect(port)
                body = b"u" * (2 * 1024 * 1024)
                t = asyncio.ensure_future(c.request("POST", "/echo", body))
                for _ in range(500):
                    if sum(n for _, n, _ in origin.unacked) >= 65535 - 1:
                        break
                    await asyncio.sleep(0.01)
                received = sum(n for _, n, _ in origin.unacked)
                assert received <= 65535  # the origin's stream window, nothing more
                origin.ack_body = True
                origin.ack_all()
                resp = await asyncio.wait_for(t, 15)
                assert resp.status == 200 and len(resp.body) == len(body)
                c.close()
        finally:
            origin.close()
    run(main(), timeout=40)


def test_h2_downstream_to_h2_upstream_many_streams() -> None:
    async def main() -> None:
        origin = await H2Origin(max_streams=10).start()
        try:
            async with proxy_to(origin.port) as (port, app):
                h = await H2Client.connect(port)
                results = await asyncio.gather(*(h.request("POST", f"/echo?{i}", b"b%d" % i)
                                                 for i in range(30)))
                for i, res in enumerate(results):
                    assert res.status == 200 and bytes(res.body) == b"b%d" % i
                assert len(origin.conns) <= 3 and origin.max_active <= 10
                await h.close()
        finally:
            origin.close()
    run(main())


def test_client_side_translation() -> None:
    fields = h2_client.request_fields(
        b"GET", b"/p", b"http", b"fallback:1",
        [(b"Host", b"example"), (b"Connection", b"x"), (b"TE", b"trailers"),
         (b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")], te_trailers=True)
    assert fields == [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example"),
                      (b":path", b"/p"), (b"te", b"trailers"), (b"x-a", b"1")]
    fields = h2_client.request_fields(b"GET", b"/", b"https", b"a:443", [])
    assert (b":authority", b"a:443") in fields and not any(n == b"te" for n, _ in fields)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the certificate")
def test_tls_upstream_with_alpn_h2(tmp_path: Path) -> None:
    async def main() -> None:
        origin = await H2Origin(ssl_ctx=server_tls(tmp_path)).start()
        h1_only = await H2Origin(ssl_ctx=server_tls(tmp_path, ("http/1.1",))).start()
        try:
            async with proxy_to(origin.port, ToH2(origin.port, tls=True)) as (port, app):
                c = await Client.connect(port)
                for _ in range(3):
                    r = await c.request("POST", "/echo", b"over tls")
                    assert r.status == 200 and r.body == b"over tls"
                    assert r.header("x-got-authority") == "t"
                assert len(origin.conns) == 1
                c.close()
            # an upstream that does not choose h2 by ALPN: 502, no hang
            async with proxy_to(h1_only.port, ToH2(h1_only.port, tls=True)) as (port, app):
                c = await Client.connect(port)
                r = await c.request("GET", "/echo")
                assert r.status == 502
                c.close()
        finally:
            origin.close()
            h1_only.close()
    run(main())


class _Short(ToH2):
    async def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        peer = await super().upstream_peer(session, ctx)
        peer.options.read_timeout = 0.5
        return peer


def test_not_h2_upstream_is_502_and_a_silent_one_504() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with serving(static("plain http/1")) as (h1_port, _):
                async with proxy_to(h1_port) as (port, app):
                    c = await Client.connect(port)
                    r = await asyncio.wait_for(c.request("GET", "/"), 10)
                    assert r.status == 502
                    c.close()
            # several requests sharing one failing dial all get their answer
            async with proxy_to(free_port()) as (port, app):
                cs = [await Client.connect(port) for _ in range(3)]
                rs = await asyncio.wait_for(asyncio.gather(*(c.request("GET", "/") for c in cs)),
                                            10)
                assert [r.status for r in rs] == [502, 502, 502]
                for c in cs:
                    c.close()
            async with proxy_to(origin.port, _Short(origin.port)) as (port, app):
                c = await Client.connect(port)
                r = await asyncio.wait_for(c.request("GET", "/slow"), 10)
                assert r.status == 504
                c.close()
                # the stream was reset, the connection stays usable for the next request
                c = await Client.connect(port)
                r = await c.request("GET", "/echo")
                assert r.status == 200 and len(origin.conns) == 1
                assert 0x8 in origin.resets  # CANCEL
                c.close()
        finally:
            origin.release.set()
            origin.close()
    run(main())


def test_a_status_that_is_no_three_digit_code_is_502() -> None:
    """RFC 9110 15: three digits, 100-599; HTTP/2 has no 101 (RFC 9113 8.6). Anything else
    is a malformed response, a stream error: 502 for the client, the stream reset."""
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port) as (port, app):
                c = await Client.connect(port)
                for status in ("2000", "20", "099", "101", "600", "+200"):
                    r = await asyncio.wait_for(c.request("GET", f"/status?{status}"), 10)
                    assert r.status == 502, (status, r.status)
                    c.close()
                    c = await Client.connect(port)
                r = await asyncio.wait_for(c.request("GET", "/status?204"), 10)
                assert r.status == 204
                c.close()
        finally:
            origin.close()
    run(main())


def test_client_gone_mid_response_resets_only_its_stream() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port) as (port, app):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET /big?8000000 HTTP/1.1\r\nHost: t\r\n\r\n")
                await r.readuntil(b"\r\n\r\n")
                w.close()  # the client leaves mid-response
                for _ in range(500):
                    if 0x8 in origin.resets:
                        break
                    await asyncio.sleep(0.01)
                assert 0x8 in origin.resets  # RST_STREAM CANCEL for that stream only
                c = await Client.connect(port)
                r2 = await c.request("GET", "/echo")
                assert r2.status == 200 and len(origin.conns) == 1
                c.close()
        finally:
            origin.close()
    run(main())


def test_the_preface_goes_first_even_when_the_upstream_spoke_before_we_started() -> None:
    """RFC 9113 3.4: the client preface is the first thing on the connection. An upstream
    sends its SETTINGS as soon as it accepts (nginx, Go, hyper do); when they arrive before the
    session started, h2 must not be fed them yet, or it queues a SETTINGS ACK that goes out
    ahead of the preface and the upstream drops the connection (a third of new h2c
    connections failed so on a loaded machine)."""
    from pyngora.protocols.h2 import PREFACE
    from pyngora.upstreams.dial import dial
    from pyngora.upstreams.h2_connector import H2Connector, H2Session
    from pyngora.upstreams.peer import HttpPeer

    async def main() -> None:
        first = asyncio.get_running_loop().create_future()

        async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS (empty), at once
            try:
                first.set_result(await r.readexactly(len(PREFACE)))
                await r.read()
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                if not first.done():
                    first.set_exception(e)
            w.close()

        server = await asyncio.start_server(origin, "127.0.0.1", 0)
        peer = HttpPeer(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        loop = asyncio.get_running_loop()
        session, _, _ = await dial(peer, lambda: H2Session(peer, H2Connector(), loop), None)
        for _ in range(500):  # until the upstream's SETTINGS reached the session
            if getattr(session, "_early", None) or session.proto.settings_received:
                break
            await asyncio.sleep(0.01)
        session.start()
        assert await asyncio.wait_for(first, 5) == PREFACE
        assert await asyncio.wait_for(session._ready, 5) is True  # and its SETTINGS count
        session.transport.close()
        server.close()
    run(main())
