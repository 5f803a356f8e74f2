"""Request-smuggling and header-injection attacks on the proxy that its other tests did not
cover, found by probing a running ``python -m pyngora`` with raw sockets and an h2c client
(2026-11-29), each written as the behaviour the SPEC asks for (section 7: "Never forwards
what it did not parse: requests are re-serialised"; README: over HTTP/2, "requests HTTP/1
would answer 400 get 400"). In-process, as test_proxy_fast_path: a YAML ``http_proxy`` in
front of the scripted raw origin, which records every request head it receives byte for
byte. Each failed before its fix:

1. A request line with more than one space between its parts (``GET  /x HTTP/1.1``), which
   llhttp accepts (RFC 9112 3 lets a recipient parse on whitespace), went upstream as the
   client sent it when it arrived alone in one read (``RequestHead.raw``, sent by the fast
   path and the express lane). An origin that splits on single spaces (gunicorn, many
   hand-written servers) reads another target and version. ``raw`` is now kept only when
   its request line is the one re-serialising would write.
2. Over HTTP/2, the Host a request is routed and forwarded with was not checked as HTTP/1
   checks it: ``host: a b``, ``host: u@evil``, ``:authority: a/evil`` ... reached the origin
   as its Host (and ``X-Forwarded-Host``), and ``*.example.com`` matched
   ``evil.com/.example.com``. Both versions now check it with ``h1_wire.HOST_CHARS``.
3. ``Upgrade: h2c`` (with ``HTTP2-Settings``) was tunnelled like a WebSocket upgrade: an
   origin that answered 101 would speak HTTP/2 with the client past the proxy's routing and
   checks ("h2c smuggling"). It is now served as an ordinary request, without the Upgrade
   and HTTP2-Settings fields.
4. HTTP/2 trailers ``te`` and ``trailer`` were forwarded, which HTTP/1 trailers may not hold.
"""
from __future__ import annotations

import asyncio
import re
import pytest

from pyngora.protocols import h1

from tests.protocol.test_h2_helpers import H2Client, StreamResult
from tests.protocol.test_http_app_helpers import run, serving
from tests.protocol.test_proxy_fast_path import proxy_service, read_exact_response, start_origin

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# What a request line forwarded upstream must look like: method SP target SP version, one
# space each (RFC 9112 3), as the proxy serialises it.
REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [!-~\x80-\xff]+ HTTP/1\.1")


async def _one_connection(requests: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """``requests`` one after the other on one connection to the proxy, each in one write
    once the previous one is answered, until one is not answered 200 (refused: the
    connection closes) or the connection ends: the answers, and the heads the origin got."""
    server, oport, stats = await start_origin(lambda path, n: ANSWER)
    conf, svc = proxy_service(oport)
    answers: list[bytes] = []
    async with serving(svc, conf) as (port, ctx):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in requests:
                w.write(request)
                try:
                    answers.append(await asyncio.wait_for(read_exact_response(r), 5))
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if not answers[-1].startswith(b"HTTP/1.1 200"):
                    break
        finally:
            w.close()
    server.close()
    return answers, list(stats["heads"])


# -- 1. a request line with extra spaces goes upstream as the client sent it -----------------

@pytest.mark.parametrize("request_line", [
    b"GET  /x HTTP/1.1",    # two spaces after the method
    b"GET /x  HTTP/1.1",    # two spaces before the version
    b"GET   /x   HTTP/1.1",
])
def test_a_request_line_with_extra_spaces_is_refused_or_reserialised(request_line: bytes
                                                                       ) -> None:
    """Sent alone in one write (as a client does), three times on one connection (the fast
    path's raw head, the parser's head cache, then the express lane): the origin must get
    ``GET /x HTTP/1.1`` each time, or nothing at all (a 400 to the client), never the client's
    request line with its extra spaces."""
    request = request_line + b"\r\nHost: t\r\n\r\n"
    h1._SEEN.clear()
    answers, heads = run(_one_connection([request] * 3))
    assert answers, "no answer at all"
    if answers[0].startswith(b"HTTP/1.1 400"):
        assert heads == [], heads  # refused: nothing of it went upstream
        return
    lines = [head.split(b"\r\n", 1)[0] for head in heads]
    assert len(lines) == len(answers) == 3, (answers, heads)
    for line in lines:
        assert REQUEST_LINE.fullmatch(line), (
            f"forwarded request line {line!r}: the client's own bytes (the proxy parsed "
            f"GET /x HTTP/1.1 and must send that, or refuse the request with 400)")


# -- 2. HTTP/2: a Host HTTP/1 refuses reaches the origin ---------------------------------------

def _fields(authority: bytes | None, host: bytes | None) -> list[tuple[bytes, bytes]]:
    fields = [(b":method", b"GET"), (b":scheme", b"http")]
    if authority is not None:
        fields.append((b":authority", authority))
    fields.append((b":path", b"/x"))
    if host is not None:
        fields.append((b"host", host))
    return fields


async def _h2_request(port: int, fields: list[tuple[bytes, bytes]]) -> StreamResult:
    c = await H2Client.connect(port)
    try:
        sid = c.conn.get_next_available_stream_id()
        c.streams[sid] = StreamResult()
        c.conn.send_headers(sid, fields, end_stream=True)
        c.flush()
        return await c.wait(sid, 5)
    finally:
        await c.close()


HOSTS_HTTP1_REFUSES = {
    # (":authority", "host") -> over HTTP/1, "Host: <the value>" gets 400
    "host-with-space": (None, b"a b"),
    "host-with-slash": (None, b"a/evil"),
    "host-comma-list": (None, b"a, evil"),
    "host-with-userinfo": (None, b"u@evil"),
    "host-non-ascii": (None, b"a\xff"),
    "authority-with-slash": (b"a/evil", None),
    "authority-comma-list": (b"a,evil", None),
    "authority-with-query": (b"a?x", None),
}


@pytest.mark.parametrize("name", sorted(HOSTS_HTTP1_REFUSES))
def test_h2_host_that_http1_refuses_gets_400_and_never_reaches_the_origin(name: str) -> None:
    authority, host = HOSTS_HTTP1_REFUSES[name]
    value = authority if authority is not None else host
    assert value is not None

    # The reference: over HTTP/1 the same Host value is a 400 (RequestParser._check_host).
    parser = h1.RequestParser()
    with pytest.raises(h1.ProtocolError) as info:
        parser.feed(b"GET /x HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    assert info.value.status == 400

    async def main() -> tuple[StreamResult, list[bytes]]:
        server, oport, stats = await start_origin(lambda path, n: ANSWER)
        conf, svc = proxy_service(oport, "    forwarded_headers: true\n")
        async with serving(svc, conf, h2c=True) as (port, ctx):
            result = await _h2_request(port, _fields(authority, host))
        server.close()
        return result, list(stats["heads"])

    result, heads = run(main())
    assert heads == [], f"forwarded with an invalid Host: {heads!r}"
    assert result.reset is not None or result.status == 400, result.headers


def test_h2_wildcard_host_route_is_not_matched_by_an_authority_with_a_path() -> None:
    """``*.example.com`` routes by suffix: ``evil.com/.example.com`` must not pass for one of
    its hosts and reach that group's origin as its Host."""
    async def main() -> tuple[StreamResult, list[bytes]]:
        server, oport, stats = await start_origin(lambda path, n: ANSWER)
        conf, svc = proxy_service(oport, "    routes:\n"
                                         "      - {host: '*.example.com', upstream: o}\n")
        async with serving(svc, conf, h2c=True) as (port, ctx):
            ok = await _h2_request(port, _fields(b"www.example.com", None))
            assert ok.status == 200
            result = await _h2_request(port, _fields(b"evil.com/.example.com", None))
        server.close()
        return result, list(stats["heads"])

    result, heads = run(main())
    assert len(heads) == 1, f"the origin got a request with Host evil.com/.example.com: {heads!r}"
    assert result.reset is not None or result.status in (400, 404), result.headers


# -- 3. an h2c upgrade is an ordinary request ------------------------------------------------

@pytest.mark.parametrize("connection", [b"Upgrade, HTTP2-Settings", b"Upgrade"])
def test_an_h2c_upgrade_is_served_as_an_ordinary_request(connection: bytes) -> None:
    """``curl --http2`` on http:// sends this. The origin must get a plain GET (no Upgrade,
    no HTTP2-Settings, whether Connection names it or not), the client its 200, and the
    connection must stay HTTP/1: a second request on it is answered too (not tunnelled)."""
    request = (b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: " + connection +
               b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    answers, heads = run(_one_connection([request, b"GET /y HTTP/1.1\r\nHost: t\r\n\r\n"]))
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 2, answers
    assert len(heads) == 2, heads
    first = heads[0].lower()
    assert first.startswith(b"get /x http/1.1\r\n"), heads[0]
    for field in (b"\r\nupgrade:", b"\r\nhttp2-settings:", b"\r\nconnection: upgrade"):
        assert field not in first, heads[0]
    assert heads[1].lower().startswith(b"get /y http/1.1\r\n"), heads[1]


# -- 4. HTTP/2 trailers that HTTP/1 trailers may not hold --------------------------------------

@pytest.mark.parametrize("name", [b"te", b"trailer"])
def test_h2_trailers_te_and_trailer_are_refused(name: bytes) -> None:
    """A POST whose trailers hold ``te`` or ``trailer``: refused (400 or a reset stream), as
    an HTTP/1 request with them in its trailers gets 400."""
    async def main() -> StreamResult:
        server, oport, stats = await start_origin(lambda path, n: ANSWER)
        conf, svc = proxy_service(oport)
        async with serving(svc, conf, h2c=True) as (port, ctx):
            c = await H2Client.connect(port)
            try:
                sid = c.conn.get_next_available_stream_id()
                c.streams[sid] = StreamResult()
                c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                          (b":authority", b"t"), (b":path", b"/x")])
                c.conn.send_data(sid, b"body")
                # (the h2 library lets "te" carry "trailers" only)
                value = b"trailers" if name == b"te" else b"x-checksum"
                c.conn.send_headers(sid, [(name, value)], end_stream=True)
                c.flush()
                result = await c.wait(sid, 5)
            finally:
                await c.close()
        server.close()
        return result

    result = run(main())
    assert result.reset is not None or result.status == 400, (result.status, result.headers)
