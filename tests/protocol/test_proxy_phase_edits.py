"""What a ProxyHttp's phases may change in a request, and what stays pyngora's: the body's
framing upstream, the request line's syntax, and the body a phase read before proxying.

Each case was an attack on a pooled upstream connection: bytes of one client's request read
by the origin as the next client's request (or its body), or part of a body lost on a retry.
The origin is the echo app (it answers with the body it read) or a raw asyncio server.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pyngora.headers import RequestHeader
from pyngora.proxy import Session, http_proxy_service

from tests.protocol.test_http_app_helpers import AppService, Client, EchoApp, run, serving
from tests.protocol.test_proxy_engine import ToPort, port_of, raw_origin

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


class EditsInRequestFilter(ToPort):
    """request_filter edits by target: framing fields, the request line, reading the body."""

    async def request_filter(self, session: Session, ctx: Any) -> bool:
        req = session.req_header
        target = req.uri
        if target.startswith("/cl2"):
            req.insert_header("Content-Length", "2")
        elif target.startswith("/cl40"):
            req.insert_header("Content-Length", "40")
        elif target.startswith("/te"):
            req.insert_header("Transfer-Encoding", "chunked")
        elif target.startswith("/uri-crlf"):
            req.uri = "/ok HTTP/1.1\r\nHost: x\r\n\r\nGET /smuggled"
        elif target.startswith("/uri-space"):
            req.uri = "/ok /evil"
        elif target.startswith("/method-crlf"):
            req.method = "GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET"
        elif target.startswith("/set-uri-crlf"):
            req.set_uri("/a\r\nX-Evil: 1")
        elif target.startswith("/read-all"):
            while await session.read_request_body() is not None:
                pass
        elif target.startswith("/read-one"):
            await session.read_request_body()
        return False

    async def upstream_request_filter(self, session: Session, up: Any, ctx: Any) -> None:
        if up.uri.startswith("/urf-read-all"):  # the last phase before the head goes up
            while await session.read_request_body() is not None:
                pass


def _service(oport: int) -> Any:
    return http_proxy_service(None, EditsInRequestFilter(oport))


@pytest.mark.parametrize("request_bytes,body", [
    # a smaller Content-Length: the rest of the body would be the origin's next request
    (b"POST /cl2 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\nhi" % (2 + len(SMUGGLED))
     + SMUGGLED, b"hi" + SMUGGLED),
    # a Content-Length on a body-less GET: the next client's request would be its body
    (b"GET /cl40 HTTP/1.1\r\nHost: t\r\n\r\n", b""),
    # chunked named on a Content-Length body
    (b"POST /te HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
])
def test_framing_edited_in_request_filter_does_not_reach_the_origin(request_bytes: bytes,
                                                                    body: bytes) -> None:
    """The body goes up framed by what pyngora parsed, whatever request_filter did to the
    client's Content-Length / Transfer-Encoding; the pooled connection's next request is
    intact."""
    async def main() -> None:
        origin = EchoApp()
        async with serving(AppService(origin)) as (oport, _):
            async with serving(_service(oport)) as (pport, _):
                c = await Client.connect(pport)
                await c.send(request_bytes)
                r = await c.read_response()
                assert (r.status, r.body) == (200, body or request_bytes.split(b" ")[1])
                r = await c.request("GET", "/next")  # the same pooled upstream connection
                assert (r.status, r.body) == (200, b"/next")
                c.close()
        targets = [ex.head.target for ex in origin.exchanges]
        assert targets == [request_bytes.split(b" ")[1], b"/next"], targets
    run(main())


@pytest.mark.parametrize("target", ["/uri-crlf", "/uri-space", "/method-crlf", "/set-uri-crlf"])
def test_a_request_line_that_a_phase_broke_is_500_and_never_sent(target: str) -> None:
    """A method or target set by a phase that would split the request line (CR, LF, a
    space): 500, and nothing reaches the origin."""
    async def main() -> None:
        origin = EchoApp()
        async with serving(AppService(origin)) as (oport, _):
            async with serving(_service(oport)) as (pport, _):
                c = await Client.connect(pport)
                r = await c.request("GET", target)
                assert r.status == 500, r.status
                c.close()
        assert origin.exchanges == []
    run(main())


def test_set_uri_and_set_method_refuse_what_would_split_the_request_line() -> None:
    req = RequestHeader("GET", "/")
    for bad in ("", "/a b", "/a\r\nX: y", "/a\nb", "/a\x00", "/a\x7f"):
        with pytest.raises(ValueError):
            req.set_uri(bad)
    for bad in ("", "G ET", "GET\r\n", "GÉT", "GET/"):
        with pytest.raises(ValueError):
            req.set_method(bad)
    req.set_uri("/a%20b?q=1#f")
    req.set_method("PURGE")
    assert (req.method, req.uri) == ("PURGE", "/a%20b?q=1#f")


@pytest.mark.parametrize("target", ["/read-all", "/read-one"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_a_phase_read_before_proxying_goes_upstream_first(target: str,
                                                                 framing: str) -> None:
    """request_filter reads all of the body (or its first piece) and lets the request be
    proxied: the origin gets the whole body, not a Content-Length with nothing behind it
    (which made it read the next client's request as this body)."""
    body = b"0123456789" * 50

    async def main() -> None:
        origin = EchoApp()
        async with serving(AppService(origin)) as (oport, _):
            async with serving(_service(oport)) as (pport, _):
                c = await Client.connect(pport)
                if framing == "length":
                    await c.send(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                                 % (target.encode(), len(body)) + body)
                else:
                    await c.send(b"POST %s HTTP/1.1\r\nHost: t\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n" % target.encode()
                                 + b"".join(b"%x\r\n%s\r\n" % (len(p), p)
                                            for p in (body[:100], body[100:]))
                                 + b"0\r\n\r\n")
                r = await asyncio.wait_for(c.read_response(), 10)
                assert (r.status, r.body) == (200, body), (r.status, len(r.body))
                r = await c.request("GET", "/next")
                assert (r.status, r.body) == (200, b"/next")
                c.close()
        assert [ex.head.target for ex in origin.exchanges] == [target.encode(), b"/next"]
    run(main())


def test_a_phase_that_read_more_than_is_kept_and_proxies_gets_500(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Session, "READ_AHEAD_LIMIT", 100)

    async def main() -> None:
        origin = EchoApp()
        async with serving(AppService(origin)) as (oport, _):
            async with serving(_service(oport)) as (pport, _):
                c = await Client.connect(pport)
                r = await c.request("POST", "/read-all", b"x" * 101)
                assert r.status == 500
                c.close()
                c = await Client.connect(pport)
                r = await c.request("POST", "/read-all", b"x" * 100)  # at the limit: kept
                assert (r.status, r.body) == (200, b"x" * 100)
                c.close()
                c = await Client.connect(pport)
                r = await c.request("POST", "/urf-read-all", b"x" * 101)  # read up there
                assert r.status == 500
                c.close()
                c = await Client.connect(pport)
                r = await c.request("POST", "/urf-read-all", b"y" * 100)
                assert (r.status, r.body) == (200, b"y" * 100)
                c.close()
        assert [ex.head.target for ex in origin.exchanges] == [b"/read-all", b"/urf-read-all"]
    run(main())


@pytest.mark.parametrize("body,length,chunked,sent", [
    ("none", None, False, []),
    ("none", 0, False, [b"0"]),  # an empty HTTP/2 POST (END_STREAM, content-length: 0)
    ("length", 5, False, [b"5"]),
    ("length", 5, True, []),  # re-framed chunked by a request_body_filter
    ("chunked", None, True, []),
])
def test_upstream_framing_comes_from_the_parsed_head(body: str, length: Any, chunked: bool,
                                                     sent: list[bytes]) -> None:
    from pyngora.headers import Headers
    from pyngora.protocols.events import RequestHead
    from pyngora.proxy.wire import set_framing
    fields = Headers([("Host", "t"), ("Content-Length", "40"), ("Transfer-Encoding", "gzip")])
    set_framing(fields, RequestHead(b"POST", b"/", "2", Headers(), True, body, length), chunked)
    assert fields.get_all("content-length") == sent
    assert fields.get_all("transfer-encoding") == ([b"chunked"] if chunked else [])


class HoldsSecondPiece(ToPort):
    """An async request_body_filter that, on the first attempt, holds the body's second piece
    until the attempt is given up (the origin cut the connection meanwhile)."""

    def new_ctx(self) -> Any:
        return {"pieces": 0}

    async def request_body_filter(self, session: Session, body: Any, end: bool,
                                  ctx: Any) -> Any:
        ctx["pieces"] += 1
        if session.retries == 0 and ctx["pieces"] == 2:
            await asyncio.Event().wait()  # cancelled when the attempt fails
        return body


def test_a_retry_sends_the_piece_an_awaiting_body_filter_held() -> None:
    """The piece in the filter's hands when the attempt failed was in neither the retry
    buffer nor the upstream stream: the retry lost it (the origin got 70 of 80 bytes)."""
    pieces = [bytes([c]) * 10 for c in b"ABCDEFGH"]
    got: list[bytes] = []

    async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        if n == 0:  # the first attempt: cut once the first piece arrived
            await r.readuntil(b"AAAAAAAAAA\r\n")
            w.transport.abort()
            return
        body = b""
        while True:
            size = int((await r.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await r.readuntil(b"\r\n")
                break
            body += (await r.readexactly(size + 2))[:-2]
        got.append(body)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await w.drain()

    async def main() -> None:
        server, conns = await raw_origin(origin)
        svc = http_proxy_service(None, HoldsSecondPiece(port_of(server)))
        async with serving(svc) as (pport, _):
            c = await Client.connect(pport)
            await c.send(b"PUT /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"".join(b"a\r\n%s\r\n" % p for p in pieces) + b"0\r\n\r\n")
            r = await asyncio.wait_for(c.read_response(), 10)
            assert (r.status, r.body) == (200, b"".join(pieces)), (r.status, r.body)
            c.close()
        server.close()
        assert len(conns) == 2 and got == [b"".join(pieces)]
    run(main())


class EditsResponse(ToPort):
    """Response-side edits by target: framing fields and statuses a filter set, a body
    written before any head."""

    async def request_filter(self, session: Session, ctx: Any) -> bool:
        if session.req_header.uri.startswith("/body-first"):
            await session.write_response_body(b"HTTP/1.1 200 OK\r\n\r\nforged")
            return True
        return False

    async def response_filter(self, session: Session, resp: Any, ctx: Any) -> None:
        target = session.req_header.uri
        if target.startswith("/cl-other"):
            resp.append_header("Content-Length", "3")
        elif target.startswith("/cl-same"):
            resp.append_header("Content-Length", resp.headers.get("content-length"))
        elif target.startswith("/te-gzip"):
            resp.remove_header("Content-Length")
            resp.insert_header("Transfer-Encoding", "gzip")
        elif target.startswith("/te-odd"):
            resp.remove_header("Content-Length")
            resp.insert_header("Transfer-Encoding", "chunked, , identity, gzip")
        elif target.startswith("/status-101"):
            resp.status = 101
        elif target.startswith("/status-1000"):
            resp.status = 1000


@pytest.mark.parametrize("target,status,framing", [
    ("/cl-other", 200, "transfer-encoding: chunked"),  # differing lengths: dropped, chunked
    ("/cl-same", 200, "content-length: 8"),  # repeats of one value: merged (len("/cl-same"))
    ("/te-gzip", 200, "transfer-encoding: gzip, chunked"),  # chunked goes last
    ("/te-odd", 200, "transfer-encoding: gzip, chunked"),  # once, last; identity is none
    ("/status-101", 500, None),  # no upgrade was asked for
    ("/status-1000", 500, None),  # no three-digit status
    ("/body-first", 500, None),  # a body before the head
])
def test_response_edits_keep_the_response_one_http_message(target: str, status: int,
                                                           framing: Any) -> None:
    """Each edit used to put a response on the wire that a client or a cache in front reads
    differently (two Content-Lengths, a last coding that is not chunked: read until close,
    a 101 or a four-digit status, bytes before the head); a pipelined request after it is
    answered in turn."""
    async def main() -> None:
        origin = EchoApp()
        async with serving(AppService(origin)) as (oport, _):
            async with serving(http_proxy_service(None, EditsResponse(oport))) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target.encode()
                             + b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
                r = await asyncio.wait_for(c.read_response(), 10)
                assert r.status == status, r.status
                if framing is not None:
                    name, _, value = framing.partition(": ")
                    assert [v.decode() for v in r.headers.get_all(name)] == [value], r.raw_head
                    assert r.body == target.encode()
                if status == 200:
                    r = await asyncio.wait_for(c.read_response(), 10)
                    assert (r.status, r.body) == (200, b"/next")
                else:  # an error after the request was read: the connection ends
                    assert await asyncio.wait_for(c.reader.read(), 10) == b""
                c.close()
    run(main())
