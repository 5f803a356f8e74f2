"""The Python API misused as hurried user code would: real proxies, origins and clients on
loopback. Whatever a phase does wrong, the request gets a 5xx (or the response it already
has), the error log says what was wrong, and nothing reaches either wire that would split a
message, corrupt the connection's next request, or break a later request's connection.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterator, Optional

import pytest

from pyngora import log
from pyngora.config.schema import ServerConf
from pyngora.errors import Error, ErrorType
from pyngora.headers import Headers, RequestHeader, ResponseHeader
from pyngora.proxy import ProxyHttp, Session, http_proxy_service
from pyngora.proxy.engine import plan_for
from pyngora.proxy.fast_path import FastPath
from pyngora.upstreams.peer import HttpPeer, PeerOptions

from tests.protocol.test_h2_helpers import H2Client
from tests.protocol.test_http_app_helpers import AppService, Client, EchoApp, run, serving
from tests.protocol.test_proxy_engine import ToPort, port_of, raw_origin
from tests.protocol.test_raw_paths_parity import Lines


@pytest.fixture
def errors() -> Iterator[Lines]:
    handler = Lines(logging.DEBUG)
    log.ERROR.addHandler(handler)
    level = log.ERROR.level
    log.ERROR.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.ERROR.removeHandler(handler)
        log.ERROR.setLevel(level)


async def until(cond: Any, what: str, timeout: float = 5.0) -> None:
    """Poll ``cond()`` until true (the test's synchronisation), failing after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def then_next(c: Client, status: int) -> None:
    """After a response with ``status``: a 5xx ends the connection (nothing more on it); a
    success leaves it answering the pipelined GET /next in turn."""
    if status >= 500:
        assert await asyncio.wait_for(c.reader.read(), 5) == b""
    else:
        r = await asyncio.wait_for(c.read_response(), 5)
        assert (r.status, r.body) == (200, b"/next")


KEPT_HEAD = ResponseHeader.build(200, [("X-Kept", "1")])  # a module-level head, sent again
KEPT_FIELDS = Headers([("X-Kept", "1")])


class Careless(ToPort):
    """request_filter / response phases misused by target."""

    async def request_filter(self, session: Session, ctx: Any) -> bool:
        uri = session.req_header.uri
        if uri == "/respond-str":
            await session.respond(200, "text")  # type: ignore[arg-type]
            return True
        if uri == "/body-str":
            await session.write_response_header(ResponseHeader.build(200))
            await session.write_response_body("text")  # type: ignore[arg-type]
            return True
        if uri == "/respond-error-1000":
            await session.respond_error(1000)
            return True
        if uri == "/error-1000":
            raise Error.http_status(1000)
        if uri == "/reason-unicode":
            await session.write_response_header(ResponseHeader(200, "all \u2713"))
            await session.write_response_body(b"ok", end=True)
            return True
        if uri == "/dict-headers":
            await session.respond(200, b"ok", headers={"X-Ab": "cd"})  # type: ignore[arg-type]
            return True
        if uri in ("/answered-false", "/answered-post-false"):
            await session.respond(200, b"mine")
            return False  # "proxy it" after all
        if uri == "/head-only-false":
            await session.write_response_header(ResponseHeader.build(200, [("Content-Length",
                                                                             "4")]))
            return False
        if uri == "/hints-framing":
            await session.write_response_header(ResponseHeader.build(
                103, [("Link", "</s.css>"), ("Content-Length", "5"),
                      ("Transfer-Encoding", "chunked"), ("Connection", "close")]))
            return False
        if uri == "/kept-end":
            await session.write_response_header(KEPT_HEAD, end=True)  # Content-Length: 0
            return True
        if uri == "/kept-body":
            await session.write_response_header(KEPT_HEAD)
            await session.write_response_body(b"body", end=True)
            return True
        if uri == "/kept-fields":
            await session.respond(200, b"x" * len(session.req_header.get("x-n") or b""),
                                  headers=KEPT_FIELDS)
            return True
        return False

    async def response_filter(self, session: Session, resp: Any, ctx: Any) -> None:
        uri = session.req_header.uri
        if uri == "/rf-headers-list":
            resp.headers = [("X-A", "b")]
        elif uri == "/rf-reason-unicode":
            resp.reason = "caf\u00e9 \u2713"

    async def upstream_response_body_filter(self, session: Session, body: Optional[bytes],
                                            end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        if session.req_header.uri == "/urbf-str" and body is not None:
            return body.decode()  # type: ignore[return-value]
        if session.req_header.uri == "/urbf-bytearray" and body is not None:
            return bytearray(body)  # type: ignore[return-value]
        return body

    async def response_body_filter(self, session: Session, body: Optional[bytes],
                                   end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        if session.req_header.uri == "/rbf-str" and body is not None:
            return body.decode()  # type: ignore[return-value]
        return body

    async def request_body_filter(self, session: Session, body: Optional[bytes],
                                  end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        if session.req_header.uri == "/rqbf-str" and body is not None:
            return body.decode()  # type: ignore[return-value]
        return body


@pytest.mark.parametrize("target,status,body,logged", [
    # a str where bytes go: the head used to be taken and lost, the client got nothing
    ("/respond-str", 500, b"", "respond: the body must be bytes, not str"),
    ("/body-str", 500, b"", "write_response_body: the body must be bytes, not str"),
    ("/rbf-str", 500, b"", "response_body_filter returned str"),
    ("/urbf-str", 500, b"", "upstream_response_body_filter returned str"),
    ("/urbf-bytearray", 200, b"/urbf-bytearray", None),
    ("/rqbf-str", 500, b"", "request_body_filter returned str, not bytes or None"),
    # a head a phase broke: nothing left the proxy, so the client still gets its 500
    ("/rf-headers-list", 500, b"", "set headers to a list, not a Headers"),
    # a reason phrase that is no latin-1 text: the standard one (it used to close silently)
    ("/reason-unicode", 200, b"ok", None),
    ("/rf-reason-unicode", 200, b"/rf-reason-unicode", None),
    # a four-digit status on the wire: no HTTP message at all
    ("/respond-error-1000", 500, b"", None),
    ("/error-1000", 500, b"", None),
    # headers as a dict: iterating it gave names alone, unpacked as (name, value)
    ("/dict-headers", 200, b"ok", None),
])
def test_what_a_phase_returns_or_writes_wrong_is_a_whole_500(
        errors: Lines, target: str, status: int, body: bytes, logged: Optional[str]) -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            async with serving(http_proxy_service(None, Careless(oport))) as (pport, _):
                c = await Client.connect(pport)
                up = b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi" \
                    if target == "/rqbf-str" else b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"
                await c.send(up % target.encode() + b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
                r = await asyncio.wait_for(c.read_response(), 5)
                assert (r.status, r.body) == (status, body), (r.status, r.raw_head, r.body)
                assert r.raw_head.startswith(b"HTTP/1.1 %d " % status)
                if target == "/dict-headers":
                    assert r.header("x-ab") == "cd"
                await then_next(c, status)
                c.close()
    run(main())
    if logged is not None:
        assert errors.has(logged), errors.lines


@pytest.mark.parametrize("target", ["/respond-error-1000", "/error-1000", "/rf-headers-list"])
def test_the_same_mistakes_over_http2_are_a_500_on_their_stream(target: str) -> None:
    """(A guard.) The same mistakes over HTTP/2: the engine's and Session's checks answer
    them for both versions; H2Exchange itself also maps a four-digit status to 500 and
    makes the fields before it marks the head sent, as HTTP/1's Exchange does."""
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            async with serving(http_proxy_service(None, Careless(oport)), h2c=True) \
                    as (pport, _):
                c = await H2Client.connect(pport)
                res = await c.wait(c.start("GET", target))
                assert res.status == 500 and bytes(res.body) == b"", (res.headers, res.body)
                ok = await c.wait(c.start("GET", "/next"))  # the connection serves on
                assert (ok.status, bytes(ok.body)) == (200, b"/next")
    run(main())


@pytest.mark.parametrize("target,method", [("/answered-false", "GET"),
                                           ("/answered-post-false", "POST")])
def test_a_response_sent_before_returning_false_is_not_proxied(errors: Lines, target: str,
                                                               method: str) -> None:
    """request_filter answered, then returned False: the upstream used to get the request
    (a POST it acts on) and the request ended in a 'response head already sent' error."""
    async def main() -> None:
        origin = EchoApp()
        async with serving(AppService(origin)) as (oport, _):
            async with serving(http_proxy_service(None, Careless(oport))) as (pport, _):
                c = await Client.connect(pport)
                body = b"data" if method == "POST" else b""
                await c.send(b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                             % (method.encode(), target.encode(), len(body), body)
                             + b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
                r = await asyncio.wait_for(c.read_response(), 5)
                assert (r.status, r.body) == (200, b"mine")
                await then_next(c, 200)
                c.close()
        assert [ex.head.target for ex in origin.exchanges] == [b"/next"]
    run(main())
    assert errors.has("sent a response and returned False: not proxied"), errors.lines
    assert not errors.has("response head already sent"), errors.lines


def test_a_head_sent_before_returning_false_ends_the_connection_unproxied() -> None:
    async def main() -> None:
        origin = EchoApp()
        async with serving(AppService(origin)) as (oport, _):
            async with serving(http_proxy_service(None, Careless(oport))) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"GET /head-only-false HTTP/1.1\r\nHost: t\r\n\r\n")
                status, _, _ = await asyncio.wait_for(c.read_head(), 5)
                assert status == 200
                # It promised 4 bytes it never sent: the connection ends, so the client
                # sees the response cut, never a later one as its body.
                assert await asyncio.wait_for(c.reader.read(), 5) == b""
        assert origin.exchanges == []
    run(main())


def test_early_hints_from_a_phase_carry_no_framing_or_hop_by_hop_field() -> None:
    """A 103 with Content-Length / Transfer-Encoding: a client that honours them takes the
    final response for the 103's body."""
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (oport, _):
            async with serving(http_proxy_service(None, Careless(oport))) as (pport, _):
                c = await Client.connect(pport)
                await c.send(b"GET /hints-framing HTTP/1.1\r\nHost: t\r\n\r\n"
                             b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
                hints = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
                assert hints == b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n", hints
                r = await asyncio.wait_for(c.read_response(), 5)
                assert (r.status, r.body) == (200, b"/hints-framing")
                await then_next(c, 200)
                c.close()
    run(main())


def test_a_kept_response_head_or_fields_go_out_the_same_each_time() -> None:
    """The connection adds framing and Connection fields to what it sends: they used to land
    in the user's own (module-level) ResponseHeader or Headers, so the next response sent
    with it carried the last one's Content-Length: 0 (its body dropped) or Content-Length."""
    async def main() -> None:
        async with serving(http_proxy_service(None, Careless(1))) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("GET", "/kept-end")
            assert (r.status, r.body, r.header("x-kept")) == (200, b"", "1")
            r = await c.request("GET", "/kept-body")
            assert (r.status, r.body) == (200, b"body"), r.raw_head
            r = await c.request("GET", "/kept-fields", headers=(("X-N", "aaa"),))
            assert r.body == b"xxx"
            r = await c.request("GET", "/kept-fields", headers=(("X-N", "aaaaa"),))
            assert r.body == b"xxxxx", r.raw_head
            c.close()
    run(main())
    assert list(KEPT_HEAD.headers) == [(b"X-Kept", b"1")]
    assert list(KEPT_FIELDS) == [(b"X-Kept", b"1")]


class EditsInSyncPeer(ProxyHttp):
    """A synchronous upstream_peer that edits the request line (the fast path serves it)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        uri = session.req_header.uri
        if uri == "/uri":
            session.req_header.uri = "/x HTTP/1.1\r\nHost: a\r\n\r\nGET /smuggled"
        elif uri == "/method":
            session.req_header.method = "GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET"
        elif uri == "/new-head":
            session.req_header = RequestHeader("GET", "/x HTTP/1.1\r\n\r\nGET /smuggled")
        elif uri == "/not-a-head":
            session.req_header = "GET /smuggled"  # type: ignore[assignment]
        return HttpPeer(f"127.0.0.1:{self.port}")


@pytest.mark.parametrize("target", ["/uri", "/method", "/new-head", "/not-a-head"])
def test_a_request_line_set_on_the_fast_path_is_checked(target: str) -> None:
    """The fast path sent a method or target a phase assigned (not through set_uri) as it
    was: a CRLF in it put a second request on the upstream connection."""
    assert FastPath.serves(plan_for(EditsInSyncPeer))
    got: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while data := await r.read(65536):
            got.append(data)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def main() -> None:
        server, _ = await raw_origin(handler)
        svc = http_proxy_service(None, EditsInSyncPeer(port_of(server)))
        async with serving(svc) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("GET", target)
            assert (r.status, r.body) == (500, b"")
            c = await Client.connect(pport)
            assert (await c.request("GET", "/fine")).body == b"ok"
            c.close()
        server.close()
    run(main())
    assert got == [b"GET /fine HTTP/1.1\r\nHost: t\r\n\r\n"], got


class Forgetful(ProxyHttp):
    """fail_to_connect / error_while_proxy that forget ``return e``; upstream_peer that
    returns what is no peer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.picks = 0

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        self.picks += 1
        uri = session.req_header.uri
        if uri == "/a-string":
            return f"127.0.0.1:{self.port}"  # type: ignore[return-value]
        if uri == "/refused":
            return HttpPeer("127.0.0.1:1", options=PeerOptions(connection_timeout=2))
        return HttpPeer(f"127.0.0.1:{self.port}", options=PeerOptions(read_timeout=5))

    async def fail_to_connect(self, session: Session, peer: HttpPeer, ctx: Any,
                              e: Error) -> Error:
        e.set_retry(True)
        return None  # type: ignore[return-value]

    async def error_while_proxy(self, peer: HttpPeer, session: Session, e: Error, ctx: Any,
                                client_reused: bool) -> Error:
        return None  # type: ignore[return-value]


@pytest.mark.parametrize("target,status,logged", [
    ("/refused", 502, "fail_to_connect returned NoneType, not an Error"),
    ("/cut", 502, "error_while_proxy returned NoneType, not an Error"),
    ("/a-string", 500, "upstream_peer returned str, not an HttpPeer"),
])
def test_a_phase_that_returns_no_error_or_no_peer_is_named_in_the_log(
        errors: Lines, target: str, status: int, logged: str) -> None:
    """These used to end in a 500 for an AttributeError on None (or on a str) that named
    neither the phase nor what it returned; a forgotten ``return e`` now goes on with ``e``
    (502 for a connect failure or an upstream that hung up, within max_retries)."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")  # then hang up without a response

    async def main() -> None:
        server, _ = await raw_origin(handler)
        proxy = Forgetful(port_of(server))
        async with serving(http_proxy_service(None, proxy), ServerConf(max_retries=2)) \
                as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("POST" if target == "/cut" else "GET", target, b"x")
            assert (r.status, r.body) == (status, b"")
        server.close()
        assert proxy.picks == (3 if target == "/refused" else 1)  # bounded by max_retries
    run(main())
    assert errors.has(logged), errors.lines


def test_retries_stay_bounded_when_every_pick_differs_and_all_are_retryable() -> None:
    """upstream_peer picks a new dead peer each time, fail_to_connect marks every failure
    retryable: max_retries ends it with a 502 (never a loop)."""
    class Hopper(ProxyHttp):
        def __init__(self) -> None:
            self.picks: list[int] = []

        async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
            self.picks.append(len(self.picks) % 3 + 1)
            return HttpPeer(f"127.0.0.1:{self.picks[-1]}")

        async def fail_to_connect(self, session: Session, peer: HttpPeer, ctx: Any,
                                  e: Error) -> Error:
            return e.set_retry(True)

    async def main() -> None:
        proxy = Hopper()
        async with serving(http_proxy_service(None, proxy), ServerConf(max_retries=4)) \
                as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("GET", "/")
            assert r.status == 502
        assert proxy.picks == [1, 2, 3, 1, 2]
    run(main())


def test_a_session_kept_past_its_request_cannot_abort_a_later_one() -> None:
    """A session stored in ctx or a background task and touched after its request ended:
    ``abort()`` used to close the connection under whatever request it served by then."""
    kept: list[Session] = []

    class Keeps(ToPort):
        async def request_filter(self, session: Session, ctx: Any) -> bool:
            if session.req_header.uri == "/first":
                kept.append(session)
            return False

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            if b"/slow" in head:
                await until(lambda: kept[0].response_finished and stale_done, "the stale abort")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    stale_done = False

    async def main() -> None:
        nonlocal stale_done
        server, _ = await raw_origin(handler)
        async with serving(http_proxy_service(None, Keeps(port_of(server)))) as (pport, _):
            c = await Client.connect(pport)
            assert (await c.request("GET", "/first")).status == 200
            await c.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await until(lambda: kept and kept[0].response_finished, "the first response")
            kept[0].abort()  # the first request's session, long done
            kept[0].set_keepalive(None)
            await kept[0].respond_error(500)
            stale_done = True
            r = await asyncio.wait_for(c.read_response(), 5)
            assert (r.status, r.body) == (200, b"ok")
            assert (await c.request("GET", "/third")).status == 200  # still open
            c.close()
        server.close()
    run(main())


@pytest.mark.parametrize("phase", ["upstream_response_filter", "response_body_filter",
                                   "request_body_filter", "connected_to_upstream"])
def test_a_phase_that_never_returns_frees_the_upstream_when_the_client_leaves(
        phase: str) -> None:
    """A phase awaiting forever while it holds an upstream connection: the client leaving
    cancels it, the upstream connection is closed (never pooled mid-exchange), and logging
    still runs, once."""
    entered: list[str] = []
    logged: list[Optional[Error]] = []

    class Stuck(ToPort):
        async def _stall(self, name: str) -> None:
            if name == phase:
                entered.append(name)
                await asyncio.sleep(3600)

        async def connected_to_upstream(self, session: Session, reused: bool, peer: HttpPeer,
                                        ctx: Any) -> None:
            await self._stall("connected_to_upstream")

        async def upstream_response_filter(self, session: Session, resp: Any,
                                           ctx: Any) -> None:
            await self._stall("upstream_response_filter")

        async def response_body_filter(self, session: Session, body: Optional[bytes],
                                       end_of_stream: bool, ctx: Any) -> Optional[bytes]:
            await self._stall("response_body_filter")
            return body

        async def request_body_filter(self, session: Session, body: Optional[bytes],
                                      end_of_stream: bool, ctx: Any) -> Optional[bytes]:
            await self._stall("request_body_filter")
            return body

        async def logging(self, session: Session, e: Optional[Error], ctx: Any) -> None:
            logged.append(e)

    closed: list[int] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            if phase != "request_body_filter":  # (else it waits for the body, as origins do)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await r.read()  # until the proxy closes it
        finally:
            closed.append(n)

    async def main() -> None:
        server, conns = await raw_origin(handler)
        async with serving(http_proxy_service(None, Stuck(port_of(server)))) as (pport, _):
            c = await Client.connect(pport)
            await c.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
            await until(lambda: entered and conns, "the phase to stall")
            c.writer.close()
            await until(lambda: closed == [0], "the upstream connection to close")
            await until(lambda: len(logged) == 1, "logging")
        server.close()
        assert logged[0] is not None and logged[0].etype is ErrorType.ConnectionClosed
    run(main())


def test_a_forgotten_return_in_fail_to_connect_on_the_fast_path_is_named(errors: Lines
                                                                          ) -> None:
    """The fast path (a synchronous upstream_peer, and fail_to_connect) retried on what
    fail_to_connect returned: None failed on ``None.retry``, a log line naming neither."""
    class SyncForgetful(ProxyHttp):
        def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
            return HttpPeer("127.0.0.1:1")

        def fail_to_connect(self, session: Session, peer: HttpPeer, ctx: Any,
                            e: Error) -> Error:
            return None  # type: ignore[return-value]

    assert FastPath.serves(plan_for(SyncForgetful))

    async def main() -> None:
        async with serving(http_proxy_service(None, SyncForgetful())) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("GET", "/")
            assert r.status == 502 and r.body == b""  # (as the engine: e stands)
    run(main())
    assert errors.has("fail_to_connect returned NoneType, not an Error"), errors.lines


def test_a_str_from_a_synchronous_upstream_peer_is_named_on_the_fast_path(errors: Lines
                                                                          ) -> None:
    """The fast path (a synchronous upstream_peer) read ``peer.options`` of whatever came
    back: a str ended the connection with a generic "request handler failed" and no
    response. It is a 500 now, with the engine's line naming what was returned."""
    class SyncStr(ProxyHttp):
        def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
            return "127.0.0.1:1"  # type: ignore[return-value]

    assert FastPath.serves(plan_for(SyncStr))

    async def main() -> None:
        async with serving(http_proxy_service(None, SyncStr())) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("GET", "/")
            assert (r.status, r.body) == (500, b"")
    run(main())
    assert errors.has("upstream_peer returned str, not an HttpPeer"), errors.lines
