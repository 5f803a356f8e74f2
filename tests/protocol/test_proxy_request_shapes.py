"""Request and response shapes a review attacked the HTTP/1 proxy with, end to end in-process:
a real pyngora proxy service on loopback between a raw client and an origin that records
every byte it receives. Each runs on the fast path and on the phase engine alike."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

import pytest

from tests.protocol.test_http_app_helpers import run, serving
from tests.protocol.test_proxy_fast_path import proxy_service_with, read_exact_response

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Recorder(asyncio.Protocol):
    """An origin that keeps every byte it gets and answers once ``answer(bytes so far)``
    gives something (then forgets them: the next request starts afresh)."""

    def __init__(self, seen: list[bytes], answer: Callable[[bytes], Optional[bytes]]) -> None:
        self.seen, self.answer, self.buf = seen, answer, b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.seen.append(data)
        self.buf += data
        out = self.answer(self.buf)
        if out is not None:
            self.buf = b""
            self.transport.write(out)


def _head_done(buf: bytes) -> Optional[bytes]:
    return OK if b"\r\n\r\n" in buf else None


async def _origin(answer: Callable[[bytes], Optional[bytes]] = _head_done
                  ) -> tuple[Any, int, list[bytes]]:
    seen: list[bytes] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: Recorder(seen, answer), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def _one(port: int) -> str:
    return f'      - {{name: o, backends: [{{addr: "127.0.0.1:{port}"}}], timeouts: {{read_seconds: 5}}}}\n'


async def _send(port: int, data: bytes, method: bytes = b"GET") -> tuple[bytes, bytes]:
    """(the first response, what the client read after it until the proxy closed or 1 s)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    try:
        first = await asyncio.wait_for(read_exact_response(r, method), 10)
        try:
            rest = await asyncio.wait_for(r.read(), 1)
        except asyncio.TimeoutError:
            rest = b"(open)"
        return first, rest
    finally:
        w.close()


@pytest.fixture(params=["fast path", "engine"])
def fast(request: pytest.FixtureRequest) -> bool:
    return request.param == "fast path"


def _serve(svc: Any, conf: Any, fast: bool) -> Any:
    ctx_manager = serving(svc, conf)

    class _Both:
        async def __aenter__(self) -> tuple[int, Any]:
            port, ctx = await ctx_manager.__aenter__()
            if not fast:
                ctx.state["http_app"].fast = None
            return port, ctx

        async def __aexit__(self, *exc: Any) -> None:
            await ctx_manager.__aexit__(*exc)
    return _Both()


@pytest.mark.parametrize("option", [b"content-length", b"keep-alive, Content-Length", b"host"])
def test_connection_naming_framing_or_host_is_400_and_reaches_no_upstream(fast: bool,
                                                                           option: bytes) -> None:
    """The smuggling shape: Content-Length named in Connection, a body that is a request.
    Removing what Connection names would send the head unframed and the body as the next
    request on a pooled connection, someone else's."""
    body = b"GET /smuggled HTTP/1.1\r\nHost: a\r\nX: "

    async def main() -> None:
        server, oport, seen = await _origin()
        conf, svc = proxy_service_with(_one(oport))
        async with _serve(svc, conf, fast) as (port, _):
            first, rest = await _send(port, b"POST /a HTTP/1.1\r\nHost: a\r\nConnection: " +
                                      option + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            assert first.startswith(b"HTTP/1.1 400 ") and rest == b"", (first, rest)
        server.close()
        assert seen == []
    run(main())


@pytest.mark.parametrize("framing,body", [(b"Content-Length: 5", b"hello"),
                                          (b"Transfer-Encoding: chunked",
                                           b"5\r\nhello\r\n0\r\n\r\n")])
def test_an_upgrade_request_with_a_body_goes_up_whole_as_an_ordinary_request(
        fast: bool, framing: bytes, body: bytes) -> None:
    """``curl --http2 -d`` on an http:// URL: the origin gets the body (and no Upgrade), the
    client its answer, and the connection stays usable."""
    def answer(buf: bytes) -> Optional[bytes]:
        if buf.startswith(b"GET "):
            return _head_done(buf)
        return OK if buf.endswith(b"hello") or buf.endswith(b"0\r\n\r\n") else None

    async def main() -> None:
        server, oport, seen = await _origin(answer)
        conf, svc = proxy_service_with(_one(oport))
        async with _serve(svc, conf, fast) as (port, _):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"POST /e HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n" + framing +
                    b"\r\n\r\n" + body + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            first = await asyncio.wait_for(read_exact_response(r), 10)
            second = await asyncio.wait_for(read_exact_response(r), 10)
            w.close()
        server.close()
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"ok"), first
        assert second.startswith(b"HTTP/1.1 200 "), second
        got = b"".join(seen)
        assert b"hello" in got and b"upgrade" not in got.lower() and b"GET /next " in got, got
    run(main())


@pytest.mark.parametrize("keep_alive", [False, True])
def test_an_http10_upgrade_request_is_an_ordinary_request(fast: bool, keep_alive: bool) -> None:
    """RFC 9110 7.8: a server ignores Upgrade in an HTTP/1.0 request, and 15.2: no 1xx (so no
    101) to a 1.0 client. The origin gets no Upgrade; a kept-alive connection goes on."""
    async def main() -> None:
        server, oport, seen = await _origin()
        conf, svc = proxy_service_with(_one(oport))
        connection = b"keep-alive, Upgrade" if keep_alive else b"Upgrade"
        async with _serve(svc, conf, fast) as (port, _):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /ws HTTP/1.0\r\nHost: a\r\nConnection: " + connection +
                    b"\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
                    b"\r\nSec-WebSocket-Version: 13\r\n\r\nGET /next HTTP/1.0\r\nHost: a\r\n\r\n")
            first = await asyncio.wait_for(read_exact_response(r), 10)
            try:
                rest = await asyncio.wait_for(r.read(), 5)
            except asyncio.TimeoutError:
                rest = b"(still open)"
            w.close()
        server.close()
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"ok"), first
        got = b"".join(seen)
        assert got.startswith(b"GET /ws HTTP/1.1\r\n") and b"upgrade" not in got.lower(), got
        if keep_alive:  # the pipelined request is answered, then the 1.0 connection closes
            assert rest.startswith(b"HTTP/1.1 200 ") and b"GET /next " in got, (rest, got)
        else:  # the first request closed the connection: the rest is ignored
            assert rest == b"" and b"/next" not in got, (rest, got)
    run(main())


_ADMIN_ROUTES = ("      - {path_prefix: /admin, upstream: admin}\n"
                 "      - {path_prefix: /, upstream: public}\n")


async def _routed(routes: str, *names: str) -> tuple[dict[str, tuple[Any, list[bytes]]], Any,
                                                       Any]:
    """An origin per upstream group ``names`` and a proxy with ``routes`` (YAML list items):
    ({name: (server, what it received)}, conf, service)."""
    origins = {}
    ups = ""
    for name in names:
        server, port, seen = await _origin()
        origins[name] = (server, seen)
        ups += f'      - {{name: {name}, backends: [{{addr: "127.0.0.1:{port}"}}]}}\n'
    conf, svc = proxy_service_with(ups, "    routes:\n" + routes)
    return origins, conf, svc


def test_absolute_form_is_routed_by_its_path_and_goes_up_as_origin_form(fast: bool) -> None:
    async def main() -> None:
        origins, conf, svc = await _routed(_ADMIN_ROUTES, "admin", "public")
        async with _serve(svc, conf, fast) as (port, _):
            first, _rest = await _send(port, b"GET http://a.test/admin/x?q=1 HTTP/1.1\r\n"
                                             b"Host: a.test\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200 "), first
        (admin, aseen), (public, pseen) = origins["admin"], origins["public"]
        admin.close()
        public.close()
        assert pseen == [] and b"".join(aseen).startswith(b"GET /admin/x?q=1 HTTP/1.1\r\n")
    run(main())


def test_a_1xx_loses_its_hop_by_hop_fields_and_its_connection_close_ends_nothing(
        fast: bool) -> None:
    hint = (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n"
            b"Connection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Length: 0\r\n\r\n")

    async def main() -> None:
        server, oport, _ = await _origin(lambda buf: hint + OK if b"\r\n\r\n" in buf else None)
        conf, svc = proxy_service_with(_one(oport))
        async with _serve(svc, conf, fast) as (port, _):
            first, _rest = await _send(port, b"GET /h HTTP/1.1\r\nHost: a\r\n\r\n")
        server.close()
        early, _, final = first.partition(b"\r\n\r\n")
        assert early.split(b"\r\n") == [b"HTTP/1.1 103 Early Hints",
                                        b"Link: </s.css>; rel=preload"], early
        assert final.startswith(b"HTTP/1.1 200 ") and final.endswith(b"\r\n\r\nok"), final
    run(main())


def test_connect_is_501_and_reaches_no_upstream(fast: bool) -> None:
    async def main() -> None:
        server, oport, seen = await _origin()
        conf, svc = proxy_service_with(_one(oport))
        async with _serve(svc, conf, fast) as (port, _):
            first, rest = await _send(port, b"CONNECT a.test:443 HTTP/1.1\r\n"
                                            b"Host: a.test:443\r\n\r\n\x16\x03\x01")
        server.close()
        assert first.startswith(b"HTTP/1.1 501 ") and rest == b"" and seen == [], (first, rest)
    run(main())


async def _first(port: int, data: bytes) -> bytes:
    """The first response to ``data`` (the connection is closed after it)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    try:
        return await asyncio.wait_for(read_exact_response(r), 10)
    finally:
        w.close()


@pytest.mark.parametrize("target", [b"//admin", b"/./admin", b"/%61dmin", b"/%2Fadmin",
                                    b"/public/../admin", b"/public/%2e%2e/admin", b"/admin/x",
                                    b"http://a.test/../admin", b"http://a.test//admin"])
def test_a_path_route_cannot_be_bypassed_by_spelling_the_path_otherwise(
        fast: bool, target: bytes) -> None:
    """Routes match the normalised path, as nginx's location does: the origin behind the
    other route would resolve these to /admin and serve it. The client's own target still
    goes upstream."""
    async def main() -> None:
        origins, conf, svc = await _routed(_ADMIN_ROUTES, "admin", "public")
        async with _serve(svc, conf, fast) as (port, _):
            first = await _first(port, b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200 "), first
        (admin, aseen), (public, pseen) = origins["admin"], origins["public"]
        admin.close()
        public.close()
        assert pseen == [] and aseen, (target, pseen)
    run(main())


def test_a_host_route_matches_the_name_with_its_trailing_dot(fast: bool) -> None:
    async def main() -> None:
        origins, conf, svc = await _routed("      - {host: api.test, upstream: api}\n"
                                           "      - {path_prefix: /, upstream: other}\n",
                                           "api", "other")
        async with _serve(svc, conf, fast) as (port, _):
            first = await _first(port, b"GET / HTTP/1.1\r\nHost: API.TEST.:8080\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200 "), first
        (api, aseen), (other, oseen) = origins["api"], origins["other"]
        api.close()
        other.close()
        assert oseen == [] and aseen
    run(main())


def test_forwarded_for_joins_every_line_and_names_a_unix_client(tmp_path: Any) -> None:
    """X-Forwarded-For lines are one list (RFC 9110 5.3): all of them stay, ours appended;
    a client on a Unix socket is appended as "unix:" (nginx's $remote_addr), so its own
    last entry never passes for ours."""
    from tests.protocol.test_http_app_helpers import serving_unix

    async def main() -> None:
        server, oport, seen = await _origin()
        conf, svc = proxy_service_with(_one(oport), "    forwarded_headers: true\n")
        async with _serve(svc, conf, False) as (port, _):
            await _first(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n"
                               b"X-Forwarded-For: 10.0.0.9\r\n\r\n")
        path = str(tmp_path / "p.sock")
        async with serving_unix(svc, conf, path):
            r, w = await asyncio.open_unix_connection(path)
            w.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
            await asyncio.wait_for(read_exact_response(r), 10)
            w.close()
        server.close()
        got = b"".join(seen).lower()
        assert b"x-forwarded-for: 6.6.6.6, 10.0.0.9, 127.0.0.1\r\n" in got, got
        assert b"x-forwarded-for: 6.6.6.6, unix:\r\n" in got, got
    run(main())


@pytest.mark.parametrize("selection", ["fnv", "consistent"])
def test_a_hashed_group_retries_on_the_backends_not_tried_yet(fast: bool, selection: str) -> None:
    """The hash gives the same backend on every attempt: a retry takes the next one not
    tried yet (nginx's proxy_next_upstream) instead of the one that just lost the request."""
    async def main() -> None:
        # Not refused (a connect failure marks the backend down), but lost: each origin
        # accepts, reads the request and closes without a response byte.
        resets = []
        for _ in range(3):
            seen: list[bytes] = []

            async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                              seen: list[bytes] = seen) -> None:
                seen.append(await r.readuntil(b"\r\n\r\n"))
                w.close()
            srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
            resets.append((srv, srv.sockets[0].getsockname()[1], seen))
        backends = ", ".join(f'{{addr: "127.0.0.1:{p}"}}' for _, p, _ in resets)
        conf, svc = proxy_service_with(
            f"      - {{name: o, backends: [{backends}], selection: {selection}, "
            "hash_key: uri}\n")
        async with _serve(svc, conf, fast) as (port, _):
            first = await _first(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        for srv, _, _ in resets:
            srv.close()
        assert first.startswith(b"HTTP/1.1 502 "), first
        tries = [len(seen) for _, _, seen in resets]
        assert sum(tries) == 4 and min(tries) >= 1, tries  # every backend was tried
    run(main())


@pytest.mark.parametrize("selection", ["round_robin", "random"])
def test_a_retry_in_a_weighted_group_goes_to_a_backend_not_tried_yet(
        fast: bool, selection: str) -> None:
    """A weighted ring (or a random pick) repeats a backend: a request lost by one is retried
    on another (nginx's proxy_next_upstream), never again on the one that lost it while an
    untried one is up. Here the heavy backend loses every request it reads."""
    async def main() -> None:
        lost: list[bytes] = []

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            lost.append(await r.readuntil(b"\r\n\r\n"))
            w.close()  # no response byte: retryable
        bad = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        good, gport, gseen = await _origin()
        bport = bad.sockets[0].getsockname()[1]
        conf, svc = proxy_service_with(
            f'      - {{name: o, selection: {selection}, backends: [{{addr: "127.0.0.1:{bport}", '
            f'weight: 3}}, {{addr: "127.0.0.1:{gport}"}}]}}\n')
        async with _serve(svc, conf, fast) as (port, _):
            answers = [await _first(port, b"GET /q%d HTTP/1.1\r\nHost: a\r\n\r\n" % (i % 3))
                       for i in range(12)]  # repeated bytes: the express lane takes some
        bad.close()
        good.close()
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), answers
        assert len(gseen) == 12 and len(lost) <= 12, (len(gseen), len(lost))
        assert lost, "the weighted backend was never picked: the test proves nothing"
    run(main())
