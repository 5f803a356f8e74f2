"""The proxy's fast path (proxy/fast_path.py), in-process over loopback against a raw origin
whose every byte is scripted: it must answer exactly as the phase engine does (same bytes,
same retries, same statuses), hand over to the engine where it must, and never leak an
upstream connection."""
from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import threading
import time
from typing import Any, Callable, Optional

import pytest

from pyngora.config.loader import parse_text
from pyngora.proxy import ProxyHttp, Session, http_proxy_service
from pyngora.proxy.declarative import build_proxy_service
from pyngora.proxy.engine import ProxyEngine, plan_for
from pyngora.proxy.fast_path import FastPath
from pyngora.upstreams.peer import HttpPeer

from tests.protocol.test_http_app_helpers import run, serving

BIG = bytes(range(256)) * 32768  # 8 MiB

# path -> the origin's raw answer (no Date: the bytes are deterministic)
ANSWERS: dict[bytes, bytes] = {
    b"/len": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
             b"Keep-Alive: timeout=5\r\nConnection: keep-alive\r\n\r\nhello",
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
                 b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    b"/204": b"HTTP/1.1 204 No Content\r\nX-B: 2\r\n\r\n",
    b"/304": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"/reason": b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok",
    b"/hints": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz",
    b"/404": b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnop",
    b"/big": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG,
}


class Origin(asyncio.Protocol):
    """Answers each request head by its path; ``script(path, nth_on_conn)`` may override:
    return bytes to send, ``b"CLOSE"`` to close without answering, ``b"STALL"`` to say
    nothing, or None for the table above."""

    def __init__(self, stats: dict[str, Any],
                 script: Optional[Callable[[bytes, int], Optional[bytes]]] = None) -> None:
        self.stats, self.script = stats, script
        self.buf = b""
        self.n = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.stats["conns"] += 1

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.stats["closed"] += 1
        self.stats["closed_event"].set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            method, path = head.split(b" ")[:2]
            self.stats["heads"].append(head)
            self.n += 1
            answer = self.script(path, self.n) if self.script else None
            if answer is None:
                answer = ANSWERS[path]
                if method == b"HEAD":
                    answer = answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            if answer == b"CLOSE":
                self.transport.close()
                return
            if answer != b"STALL":
                self.transport.write(answer)


async def start_origin(script: Optional[Callable[[bytes, int], Optional[bytes]]] = None
                       ) -> tuple[Any, int, dict[str, Any]]:
    stats: dict[str, Any] = {"conns": 0, "closed": 0, "heads": [],
                             "closed_event": asyncio.Event()}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Origin(stats, script), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], stats


def proxy_service_with(upstreams: str, extra: str = "", balancer_factory: Any = None) -> Any:
    """A YAML http_proxy on a free loopback port: ``upstreams`` is its (indented) list of
    upstream groups, ``extra`` more service keys (routes, limits...); ``balancer_factory``
    as ``build_proxy_service`` takes it."""
    conf = parse_text(f"""version: 1
services:
  - name: p
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
{upstreams}{extra}""", "<test>")
    return conf, build_proxy_service(conf, conf.services[0], balancer_factory=balancer_factory)


def proxy_service(origin_port: int, extra: str = "") -> Any:
    return proxy_service_with(f"""      - name: o
        backends: [{{addr: "127.0.0.1:{origin_port}"}}]
        timeouts: {{read_seconds: 1}}
""", extra)


def count_engine_runs(engine: ProxyEngine) -> list[int]:
    """Count the requests the fast path hands to the engine (an instance attribute shadows
    the method; the fast path looks it up per request)."""
    calls = [0]
    real = engine.run

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)
    engine.run = counting  # type: ignore[method-assign]
    return calls


async def read_exact_response(reader: asyncio.StreamReader, method: bytes = b"GET") -> bytes:
    """One whole response as raw bytes (1xx heads included), framed as the proxy framed it."""
    out = b""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        out += head
        status = int(head[9:12])
        if 100 <= status < 200:
            continue
        break
    lower = head.lower()
    if method == b"HEAD" or status in (204, 304):
        return out
    if b"\r\ncontent-length:" in lower:
        n = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
        return out + await reader.readexactly(n)
    if b"chunked" in lower:
        while True:
            line = await reader.readuntil(b"\r\n")
            out += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                out += await reader.readuntil(b"\r\n")  # no trailers in these tests
                return out
            out += await reader.readexactly(size + 2)
    return out + await reader.read()


async def exchange(port: int, requests: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Send requests one by one on one connection; return each raw response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
    try:
        out = []
        for method, path in requests:
            writer.write(method + b" " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
            out.append(await read_exact_response(reader, method))
        return out
    finally:
        writer.close()


class SyncPeer(ProxyHttp):
    def __init__(self, port: int) -> None:
        self.port = port

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:  # type: ignore[override]
        return HttpPeer(f"127.0.0.1:{self.port}")


class AsyncPeer(SyncPeer):
    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:  # type: ignore[override]
        return HttpPeer(f"127.0.0.1:{self.port}")


class Filtering(SyncPeer):
    async def request_filter(self, session: Session, ctx: Any) -> bool:
        return False


def test_serves_only_proxies_with_no_phase_but_a_sync_upstream_peer() -> None:
    assert FastPath.serves(plan_for(SyncPeer))
    assert not FastPath.serves(plan_for(AsyncPeer))
    assert not FastPath.serves(plan_for(Filtering))
    _, svc = proxy_service(1)
    assert FastPath.serves(plan_for(type(svc.proxy)))
    _, svc = proxy_service(1, "    forwarded_headers: true\n")
    assert not FastPath.serves(plan_for(type(svc.proxy)))  # an upstream_request_filter


def test_same_bytes_as_the_engine_and_the_fast_path_takes_them() -> None:
    requests = [(b"GET", p) for p in (b"/len", b"/chunked", b"/204", b"/304", b"/reason",
                                      b"/hints", b"/404", b"/len")]
    requests.insert(3, (b"HEAD", b"/len"))

    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            engine = ctx.state["http_app"]
            assert engine.fast is not None
            runs = count_engine_runs(engine)
            warm = await exchange(port, [(b"GET", b"/len")])  # dials: the fast path too
            fast = await exchange(port, requests)
            assert runs[0] == 0, runs  # every request went the fast way
            engine.fast = None
            slow = await exchange(port, requests)
        server.close()
        assert warm[0] == fast[0]
        for (method, path), a, b in zip(requests, fast, slow):
            assert a == b, (method, path, a, b)
        assert fast[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"keep-alive" not in fast[0]
        assert fast[1].endswith(b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        assert fast[5].startswith(b"HTTP/1.1 200 Fine Thanks\r\n")
        assert fast[6].startswith(b"HTTP/1.1 103 Early Hints\r\nLink:")
        assert stats["conns"] == 1  # one upstream connection, pooled and reused throughout
        # Hop-by-hop fields of the client's request never reach the origin.
        assert all(b"Host: t" in h for h in stats["heads"])
    run(main())


def test_pipelined_requests_answered_in_order() -> None:
    async def main() -> None:
        server, oport, stats = await start_origin(
            lambda path, n: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
            % (len(path), path))
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            await exchange(port, [(b"GET", b"/warm")])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            paths = [b"/p%d" % i for i in range(50)]
            writer.write(b"".join(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % p for p in paths))
            bodies = []
            for _ in paths:
                r = await read_exact_response(reader)
                bodies.append(r.partition(b"\r\n\r\n")[2])
            writer.close()
        server.close()
        assert bodies == paths
        assert stats["conns"] == 1
    run(main())


def test_pooled_connection_closed_as_reused_is_retried_on_a_new_one() -> None:
    # The origin closes every connection when its 2nd request arrives, without answering:
    # the race of an idle keep-alive connection closed just as the proxy reuses it.
    async def main() -> None:
        server, oport, stats = await start_origin(
            lambda path, n: b"CLOSE" if n == 2 else None)
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            runs = count_engine_runs(ctx.state["http_app"])
            out = await exchange(port, [(b"GET", b"/len")] * 3)
        server.close()
        assert all(r.endswith(b"\r\n\r\nhello") for r in out), out
        # Request 1 dials (on the fast path); 2 and 3 go the fast way on the pooled
        # connection, which the origin closes; each is retried by the engine on a new one.
        assert runs[0] == 2
        assert stats["conns"] == 3 and len(stats["heads"]) == 5
    run(main())


def test_garbage_is_502_silence_is_504_and_nothing_is_pooled() -> None:
    def script(path: bytes, n: int) -> Optional[bytes]:
        if path == b"/garbage":
            return b"SPDY/9 what\r\n\r\n"
        if path == b"/stall":
            return b"STALL"
        return None

    async def main() -> None:
        server, oport, stats = await start_origin(script)
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            out = await exchange(port, [(b"GET", b"/len")])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /garbage HTTP/1.1\r\nHost: t\r\n\r\n")
            garbage = await r.read()  # an error answer closes the connection
            w.close()
            await exchange(port, [(b"GET", b"/len")])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /stall HTTP/1.1\r\nHost: t\r\n\r\n")
            stall = await r.read()
            w.close()
            pool = ctx.state["connector"].pool
            idle = len(pool)
        server.close()
        assert out[0].endswith(b"hello")
        assert garbage.startswith(b"HTTP/1.1 502 "), garbage
        assert stall.startswith(b"HTTP/1.1 504 "), stall
        assert idle == 0  # the broken and the timed-out connections were closed, not pooled
    run(main())


def test_client_gone_mid_response_closes_the_upstream_connection() -> None:
    async def main() -> None:
        server, oport, stats = await start_origin(
            lambda path, n: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
            if path == b"/slow" else None)
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            await exchange(port, [(b"GET", b"/len")])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await r.readuntil(b"partial")
            assert stats["closed"] == 0
            w.close()
            # The proxy closes its upstream connection instead of waiting for the rest.
            await asyncio.wait_for(stats["closed_event"].wait(), 5)
        server.close()
        assert stats["closed"] == 1
    run(main())


def test_slow_client_gets_a_big_body_whole_with_back_pressure() -> None:
    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            await exchange(port, [(b"GET", b"/len")])
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            r, w = await asyncio.open_connection(sock=sock, limit=1 << 16)
            w.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")
            digest = hashlib.sha256()
            got = 0
            # The proxy's buffer towards this client, sampled as the body goes through.
            down = [c for c in ctx.connections._conns if c.transport is not None]
            most_buffered = 0
            while got < len(BIG):
                piece = await r.read(4096)  # small reads: the proxy's buffers fill up
                assert piece
                digest.update(piece)
                got += len(piece)
                for c in down:
                    if not c.closed:
                        most_buffered = max(most_buffered, c.transport.get_write_buffer_size())
            w.close()
            pooled = [entry[1] for entry in ctx.state["connector"].pool._lru.values()]
        server.close()
        assert got == len(BIG) and digest.digest() == hashlib.sha256(BIG).digest()
        assert stats["conns"] == 1  # served on the pooled connection, which survived it
        # The slow client made the proxy wait for its buffer to drain instead of queueing the
        # whole 8 MiB for it, and stop reading the origin meanwhile.
        assert 0 < most_buffered < 2 * 1024 * 1024, most_buffered
        assert len(pooled) == 1 and pooled[0].pause_count >= 1
    run(main())


def test_requests_with_a_body_go_to_the_engine() -> None:
    async def main() -> None:
        server, oport, stats = await start_origin(
            lambda path, n: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            await exchange(port, [(b"GET", b"/len")])
            runs = count_engine_runs(ctx.state["http_app"])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            resp = await read_exact_response(r)
            w.close()
        server.close()
        assert resp.endswith(b"\r\n\r\nok") and runs[0] == 1
    run(main())


def test_requests_leave_no_garbage_cycles() -> None:
    # Objects kept alive only by reference cycles wait for the garbage collector, whose full
    # collections are the proxy's worst latency tail: the fast path must leave none behind.
    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            await exchange(port, [(b"GET", b"/len")] * 3)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            gc.collect()
            gc.disable()
            try:
                for _ in range(300):
                    writer.write(b"GET /len HTTP/1.1\r\nHost: t\r\n\r\n")
                    await read_exact_response(reader)
                cyclic = gc.collect()
            finally:
                gc.enable()
            writer.close()
        server.close()
        assert cyclic < 100, f"{cyclic} objects in cycles after 300 requests"
    run(main())


def test_closed_connections_leave_no_garbage_cycles() -> None:
    # Connection churn on both sides: each client connection closes after one request, and
    # the origin closes each upstream connection after its response. A closed connection must
    # be freed at once (transport <-> protocol and parser <-> llhttp cycles broken).
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    async def main() -> None:
        server, oport, stats = await start_origin(lambda path, n: close)
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):

            async def one() -> bytes:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = await r.read()
                w.close()
                await w.wait_closed()
                return data
            await one()
            gc.collect()
            gc.disable()
            try:
                answers = [await one() for _ in range(100)]
                # the proxy's side of the last connections closes after the client's
                await until_closed(ctx, stats, 101)
                cyclic = gc.collect()
            finally:
                gc.enable()
        server.close()
        assert all(a.endswith(b"\r\n\r\nok") for a in answers)
        assert cyclic < 100, f"{cyclic} objects in cycles after 100 connections"
    run(main())


async def until_closed(ctx: Any, stats: dict[str, Any], upstream_closed: int) -> None:
    """Until the proxy holds no client connection and the origin saw its connections close."""
    for _ in range(500):
        if not len(ctx.connections) and stats["closed"] >= upstream_closed:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still open: {len(ctx.connections)} client connections, "
                         f"{stats['closed']} upstream closed")


# -- found by review: each runs the engine and the fast path on the same scenario ----------

def both_ways(scenario: Callable[[bool], Any]) -> tuple[Any, Any]:
    return scenario(False), scenario(True)


def read_until_closed(fast: bool, request: bytes,
                      script: Optional[Callable[[bytes, int], Optional[bytes]]] = None) -> bytes:
    """``request`` on a new client connection, after one warm-up GET (so the upstream
    connection is pooled), on the fast path or the engine: b"closed after: " and what the
    client read until the proxy closed, or b"no close within 5 s"."""
    async def main() -> bytes:
        server, oport, _ = await start_origin(script)
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            if not fast:
                ctx.state["http_app"].fast = None
            await exchange(port, [(b"GET", b"/len")])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(request)
            try:
                out = b"closed after: " + await asyncio.wait_for(r.read(), 5)
            except asyncio.TimeoutError:
                out = b"no close within 5 s"
            w.close()
        server.close()
        return out
    return run(main())


def test_a_101_to_a_plain_request_is_a_502_both_ways() -> None:
    """A 101 to a request that asked for no upgrade is a bad upstream response (RFC 9110
    15.2.2): 502, and the connection closed."""
    switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n"

    def scenario(fast: bool) -> bytes:
        return read_until_closed(fast, b"GET /sw HTTP/1.1\r\nHost: t\r\n\r\n",
                                 lambda path, n: switching if path == b"/sw" else None)
    engine, fast = both_ways(scenario)
    assert engine == fast and engine.startswith(b"closed after: HTTP/1.1 502 "), (engine, fast)


def test_a_response_in_before_its_deadline_is_no_504_when_the_loop_ran_late() -> None:
    # The answer arrives at 0.5 s of a 1 s read timeout, but another callback of the same loop
    # iteration keeps the loop busy until 1.2 s: the timer due meanwhile must not win.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    def scenario(fast: bool) -> bytes:
        async def main() -> bytes:
            loop = asyncio.get_running_loop()
            busy_r, busy_w = socket.socketpair()
            busy_r.setblocking(False)

            def on_busy() -> None:
                busy_r.recv(10)
                time.sleep(0.7)  # some other work of this worker, in the same iteration

            loop.add_reader(busy_r.fileno(), on_busy)

            class Late(asyncio.Protocol):
                def connection_made(self, t: Any) -> None:
                    self.t = t

                def data_received(self, data: bytes) -> None:
                    if b"/late" not in data:
                        self.t.write(answer)
                        return

                    def later() -> None:
                        self.t.write(answer)  # readable first, then the busy socket
                        busy_w.send(b"x")
                    loop.call_later(0.5, later)

            server = await loop.create_server(Late, "127.0.0.1", 0)
            conf, svc = proxy_service(server.sockets[0].getsockname()[1])  # read_seconds: 1
            try:
                async with serving(svc, conf) as (port, ctx):
                    if not fast:
                        ctx.state["http_app"].fast = None
                    await exchange(port, [(b"GET", b"/warm")])
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    w.write(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n")
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                    w.close()
            finally:
                server.close()
                loop.remove_reader(busy_r.fileno())
                busy_r.close()
                busy_w.close()
            return head.split(b"\r\n")[0]
        return run(main())
    engine, fast = both_ways(scenario)
    assert engine == fast == b"HTTP/1.1 200 OK", (engine, fast)


class ThreadOrigin:
    """An origin on plain threads, so it can act while the proxy's loop is blocked."""

    def __init__(self) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, _, buf = buf.partition(b"\r\n\r\n")
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            except OSError:
                return

    def close(self) -> None:
        self.lsock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("retries,farewell", [
    ("", b""), ("0", b""),
    ("", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")])
def test_a_pooled_connection_the_origin_closes_in_the_same_iteration_is_not_used(
        retries: str, farewell: bytes) -> None:
    # The client's request and the origin's FIN on the idle pooled connection (after a 408,
    # in one case) are read in one poll phase, in that order: the engine finds the pooled
    # connection dead before it takes it, and so must the fast path (a 502 otherwise when no
    # retry is allowed, or when the 408's bytes made the response look started).
    def scenario(fast: bool) -> bytes:
        async def main() -> bytes:
            origin = ThreadOrigin()
            conf, svc = proxy_service(origin.port, f"        retries: {retries}\n"
                                      if retries else "")
            try:
                async with serving(svc, conf) as (port, ctx):
                    if not fast:
                        ctx.state["http_app"].fast = None
                    await exchange(port, [(b"GET", b"/warm")])
                    assert len(ctx.state["connector"].pool) == 1
                    client = socket.create_connection(("127.0.0.1", port))
                    me = client.getsockname()
                    for _ in range(500):  # until the proxy accepted this very connection
                        if any(c.client_addr == me for c in ctx.connections._conns):
                            break
                        await asyncio.sleep(0.01)
                    else:
                        raise AssertionError("the proxy did not accept the connection")
                    up = origin.conns[0]

                    def both() -> None:
                        client.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
                        if farewell:
                            up.sendall(farewell)
                        up.shutdown(socket.SHUT_WR)
                    actor = threading.Thread(target=both)
                    actor.start()
                    actor.join()  # blocks the loop: both arrive before its next poll
                    client.setblocking(False)
                    r, w = await asyncio.open_connection(sock=client)
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                    w.close()
            finally:
                origin.close()
            return head.split(b"\r\n")[0]
        return run(main())
    engine, fast = both_ways(scenario)
    assert engine == fast == b"HTTP/1.1 200 OK", (engine, fast)


# -- whole plain responses (protocols/h1_splice.py), sent as they came -----------------------

def count_whole(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the responses take_whole took (the others went through events)."""
    from pyngora.upstreams import h1_upstream
    taken = [0]
    real = h1_upstream.take_whole

    def counting(data: bytes, limits: Any) -> Any:
        out = real(data, limits)
        taken[0] += out is not None
        return out
    monkeypatch.setattr(h1_upstream, "take_whole", counting)
    return taken


def test_whole_plain_responses_go_as_they_came_and_the_rest_as_events(
        monkeypatch: pytest.MonkeyPatch) -> None:
    taken = count_whole(monkeypatch)
    requests = [(b"GET", b"/len"), (b"GET", b"/chunked"), (b"HEAD", b"/len"), (b"GET", b"/304"),
                (b"GET", b"/reason"), (b"GET", b"/hints"), (b"GET", b"/404"), (b"GET", b"/len")]

    async def main() -> tuple[list[bytes], list[bytes], int]:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            await exchange(port, [(b"GET", b"/len")])  # dials: the engine's
            before = taken[0]
            fast = await exchange(port, requests)
            took = taken[0] - before
            ctx.state["http_app"].fast = None
            slow = await exchange(port, requests)
        server.close()
        assert stats["conns"] == 1  # the connection went back to the pool after each
        return fast, slow, took
    fast, slow, took = run(main())
    assert fast == slow
    # Only /len (twice), /reason and /404 are whole plain answers to a GET; the engine and the
    # HEAD request never offer them.
    assert took == 4, took
    assert fast[0] == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def test_a_whole_response_that_closes_is_not_pooled_and_the_client_stays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    taken = count_whole(monkeypatch)
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    trailing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"

    async def main() -> tuple[list[bytes], dict[str, Any], int]:
        server, oport, stats = await start_origin(
            lambda path, n: close if path == b"/close" else trailing if path == b"/extra" else None)
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            await exchange(port, [(b"GET", b"/len")])
            out = await exchange(port, [(b"GET", b"/close"), (b"GET", b"/len"),
                                        (b"GET", b"/extra"), (b"GET", b"/len")])
            idle = len(ctx.state["connector"].pool)
        server.close()
        return out, stats, idle
    out, stats, idle = run(main())
    # Same client connection throughout; the origin's close, and the stray bytes after /extra
    # (declined, so the full parser marks the connection unusable), each cost a new dial.
    assert out[0] == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert out[2] == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert all(o.endswith(b"hello") for o in (out[1], out[3]))
    assert stats["conns"] == 3 and idle == 1
    # The warm-up, /close, and each /len after it, which found no pooled connection (the
    # fast path dialled it); /extra was not plain.
    assert taken[0] == 4


def test_a_whole_response_to_a_client_that_closes_says_so_as_the_engine_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    taken = count_whole(monkeypatch)

    def scenario(fast: bool) -> bytes:
        return read_until_closed(fast, b"GET /len HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    engine, fast = both_ways(scenario)
    assert engine == fast == (b"closed after: HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                              b"Content-Length: 5\r\nConnection: close\r\n\r\nhello"), (engine, fast)
    assert taken[0] == 2  # the fast way's warm-up (dialled) and its request


# -- the request head sent on as the client sent it (RequestHead.raw) ------------------------

class EditingPeer(SyncPeer):
    """An upstream_peer that rewrites the request's path: the fast path must send the edit."""

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:  # type: ignore[override]
        session.req_header.uri = "/len"
        return super().upstream_peer(session, ctx)


def test_the_request_head_goes_upstream_as_sent_unless_a_field_must_go() -> None:
    plain = b"GET /len HTTP/1.1\r\nhost: t\r\nX-Odd:  spaced \r\nAccept: */*\r\n\r\n"
    hop = (b"GET /len HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
           b"Expect: 100-continue\r\nX-Kept: 2\r\n\r\n")
    browser = b"GET /len HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\nX-B:  1 \r\n\r\n"

    async def main() -> list[bytes]:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving(svc, conf) as (port, ctx):
            await exchange(port, [(b"GET", b"/len")])
            runs = count_engine_runs(ctx.state["http_app"])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            for head in (plain, hop, browser):
                w.write(head)
                assert (await read_exact_response(r)).endswith(b"hello")
            w.close()
            assert runs[0] == 0
        server.close()
        return stats["heads"][1:]
    plain_up, hop_up, browser_up = run(main())
    assert plain_up + b"\r\n\r\n" == plain  # byte for byte, spacing and case included
    assert hop_up == b"GET /len HTTP/1.1\r\nHost: t\r\nX-Kept: 2"
    assert browser_up == b"GET /len HTTP/1.1\r\nHost: t\r\nX-B:  1 "  # its line cut, no more


def test_an_upstream_peer_that_edits_the_request_is_obeyed_on_both_paths() -> None:
    def scenario(fast: bool) -> list[bytes]:
        async def main() -> list[bytes]:
            server, oport, stats = await start_origin()
            svc = http_proxy_service(None, EditingPeer(oport))
            async with serving(svc) as (port, ctx):
                if not fast:
                    ctx.state["http_app"].fast = None
                out = await exchange(port, [(b"GET", b"/other"), (b"GET", b"/other")])
            server.close()
            assert all(o.endswith(b"hello") for o in out)
            return stats["heads"]
        return run(main())
    engine, fast = both_ways(scenario)
    assert engine == fast and all(h.startswith(b"GET /len ") for h in fast), (engine, fast)


def test_routing_reads_the_head_without_building_it_so_the_raw_head_still_goes() -> None:
    # The declarative proxy's routes look at Host and the path: reading them must not build
    # session.req_header, or every routed request would lose the client's own bytes.
    sent = b"GET /static/a HTTP/1.1\r\nHost: T.example\r\nX-Odd:  spaced \r\n\r\n"

    async def main() -> tuple[list[bytes], list[bytes]]:
        server, oport, stats = await start_origin(
            lambda path, n: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        other, oport2, stats2 = await start_origin(
            lambda path, n: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother")
        conf, svc = proxy_service(oport, f"""\
      - {{name: o2, backends: [{{addr: "127.0.0.1:{oport2}"}}]}}
    routes:
      - {{host: t.example, path_prefix: /static, upstream: o2}}
    upstream: o
""")
        async with serving(svc, conf) as (port, ctx):
            assert ctx.state["http_app"].fast is not None
            r, w = await asyncio.open_connection("127.0.0.1", port)
            out = []
            for head in (sent, sent, b"GET /other HTTP/1.1\r\nHost: t.example\r\n\r\n"):
                w.write(head)
                out.append(await read_exact_response(r))
            w.close()
        server.close()
        other.close()
        return out, stats2["heads"] + stats["heads"]
    out, heads = run(main())
    assert [o.endswith(b"other") for o in out] == [True, True, False]
    # The first request dialled (the engine's path); the second went the fast way, raw.
    assert heads[1] + b"\r\n\r\n" == sent


def test_a_request_that_arrives_as_the_worker_drains_is_answered_then_closed() -> None:
    # A fresh connection is not idle (its first request is on its way): when draining begins
    # before the request arrives, the request still gets its whole answer, with
    # Connection: close, on both paths (a body-less request's end must not count as the end
    # of its response).
    def scenario(fast: bool) -> bytes:
        async def main() -> bytes:
            server, oport, _ = await start_origin()
            conf, svc = proxy_service(oport)
            async with serving(svc, conf) as (port, ctx):
                if not fast:
                    ctx.state["http_app"].fast = None
                await exchange(port, [(b"GET", b"/len")])  # the upstream connection is pooled
                r, w = await asyncio.open_connection("127.0.0.1", port)
                for _ in range(500):
                    if len(ctx.connections):
                        break
                    await asyncio.sleep(0.01)
                ctx.connections.drain()
                w.write(b"GET /len HTTP/1.1\r\nHost: t\r\n\r\n")
                out = await asyncio.wait_for(r.read(), 5)
                w.close()
            server.close()
            return out
        return run(main())
    engine, fast = both_ways(scenario)
    assert engine == fast == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                              b"Content-Length: 5\r\nConnection: close\r\n\r\nhello"), (engine, fast)
