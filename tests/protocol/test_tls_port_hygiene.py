"""A TLS listener's answers to clients that do not speak (modern) TLS, as nginx gives them:

- plain HTTP (``curl http://host:443/``): a plain-text ``400`` naming the problem, then the
  connection ends; the request never reaches the app (it was a silent close: curl's "Empty
  reply from server");
- a client offering only TLS 1.0/1.1: OpenSSL's ``protocol_version`` alert (it was written
  into uvloop's outgoing buffer and dropped: the client saw the connection end);
- TLS clients, HTTP/1.1 and HTTP/2 by ALPN, are served as before.

Served in-process as a worker serves: the static service's own protocol factory and SSL
context behind ``AcceptHandles`` on a real listening socket, with the worker's handshake
timeout; clients are raw sockets, Python's ssl and the h2 test client.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import struct
import time
import warnings
from typing import Any, AsyncIterator, Callable, Optional

import pytest

from pyngora.config.schema import ServerConf, TlsConf, parse_address
from pyngora.protocols.tls import PLAIN_HTTP_RESPONSE, server_context
from pyngora.server.accepting import AcceptHandles
from pyngora.server.worker import _handshake_timeout
from pyngora.services.base import WorkerContext

from tests.protocol.test_h2_app import Metrics
from tests.protocol.test_h2_helpers import H2Client
from tests.protocol.test_http_app import static
from tests.protocol.test_http_app_helpers import run
from tests.support import self_signed_cert

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")

BODY = b"The plain HTTP request was sent to HTTPS port\n"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"), "tls.test")


@contextlib.asynccontextmanager
async def tls_site(cert: tuple[str, str], **limits: Any
                   ) -> AsyncIterator[tuple[int, Metrics, Metrics]]:
    """A static service ("hello") on a TLS listener (ALPN h2, http/1.1), accepted as a worker
    accepts; yields (port, the app's metrics, the TLS refusals' metrics). A worker gives
    both the same ServiceMetrics; apart, they show what reached the app."""
    loop = asyncio.get_running_loop()
    svc = static("hello", **limits)
    ctx = WorkerContext(svc, 0, 0, ServerConf(), loop)
    app_metrics, refusals = Metrics(), Metrics()
    ctx.state["service_metrics"] = app_metrics
    await svc.start_worker(ctx)
    listener = parse_address("127.0.0.1:0", tls=TlsConf(cert=cert[0], key=cert[1]))
    ssl_ctx = svc.ssl_context(listener)
    ssl_ctx.service_metrics = refusals
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    handles = AcceptHandles(loop, sock, svc.protocol_factory(ctx, listener), 64, ssl_ctx,
                            handshake_timeout=_handshake_timeout(svc))
    await handles.open(sock)
    try:
        yield port, app_metrics, refusals
    finally:
        handles.close()
        handles.own.close()
        ctx.connections.abort_all()
        await svc.stop_worker(ctx)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (yielding to the loop) until ``cond()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def client_ctx(alpn: Optional[list[str]] = None) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    if alpn:
        c.set_alpn_protocols(alpn)
    return c


async def tls_get(port: int) -> bytes:
    """One HTTP/1.1 GET over TLS; the whole answer (the server closes after it)."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(["http/1.1"]),
                                         server_hostname="tls.test")
    w.write(b"GET / HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n")
    try:
        return await r.read()
    finally:
        w.close()


async def plain_exchange(port: int, request: bytes, until_eof: bool = False,
                         ) -> tuple[bytes, float]:
    """Send ``request`` as plain text; read the answer, whole (by its Content-Length), then
    close as curl does, or (``until_eof``) until the server ends the connection. Returns
    (what came, seconds until the end). A reset after the whole answer counts as its end."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    w.write(request)
    got = b""
    try:
        await w.drain()
        while True:
            chunk = await r.read(65536)
            if not chunk:
                break
            got += chunk
            if not until_eof and got.endswith(BODY):
                break
    except ConnectionResetError:
        pass
    finally:
        w.close()
    return got, time.monotonic() - start


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: tls.test\r\n\r\n",           # OpenSSL: "http request"
    b"CONNECT tls.test:443 HTTP/1.1\r\nHost: tls.test\r\n\r\n",  # "https proxy request"
    b"OPTIONS * HTTP/1.1\r\nHost: tls.test\r\n\r\n",        # "wrong version number"
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",                    # h2c prior knowledge
], ids=["GET", "CONNECT", "OPTIONS", "h2c-preface"])
def test_plain_http_to_a_tls_port_gets_a_plain_400_and_never_reaches_the_app(
        cert: tuple[str, str], request_bytes: bytes) -> None:
    async def main() -> None:
        async with tls_site(cert) as (port, app_metrics, refusals):
            got, _ = await plain_exchange(port, request_bytes)
            assert got == PLAIN_HTTP_RESPONSE, got
            head = got.split(b"\r\n\r\n")[0].split(b"\r\n")
            assert head[0] == b"HTTP/1.1 400 Bad Request"
            assert b"Connection: close" in head and b"Content-Type: text/plain" in head
            # Counted as a malformed request is: an accepted connection, one 400.
            assert (refusals.opened, refusals.requests, refusals.closed) == (1, [400], 1)
            assert (app_metrics.opened, app_metrics.requests) == (0, [])
            # TLS on the same listener is served as before.
            assert (await tls_get(port)).endswith(b"\r\n\r\nhello")
            await until(lambda: app_metrics.requests == [200])
    run(main())


def test_a_plain_client_that_waits_for_the_close_gets_it_within_the_handshake_bound(
        cert: tuple[str, str]) -> None:
    """The 400 says ``Connection: close``: curl and browsers close on it. A client that waits
    for the server's close instead (an HTTP/1.0 reader, netcat) gets it at the handshake
    timeout (``header_read_timeout_seconds``), which bounds the whole connection as it
    bounds a client that sends nothing."""
    async def main() -> None:
        async with tls_site(cert, header_read_timeout_seconds=1) as (port, _, refusals):
            got, waited = await plain_exchange(port, b"GET / HTTP/1.0\r\n\r\n", until_eof=True)
            assert got == PLAIN_HTTP_RESPONSE, got
            assert waited < 5, f"held {waited:.1f}s"
            assert refusals.requests == [400]
    run(main())


def test_a_large_plain_post_still_reads_its_whole_400(cert: tuple[str, str]) -> None:
    """Bytes the client sends after its head are read and dropped: the connection ends with
    a FIN after the answer, not a reset (which would destroy the answer unread)."""
    async def main() -> None:
        async with tls_site(cert) as (port, app_metrics, refusals):
            size = 4 << 20
            head = b"POST /up HTTP/1.1\r\nHost: tls.test\r\nContent-Length: %d\r\n\r\n" % size
            got, _ = await plain_exchange(port, head + os.urandom(size))
            assert got == PLAIN_HTTP_RESPONSE, got[:200]
            assert refusals.requests == [400] and app_metrics.requests == []
    run(main())


def _client_hello(version: int) -> bytes:
    """A minimal ClientHello offering only ``version`` (0x0301 TLS 1.0, 0x0302 TLS 1.1): no
    extensions, so no supported_versions; one suite (TLS_RSA_WITH_AES_128_CBC_SHA)."""
    body = (struct.pack(">H", version) + os.urandom(32) + b"\x00"  # random, no session id
            + b"\x00\x02\x00\x2f" + b"\x01\x00")                 # suites, null compression
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


@pytest.mark.parametrize("version", [0x0301, 0x0302], ids=["TLS1.0", "TLS1.1"])
def test_an_old_tls_client_gets_the_protocol_version_alert(
        cert: tuple[str, str], version: int) -> None:
    """RFC 8446 (and OpenSSL, nginx): a ClientHello offering only versions the server does
    not speak is answered by a fatal ``protocol_version`` alert (70), then the end."""
    async def main() -> None:
        async with tls_site(cert) as (port, app_metrics, refusals):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(_client_hello(version))
            try:
                got = await asyncio.wait_for(r.read(64), 5)
            finally:
                w.close()
            # An alert record (21), two bytes: level fatal (2), description protocol_version.
            assert got[:1] == b"\x15" and got[3:7] == b"\x00\x02\x02\x46", got
            assert refusals.requests == [] and app_metrics.opened == 0
    run(main())


def test_a_python_tls_1_1_client_is_told_why(cert: tuple[str, str]) -> None:
    """What a client library reports: the server's alert, not an unexpected EOF."""
    c = client_ctx()
    try:
        with warnings.catch_warnings():  # (TLSVersion.TLSv1_1 is deprecated: that is the point)
            warnings.simplefilter("ignore", DeprecationWarning)
            c.minimum_version = ssl.TLSVersion.TLSv1
            c.maximum_version = ssl.TLSVersion.TLSv1_1
        c.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"this OpenSSL builds no TLS 1.1 client: {exc}")

    async def main() -> None:
        async with tls_site(cert) as (port, _, _r):
            with pytest.raises(ssl.SSLError) as caught:
                await asyncio.open_connection("127.0.0.1", port, ssl=c,
                                              server_hostname="tls.test")
            if "NO_PROTOCOLS_AVAILABLE" in str(caught.value):
                pytest.skip("this OpenSSL sends no TLS 1.1 ClientHello")
            assert caught.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", caught.value
    run(main())


def test_tls_clients_are_served_over_http1_and_h2(cert: tuple[str, str]) -> None:
    async def main() -> None:
        async with tls_site(cert) as (port, app_metrics, refusals):
            assert (await tls_get(port)).endswith(b"\r\n\r\nhello")
            c = await H2Client.connect(port, ssl_ctx=client_ctx(["h2", "http/1.1"]),
                                       server_hostname="tls.test")
            r = await c.request()
            assert r.status == 200 and bytes(r.body) == b"hello"
            assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            await c.close()
            await until(lambda: app_metrics.requests == [200, 200])
            assert refusals.requests == []
    run(main())


def test_a_silent_client_is_still_closed_at_the_handshake_timeout(
        cert: tuple[str, str]) -> None:
    async def main() -> None:
        async with tls_site(cert, header_read_timeout_seconds=0.5) as (port, _, refusals):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            start = time.monotonic()
            try:
                assert await asyncio.wait_for(r.read(), 5) == b""
            except ConnectionResetError:
                pass  # (uvloop aborts a handshake that timed out)
            finally:
                w.close()
            assert time.monotonic() - start < 3
            assert refusals.requests == []
    run(main())


def test_no_400_is_spliced_into_a_tls_stream(cert: tuple[str, str]) -> None:
    """OpenSSL's no-alert WRONG_VERSION_NUMBER is not only plain text: a TLS 1.2 client's
    alert record of another version, after the server's first flight went out, is one too.
    The 400 would follow TLS bytes there: the handshake fails as it always did. (Memory BIOs,
    as the loop's TLS protocol drives the object.)"""
    sctx = server_context(TlsConf(cert=cert[0], key=cert[1]))  # as a worker builds it
    c12 = client_ctx()
    c12.maximum_version = ssl.TLSVersion.TLSv1_2
    ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
    client = c12.wrap_bio(ci, co, server_hostname="tls.test")
    server = sctx.wrap_bio(si, so, server_side=True)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    si.write(co.read())
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()  # ServerHello ... ServerHelloDone
    assert so.read()
    si.write(b"\x15\x03\x01\x00\x02\x02\x28")  # alert(handshake_failure), record version 1.0
    with pytest.raises(ssl.SSLError) as caught:
        server.do_handshake()
    assert not isinstance(caught.value, ssl.SSLWantReadError)
    assert caught.value.reason == "WRONG_VERSION_NUMBER" and so.read() == b""

