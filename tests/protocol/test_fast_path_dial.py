"""Dials on the proxy's fast path (proxy/fast_path.py: a request whose peer has no pooled
connection): the new connection is made by a task of its own, and a dial that fails is
handled as the engine handles its own -- counted, given to ``fail_to_connect`` (the YAML
proxy's tells the balancer and stops retrying once every backend failed), retried on a new
pick, else answered -- over HTTP/1 and HTTP/2; a client that goes while its connection is
being dialled stops the dial."""
from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from pyngora.config.schema import LimitsConf
from pyngora.errors import Error, ErrorType
from pyngora.proxy import http_proxy_service
from pyngora.upstreams.connector import Connector

from tests.protocol.test_h2_fast_path import serving_h2c
from tests.protocol.test_h2_helpers import H2Client
from tests.protocol.test_http_app_helpers import run, serving
from tests.protocol.test_proxy_fast_path import (SyncPeer, count_engine_runs, exchange,
                                                 proxy_service_with, start_origin)
from tests.support import free_port


def _two_backends(dead: int, live: int) -> str:
    return f"""      - name: o
        backends: [{{addr: "127.0.0.1:{dead}"}}, {{addr: "127.0.0.1:{live}"}}]
        timeouts: {{read_seconds: 2, connect_seconds: 2}}
"""


def test_a_refused_dial_goes_to_fail_to_connect_then_is_retried_on_the_other_backend() -> None:
    dead = free_port()  # nothing listens there: connect() is refused at once

    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service_with(_two_backends(dead, oport))
        async with serving(svc, conf) as (port, ctx):
            engine = ctx.state["http_app"]
            runs = count_engine_runs(engine)
            told: list[str] = []
            real = engine.proxy.fail_to_connect

            def counting(session: Any, peer: Any, ctx: Any, e: Any) -> Any:
                told.append(peer.address)
                return real(session, peer, ctx, e)
            engine.proxy.fail_to_connect = counting
            # Four new client connections, each with its own first request: the picks of the
            # dead backend fail to dial and are retried on the live one.
            out = [(await exchange(port, [(b"GET", b"/len")]))[0] for _ in range(4)]
            told_h1 = len(told)
        async with serving_h2c(svc, conf) as (h2port, ctx2):
            runs2 = count_engine_runs(ctx2.state["http_app"])
            c = await H2Client.connect(h2port)
            streams = [await c.request("GET", "/len") for _ in range(4)]
            await c.close()
        server.close()
        assert all(o.startswith(b"HTTP/1.1 200 ") and o.endswith(b"hello") for o in out), out
        assert all(r.status == 200 and bytes(r.body) == b"hello" for r in streams)
        assert told and set(told) == {f"127.0.0.1:{dead}"}, told
        # Each failed dial's retry is the engine's, as after one of its own dials.
        assert runs[0] == told_h1 >= 1 and runs2[0] == len(told) - told_h1 >= 1
        assert stats["conns"] >= 2
    run(main())


def test_a_dial_to_the_only_backend_that_fails_is_a_502_after_one_try() -> None:
    dead = free_port()

    async def main() -> None:
        conf, svc = proxy_service_with(f"""      - name: o
        backends: [{{addr: "127.0.0.1:{dead}"}}]
""")
        async with serving(svc, conf) as (port, ctx):
            h1 = (await exchange(port, [(b"GET", b"/len")]))[0]
        async with serving_h2c(svc, conf) as (port, ctx):
            c = await H2Client.connect(port)
            h2 = await c.request("GET", "/len")
            await c.close()
        assert h1.startswith(b"HTTP/1.1 502 "), h1
        assert h2.status == 502
    run(main())


def test_a_client_that_goes_while_its_connection_is_dialled_stops_the_dial() -> None:
    # A listener that never accepts, with its queue full: further connects hang (the kernel
    # drops their SYNs), as they do towards an overloaded backend.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = []
    for _ in range(3):  # (non-blocking: past the queue's room, a connect hangs)
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(hole.getsockname())
        except BlockingIOError:
            pass
        filler.append(s)
    hport = hole.getsockname()[1]

    async def main() -> None:
        conf, svc = proxy_service_with(f"""      - name: o
        backends: [{{addr: "127.0.0.1:{hport}"}}]
        timeouts: {{connect_seconds: 30}}
""")
        loop = asyncio.get_running_loop()
        async with serving(svc, conf) as (port, ctx):
            baseline = len(asyncio.all_tasks(loop))
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /len HTTP/1.1\r\nHost: t\r\n\r\n")
            await w.drain()

            def dialling() -> list[Any]:
                return [t for t in asyncio.all_tasks(loop) if "Connector.get" in repr(t)]
            for _ in range(200):
                if dialling():
                    break
                await asyncio.sleep(0.01)
            assert dialling(), "the request never started its dial"
            w.close()
            # The dial stops with the client, long before its 30 s connect timeout.
            for _ in range(300):
                if not dialling() and len(asyncio.all_tasks(loop)) <= baseline:
                    break
                await asyncio.sleep(0.01)
            assert not dialling()
            assert len(asyncio.all_tasks(loop)) <= baseline
    try:
        run(main())
    finally:
        for s in filler:
            s.close()
        hole.close()


class _Recorder:
    """An upstream group's metrics recorders, counting what the fast path records."""

    def __init__(self) -> None:
        self.dialled = 0
        self.reused = 0

    def connect_duration(self, seconds: float) -> None:
        self.dialled += 1

    def pool_reused(self) -> None:
        self.reused += 1

    def request_done(self, backend: Any, status: int) -> None:
        pass

    def error(self, backend: Any, etype: Any) -> None:
        pass


def test_a_dial_that_finds_a_pooled_connection_counts_it_once_as_reused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The dial task asks the pool again (get()): a connection pooled meanwhile is taken, and
    recorded as a reuse only, as the engine records it."""
    async def main() -> None:
        server, oport, stats = await start_origin()
        conf, svc = proxy_service_with(f"""      - name: o
        backends: [{{addr: "127.0.0.1:{oport}"}}]
""")
        async with serving(svc, conf) as (port, ctx):
            engine = ctx.state["http_app"]
            await exchange(port, [(b"GET", b"/len")])  # one connection, pooled after
            rec = _Recorder()
            engine._umetrics = lambda peer: rec  # type: ignore[method-assign]
            real = Connector.get_pooled
            calls = [0]

            def none_at_first(self: Connector, peer: Any) -> Any:  # as if it had been taken
                calls[0] += 1                                       # when the request came
                return None if calls[0] == 1 else real(self, peer)
            monkeypatch.setattr(Connector, "get_pooled", none_at_first)
            out = await exchange(port, [(b"GET", b"/len")])
        server.close()
        assert out[0].endswith(b"hello")
        assert stats["conns"] == 1  # the dial took the pooled connection
        assert (rec.dialled, rec.reused) == (0, 1)
    run(main())


def test_an_error_from_fail_to_connect_answers_with_its_status() -> None:
    dead = free_port()

    class Failing(SyncPeer):
        async def fail_to_connect(self, session: Any, peer: Any, ctx: Any, e: Any) -> Any:
            raise Error(ErrorType.HTTPStatus, status=503, context="no dice")

    async def main() -> None:
        proxy = Failing(dead)
        svc = http_proxy_service(None, proxy, limits=LimitsConf())
        async with serving(svc) as (port, ctx):
            engine = ctx.state["http_app"]
            assert engine.fast is not None
            out = (await exchange(port, [(b"GET", b"/len")]))[0]
        assert out.startswith(b"HTTP/1.1 503 "), out
    run(main())
