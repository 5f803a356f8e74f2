"""HTTP/2 streams on the proxy's fast path (proxy/fast_path.py driving an ``H2Exchange``),
in-process: an h2 client -> a YAML http_proxy on an h2c listener -> the scripted raw origin
of test_proxy_fast_path. Each stream must be answered as the phase engine answers it (same
status, fields, body), be released once its response is queued, hand over to the engine
where it must (dial, retry, errors), and never leak or keep an upstream connection it
should close."""
from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Optional

import pytest

from pyngora.services.base import WorkerContext

from tests.protocol.test_h2_helpers import H2Client, StreamResult
from tests.protocol.test_http_app_helpers import run, serving
from tests.protocol.test_proxy_fast_path import (ANSWERS, BIG, Origin, count_engine_runs,
                                                 proxy_service, start_origin)

CANCEL = 0x8


def serving_h2c(svc: Any, conf: Any) -> Any:
    """``svc`` as one worker runs it, on an h2c (prior knowledge) listener on 127.0.0.1:0."""
    return serving(svc, conf, h2c=True)


def _h2_conns(ctx: WorkerContext) -> list[Any]:
    return [c for c in ctx.connections._conns if hasattr(c, "_streams")]


def _seen(r: StreamResult) -> tuple:
    return (r.status, r.headers, bytes(r.body), r.informational, r.trailers, r.reset)


def test_streams_are_answered_as_the_engine_answers_them() -> None:
    requests = [("GET", p) for p in ("/len", "/chunked", "/204", "/304", "/reason", "/hints",
                                     "/404", "/len")]
    requests.insert(3, ("HEAD", "/len"))

    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving_h2c(svc, conf) as (port, ctx):
            engine = ctx.state["http_app"]
            runs = count_engine_runs(engine)
            c = await H2Client.connect(port)
            await c.request("GET", "/len")  # dials: the fast path too
            fast = [await c.request(m, p) for m, p in requests]
            assert runs[0] == 0, runs  # every stream went the fast way
            h2conn = _h2_conns(ctx)[0]
            assert not h2conn._streams and h2conn.proto.active == 0  # all released
            engine.fast = None
            slow = [await c.request(m, p) for m, p in requests]
            await c.close()
        server.close()
        for (method, path), a, b in zip(requests, fast, slow):
            assert _seen(a) == _seen(b), (method, path, _seen(a), _seen(b))
        assert fast[0].status == 200 and bytes(fast[0].body) == b"hello"
        assert fast[0].header(b"keep-alive") is None and fast[0].header(b"connection") is None
        assert bytes(fast[1].body) == b"abcdefg"
        assert fast[6].informational and fast[6].status == 200  # (103 Early Hints)
        assert stats["conns"] == 1  # one upstream connection, pooled and reused throughout
    run(main())


def test_concurrent_streams_each_get_their_own_answer() -> None:
    async def main() -> None:
        server, oport, stats = await start_origin(
            lambda path, n: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
            % (len(path), path))
        conf, svc = proxy_service(oport)
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port)
            for _ in range(3):  # later rounds find the connections of earlier ones pooled
                paths = [f"/p{i}" for i in range(40)]
                results = await asyncio.gather(*(c.request("GET", p) for p in paths))
                assert [bytes(r.body) for r in results] == [p.encode() for p in paths]
            h2conn = _h2_conns(ctx)[0]
            assert not h2conn._streams and h2conn.proto.active == 0
            await c.close()
        server.close()
        assert stats["conns"] <= 40
    run(main())


def test_a_stream_reset_mid_response_closes_its_upstream_connection() -> None:
    async def main() -> None:
        server, oport, stats = await start_origin(
            lambda path, n: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
            if path == b"/slow" else None)
        conf, svc = proxy_service(oport)
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port)
            await c.request("GET", "/len")
            runs = count_engine_runs(ctx.state["http_app"])
            sid = c.start("GET", "/slow")
            s = c.streams[sid]
            await asyncio.wait_for(s.received.wait(), 5)
            assert bytes(s.body) == b"partial" and stats["closed"] == 0
            c.reset(sid)
            # The proxy closes its upstream connection instead of waiting for the rest.
            await asyncio.wait_for(stats["closed_event"].wait(), 5)
            r = await c.request("GET", "/len")  # the connection's other streams go on
            assert r.status == 200 and bytes(r.body) == b"hello"
            h2conn = _h2_conns(ctx)[0]
            assert not h2conn._streams and h2conn.proto.active == 0
            await c.close()
        server.close()
        assert stats["closed"] == 1
        assert runs[0] == 1  # the reset stream's end (logged and counted by the engine)
    run(main())


def test_a_slow_reader_gets_a_big_body_whole_with_back_pressure() -> None:
    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port, auto_ack=False)
            await c.request("GET", "/len")
            sid = c.start("GET", "/big")
            s = c.streams[sid]
            acked = 0
            h2conn = _h2_conns(ctx)[0]
            most_queued = 0
            while not s.done.is_set():
                s.received.clear()
                waiter = asyncio.ensure_future(s.received.wait())
                await asyncio.wait([waiter, asyncio.ensure_future(s.done.wait())],
                                   timeout=10, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                most_queued = max(most_queued, h2conn.proto.pending(sid))
                n = len(s.body) - acked
                if n:  # the window goes back only as the test reads: 16 KiB at a time
                    step = min(n, 16384)
                    c.conn.acknowledge_received_data(step, sid)
                    acked += step
                    c.flush()
                    await asyncio.sleep(0)
                elif not s.done.is_set():
                    c.conn.acknowledge_received_data(0, sid)
            pooled = [entry[1] for entry in ctx.state["connector"].pool._lru.values()]
            await c.close()
        server.close()
        assert s.ended and hashlib.sha256(s.body).digest() == hashlib.sha256(BIG).digest()
        assert stats["conns"] == 1  # served on the pooled connection, which survived it
        # The proxy stopped reading the origin while the stream's window was shut, instead
        # of queueing the whole 8 MiB for this client.
        assert 0 < most_queued < 2 * 1024 * 1024, most_queued
        assert len(pooled) == 1 and pooled[0].pause_count >= 1
    run(main())


def test_a_window_that_stays_shut_resets_the_stream_after_send_timeout() -> None:
    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport, "    limits: {send_timeout_seconds: 0.5}\n")
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port, auto_ack=False)
            await c.request("GET", "/len")
            closed_before = stats["closed"]
            s = await c.wait(c.start("GET", "/big"), timeout=10)
            assert s.reset == CANCEL and len(s.body) < len(BIG)
            # The upstream connection, left mid-body, is closed rather than pooled.
            await asyncio.wait_for(stats["closed_event"].wait(), 5)
            h2conn = _h2_conns(ctx)[0]
            assert not h2conn._streams and h2conn.proto.active == 0
            await c.close()
        server.close()
        assert stats["closed"] == closed_before + 1
    run(main())


def test_garbage_is_502_silence_is_504_and_a_closed_pooled_connection_is_retried() -> None:
    def script(path: bytes, n: int) -> Optional[bytes]:
        if path == b"/garbage":
            return b"SPDY/9 what\r\n\r\n"
        if path == b"/stall":
            return b"STALL"
        if path == b"/close-on-reuse":
            return b"CLOSE" if n > 1 else ANSWERS[b"/len"]
        return None

    async def main() -> None:
        server, oport, stats = await start_origin(script)
        conf, svc = proxy_service(oport)
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port)
            await c.request("GET", "/len")
            garbage = await c.request("GET", "/garbage")
            await c.request("GET", "/len")
            stall = await c.request("GET", "/stall")
            await c.request("GET", "/len")
            retried = await c.request("GET", "/close-on-reuse")
            idle = len(ctx.state["connector"].pool)
            h2conn = _h2_conns(ctx)[0]
            assert not h2conn._streams and h2conn.proto.active == 0
            await c.close()
        server.close()
        assert garbage.status == 502 and stall.status == 504
        # The origin closed the pooled connection as the request came: a new one answers it.
        assert retried.status == 200 and bytes(retried.body) == b"hello"
        assert idle == 1  # the broken and the timed-out connections were closed, not pooled
    run(main())


class HoldOrigin(Origin):
    """The scripted origin, except that it holds every ``/hold`` request unanswered (in
    ``stats["held"]``) until the test answers it."""

    def data_received(self, data: bytes) -> None:
        if b" /hold " in data:
            self.stats["held"].append(self)
            return
        super().data_received(data)


def test_a_drain_lets_in_flight_fast_path_streams_finish_then_closes() -> None:
    async def main() -> None:
        stats: dict[str, Any] = {"conns": 0, "closed": 0, "heads": [], "held": [],
                                 "closed_event": asyncio.Event()}
        server = await asyncio.get_running_loop().create_server(
            lambda: HoldOrigin(stats), "127.0.0.1", 0)
        conf, svc = proxy_service(server.sockets[0].getsockname()[1])
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port)
            await c.request("GET", "/len")
            runs = count_engine_runs(ctx.state["http_app"])
            sids = [c.start("GET", "/hold") for _ in range(3)]
            for _ in range(500):  # until the origin holds all three requests
                if len(stats["held"]) == 3:
                    break
                await asyncio.sleep(0.01)
            assert len(stats["held"]) == 3
            ctx.connections.drain()  # a graceful shutdown / upgrade begins
            await asyncio.wait_for(c.goaway_event.wait(), 10)
            for _ in range(1000):  # the final GOAWAY follows the PING's ACK
                if len(c.goaways) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert [g.last_stream_id for g in c.goaways] == [2 ** 31 - 1, sids[-1]]
            assert not c.closed.is_set()
            for origin in stats["held"]:  # the origin answers now
                origin.transport.write(ANSWERS[b"/len"])
            results = [await c.wait(sid) for sid in sids]
            await asyncio.wait_for(c.closed.wait(), 10)  # then the server closes
            await c.close()
        server.close()
        assert all(r.status == 200 and bytes(r.body) == b"hello" and r.ended for r in results)
        assert runs[0] == 0  # they stayed on the fast path throughout
    run(main())


def test_a_content_length_on_a_request_that_ended_with_its_headers_is_malformed() -> None:
    """RFC 9113 8.1.1: its DATA (none) cannot add up to it. Sent on, the origin would take the
    next request on the pooled connection for this one's body."""
    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port)
            await c.request("GET", "/len")
            heads = len(stats["heads"])
            bad = await c.request("GET", "/len", headers=(("content-length", "10"),))
            zero = await c.request("GET", "/len", headers=(("content-length", "0"),))
            await c.close()
        server.close()
        assert bad.reset == 0x1 and not bad.headers  # RST_STREAM PROTOCOL_ERROR
        assert zero.status == 200 and bytes(zero.body) == b"hello"
        assert len(stats["heads"]) == heads + 1  # only the second went upstream
    run(main())


def test_a_bug_in_the_forwarder_answers_502_and_still_releases_the_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pyngora.proxy import fast_path
    real = fast_path._Forward.run
    broken = [0]

    def run_once_broken(self: Any) -> None:
        if not broken[0]:
            broken[0] = 1
            raise RuntimeError("a bug")
        real(self)
    monkeypatch.setattr(fast_path._Forward, "run", run_once_broken)

    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service(oport)
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port)
            first = await c.request("GET", "/len")
            second = await c.request("GET", "/len")
            h2conn = _h2_conns(ctx)[0]
            assert not h2conn._streams and h2conn.proto.active == 0
            await c.close()
        server.close()
        assert first.status == 502 and second.status == 200
    run(main())


def test_trailers_that_end_a_body_short_of_its_content_length_are_malformed() -> None:
    """RFC 9113 8.1.1 holds whatever ends the stream: a body cut short by trailers must not
    reach the origin as complete (it would read the next request as the rest of it)."""
    async def main() -> None:
        server, oport, stats = await start_origin(
            lambda path, n: b"STALL" if path == b"/trl" else None)
        conf, svc = proxy_service(oport)
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port)
            await c.request("GET", "/len")
            for body in (b"", b"he"):
                sid = c.start("POST", "/trl", (("content-length", "5"),), end=False)
                if body:
                    await c.send_body(sid, body, end=False)
                c.conn.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
                c.flush()
                r = await c.wait(sid, timeout=5)
                assert r.reset == 0x1 and not r.headers, (body, r.reset, r.headers)
            # Whatever the origin got of those requests, their connections were not pooled.
            r = await c.request("GET", "/len")
            assert r.status == 200 and bytes(r.body) == b"hello"
            await c.close()
        server.close()
    run(main())
