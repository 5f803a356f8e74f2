"""The express lane (pyngora/proxy/express.py) against the fast path and the phase engine.

Every scenario runs three times in-process: the engine alone (``fast`` and ``express`` None),
the fast path without the express lane, and both (the default). Requests are repeated so the
lane is in play (the parser parses a request the first time, the lane learns it the second,
takes it from the third on), and the lane's takes are counted so a scenario cannot pass by
never using it. The three runs must give the client the same bytes, the origin the same
heads, and Prometheus the same samples.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, Callable, Optional

import pytest

from pyngora.metrics import multiproc, registry
from pyngora.proxy.express import Express

from tests.protocol.test_http_app_helpers import run, serving
from tests.protocol.test_proxy_fast_path import (
    ThreadOrigin, exchange, proxy_service, proxy_service_with, read_exact_response, start_origin)
from tests.protocol.test_raw_paths_parity import (  # noqa: F401 - handler is a fixture
    Lines, body_answer, handler, no_stray_upstream, samples, settle, untimed)

MODES = ("engine", "fast", "express")


def set_mode(ctx: Any, mode: str) -> None:
    """Before the first client connects (a connection reads ``app.express`` when made)."""
    engine = ctx.state["http_app"]
    assert engine.fast is not None and engine.express is not None
    if mode == "engine":
        engine.fast = None
    if mode != "express":
        engine.express = None


def count_takes(monkeypatch: pytest.MonkeyPatch,
                by_target: Optional[dict[bytes, int]] = None) -> list[int]:
    """Count the requests the express lane takes (and in ``by_target``, per request target)."""
    taken = [0]
    real = Express.take

    def counting(self: Express, conn: Any, data: bytes) -> bool:
        ok = real(self, conn, data)
        taken[0] += ok
        if ok and by_target is not None:
            target = data.split(b" ", 2)[1]
            by_target[target] = by_target.get(target, 0) + 1
        return ok
    monkeypatch.setattr(Express, "take", counting)
    return taken


def three(scenario: Callable[[str], Any], taken: list[int]) -> tuple[Any, int]:
    """Run ``scenario`` in each mode; assert the results are equal; return (the result, how
    many requests the express lane took)."""
    results = {}
    counts = {}
    for mode in MODES:
        before = taken[0]
        results[mode] = run(scenario(mode))
        counts[mode] = taken[0] - before
    assert counts["engine"] == counts["fast"] == 0
    assert results["fast"] == results["engine"]
    assert results["express"] == results["engine"]
    return results["express"], counts["express"]


class HeadOrigin(asyncio.Protocol):
    """An origin that hands each request head to ``on_head(head, transport)`` to answer."""

    def __init__(self, on_head: Callable[[bytes, Any], None]) -> None:
        self.on_head = on_head
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.on_head(head, self.transport)


def fresh_metrics(tmp_path: Any, mode: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty metrics directory of this mode's own, and the registry reset: its path."""
    d = str(tmp_path / mode)
    monkeypatch.setenv(multiproc.ENV_VAR, d)
    multiproc.prepare_dir(d, fresh=True)
    registry.reset()
    return d


def client_head(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"


async def closing_request(port: int, path: bytes) -> bytes:
    """One ``Connection: close`` request on a connection of its own: everything until EOF."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(client_head(path, b"Connection: close\r\n"))
        return await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()


def test_repeated_requests_go_express_with_the_same_bytes_metrics_and_pooling(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    by_target: dict[bytes, int] = {}
    taken = count_takes(monkeypatch, by_target)

    def script(path: bytes, n: int) -> Optional[bytes]:
        if path.startswith(b"/k"):
            # 200 KiB: often several reads (then promoted), else taken whole like /k8, /k40
            return body_answer(int(path[2:]) * 1024)
        return None

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            d = fresh_metrics(tmp_path, mode, monkeypatch)
            server, oport, stats = await start_origin(script)
            conf, svc = proxy_service(oport)
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    plan = ([(b"GET", b"/len")] * 5 + [(b"GET", b"/k200")] * 4
                            + [(b"GET", b"/404")] * 4 + [(b"HEAD", b"/len")] * 3
                            + [(b"GET", b"/chunked")] * 4 + [(b"GET", b"/reason")] * 3
                            + [(b"GET", b"/len")] * 2
                            # whole in one read, over VIEW_ABOVE (a view of the read, written
                            # behind its head), and over WRITE_AT_ONCE
                            + [(b"GET", b"/k8")] * 3 + [(b"GET", b"/k40")] * 3)
                    out = await exchange(port, plan)
                    for _ in range(4):  # each closes its connection (the parser's took_known)
                        out.append(await closing_request(port, b"/len"))
                    # two at once: the second waits for the first's response
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    for _ in range(3):
                        w.write(client_head(b"/len") * 2)
                        out.append(await read_exact_response(r))
                        out.append(await read_exact_response(r))
                    w.close()
                    for path in (b"/k8", b"/k40"):  # Connection: close added to a view's head
                        out.append(await closing_request(port, path))
                    await settle(ctx)
                    registry.flush()
                    await no_stray_upstream(ctx, stats)
                    pool = len(ctx.state["connector"].pool)
            finally:
                server.close()
                registry.reset()
            return out, samples(d, oport), pool, stats["conns"], stats["heads"]
        return main()

    (out, metrics, _, _, heads), express = three(scenario, taken)
    # /len from the 3rd on (5 + 2 - 2), /404 (2), /reason (1), /k200 and /chunked (2 each,
    # promoted), the closing ones (4 - 2: each connection is new, the table is the worker's);
    # never the pipelined pairs (two requests in one read are no known request); /k8, /k40
    assert express >= 5 + 2 + 1 + 2 + 2 + 2 + 1 + 1, express
    # 3rd sightings on the kept-alive connection, and the closing one each (new connections,
    # but the lane's table is the worker's): whole views, with Connection: close for the latter
    assert by_target[b"/k8"] == by_target[b"/k40"] == 2, by_target
    assert out[0] == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                      b"\r\nhello")
    assert out[-10].endswith(b"Connection: close\r\n\r\nhello")
    for sent, size in ((out[-2], 8 * 1024), (out[-1], 40 * 1024)):
        head, _, body = sent.partition(b"\r\n\r\n")
        assert head.endswith(b"\r\nConnection: close")
        assert body == body_answer(size).partition(b"\r\n\r\n")[2]
    assert len(heads) == len(out)
    assert metrics[("pyngora_requests_total", '{"code": "200", "service": "p"}')] == len(out) - 4


def test_failures_after_sending_get_the_fast_paths_answers(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The origin fails a request the lane already sent: it closes the reused connection
    (retried on a new one), answers garbage (502), stalls (504 after read_seconds), and
    sends the head and the body apart (streamed)."""
    taken = count_takes(monkeypatch)
    phase = {"now": "ok"}

    def script(path: bytes, n: int) -> Optional[bytes]:
        how = phase["now"]
        if how == "close" and n > 1:
            return b"CLOSE"
        if how == "garbage":
            return b"SPDY/9 what\r\n\r\n"
        if how == "stall":
            return b"STALL"
        return None

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            d = fresh_metrics(tmp_path, mode, monkeypatch)
            server, oport, stats = await start_origin(script)
            conf, svc = proxy_service(oport)
            out = []
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    for how in ("close", "garbage", "stall"):
                        phase["now"] = "ok"
                        out += await exchange(port, [(b"GET", b"/len")] * 3)  # pooled, learnt
                        phase["now"] = how
                        r, w = await asyncio.open_connection("127.0.0.1", port)
                        w.write(client_head(b"/len"))
                        out.append(await asyncio.wait_for(read_exact_response(r), 5))
                        w.close()
                    phase["now"] = "ok"
                    await settle(ctx)
                    registry.flush()
            finally:
                server.close()
                registry.reset()
            return out, samples(d, oport)
        return main()

    (out, metrics), express = three(scenario, taken)
    assert express >= 3 + 1 + 1 + 1, express
    assert out[3].startswith(b"HTTP/1.1 200 ")  # retried on a new connection
    assert out[7].startswith(b"HTTP/1.1 502 ")
    assert out[11].startswith(b"HTTP/1.1 504 ")
    assert metrics[("pyngora_requests_total", '{"code": "504", "service": "p"}')] == 1


def test_a_client_gone_before_its_response_closes_the_upstream_and_counts_as_before(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = count_takes(monkeypatch)
    phase = {"stall": False}

    def script(path: bytes, n: int) -> Optional[bytes]:
        return b"STALL" if phase["stall"] else None

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            d = fresh_metrics(tmp_path, mode, monkeypatch)
            server, oport, stats = await start_origin(script)
            conf, svc = proxy_service(oport)
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    phase["stall"] = False
                    out = await exchange(port, [(b"GET", b"/len")] * 3)
                    phase["stall"] = True
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    w.write(client_head(b"/len"))
                    await asyncio.wait_for(_until(lambda: len(stats["heads"]) == 4), 5)
                    w.close()  # before the (stalled) response
                    await asyncio.wait_for(_until(lambda: stats["closed"] >= 1), 5)
                    await settle(ctx)
                    registry.flush()
                    pool = len(ctx.state["connector"].pool)
            finally:
                server.close()
                registry.reset()
            return out, samples(d, oport), pool, stats["closed"]
        return main()

    (_, metrics, pool, closed), express = three(scenario, taken)
    assert express >= 2  # the 3rd request (or 2nd: the parser is the process's), the last
    assert closed == 1 and pool == 0  # the stalled upstream connection was closed, not pooled


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.005)


def test_round_robin_asks_the_balancer_once_per_request_even_when_the_lane_declines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two backends and an empty pool: the lane picks a backend, finds no pooled connection
    and hands its pick to the fast path (which dials it). Asking the balancer again would
    send every dial to the other backend."""
    taken = count_takes(monkeypatch)

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            a_srv, a_port, a = await start_origin()
            b_srv, b_port, b = await start_origin()
            conf, svc = proxy_service_with(f"""      - name: o
        backends: [{{addr: "127.0.0.1:{a_port}"}}, {{addr: "127.0.0.1:{b_port}"}}]
""")
            order = []
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    for _ in range(10):
                        counts = (len(a["heads"]), len(b["heads"]))
                        w.write(client_head(b"/len"))
                        await read_exact_response(r)
                        order.append("a" if len(a["heads"]) > counts[0] else "b")
                        if len(order) % 3 == 0:  # empty the pool now and then: dials again
                            ctx.state["connector"].close_all()
                    w.close()
            finally:
                a_srv.close()
                b_srv.close()
            return order
        return main()

    order, express = three(scenario, taken)
    assert order == ["a", "b"] * 5
    assert express >= 1


def test_keepalive_requests_and_routes_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 5th response on a connection says Connection: close (keepalive_requests: 5) and
    the connection ends; requests go to their route's group; an unrouted one is a 404."""
    taken = count_takes(monkeypatch)

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            a_srv, a_port, a = await start_origin()
            b_srv, b_port, b = await start_origin()
            conf, svc = proxy_service_with(f"""      - name: a
        backends: [{{addr: "127.0.0.1:{a_port}"}}]
      - name: b
        backends: [{{addr: "127.0.0.1:{b_port}"}}]
""", """    routes:
      - {path_prefix: /len, upstream: a}
      - {host: other, upstream: b}
    limits: {keepalive_requests: 5}
""")
            out = []
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    for _ in range(2):
                        r, w = await asyncio.open_connection("127.0.0.1", port)
                        for _ in range(5):
                            w.write(client_head(b"/len"))
                            out.append(await read_exact_response(r))
                        out.append(await asyncio.wait_for(r.read(), 5))  # b"": closed
                        w.close()
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    for _ in range(4):
                        w.write(b"GET /reason HTTP/1.1\r\nHost: other\r\n\r\n")
                        out.append(await read_exact_response(r))
                    w.close()
                    for _ in range(3):  # no route: 404, and the connection closes
                        r, w = await asyncio.open_connection("127.0.0.1", port)
                        w.write(b"GET /reason HTTP/1.1\r\nHost: t\r\n\r\n")
                        out.append(await asyncio.wait_for(r.read(), 5))
                        w.close()
            finally:
                a_srv.close()
                b_srv.close()
            return out, len(a["heads"]), len(b["heads"])
        return main()

    (out, to_a, to_b), express = three(scenario, taken)
    assert express >= 8 + 3, express
    assert b"Connection: close" in out[4] and b"Connection: close" not in out[3]
    assert out[5] == b"" and out[11] == b""
    assert (to_a, to_b) == (10, 4)
    assert all(o.startswith(b"HTTP/1.1 200 Fine Thanks") for o in out[12:16])
    assert all(o.startswith(b"HTTP/1.1 404 ") for o in out[16:])


@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_access_log_lines_are_the_same(fmt: str, handler: Lines,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    taken = count_takes(monkeypatch)

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            server, oport, _ = await start_origin(
                lambda path, n: body_answer(20000) if path == b"/big" else None)
            conf, svc = proxy_service(oport)
            async with serving(svc, conf) as (port, ctx):
                set_mode(ctx, mode)
                engine = ctx.state["http_app"]
                engine.access_format = fmt
                if engine.fast is not None:
                    engine.fast.access_format = fmt
                handler.lines.clear()
                r, w = await asyncio.open_connection("127.0.0.1", port)
                for _ in range(3):
                    for extra in (b"User-Agent: t/1\r\nReferer: http://r/\"q\"\r\n", b""):
                        for path in (b"/len", b"/404", b"/big", b"/chunked"):
                            w.write(client_head(path, extra))
                            await read_exact_response(r)
                w.close()
                for _ in range(3):
                    await closing_request(port, b"/len")
                await settle(ctx)
            server.close()
            return [untimed(line, fmt, oport) for line in handler.lines]
        return main()

    lines, express = three(scenario, taken)
    assert len(lines) == 3 * 2 * 4 + 3
    assert express >= 2 * 2 * 4, express


@pytest.mark.parametrize("retries", ["", "0"])
def test_a_pooled_connection_the_origin_closes_before_the_send_is_not_used(
        retries: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lane takes the request and the pooled connection in one poll phase, and the
    origin's FIN on that connection arrives in the same phase, before the lane sends at the
    end of the iteration: the fast path takes over (another connection, here a dial), as it
    does for its own requests, instead of a 502."""
    taken = count_takes(monkeypatch)

    def scenario(mode: str) -> Any:
        async def main() -> bytes:
            origin = ThreadOrigin()
            conf, svc = proxy_service(origin.port, f"        retries: {retries}\n"
                                      if retries else "")
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    await exchange(port, [(b"GET", b"/x")] * 3)  # learnt, pooled
                    assert len(ctx.state["connector"].pool) == 1
                    client = socket.create_connection(("127.0.0.1", port))
                    me = client.getsockname()
                    await asyncio.wait_for(_until(lambda: any(
                        c.client_addr == me for c in ctx.connections._conns)), 5)
                    up = origin.conns[0]

                    def both() -> None:
                        client.sendall(client_head(b"/x"))
                        up.shutdown(socket.SHUT_WR)
                    actor = threading.Thread(target=both)
                    actor.start()
                    actor.join()  # blocks the loop: both arrive before its next poll
                    client.setblocking(False)
                    r, w = await asyncio.open_connection(sock=client)
                    response = await asyncio.wait_for(read_exact_response(r), 5)
                    w.close()
            finally:
                origin.close()
            return response
        return main()

    response, express = three(scenario, taken)
    assert response == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert express >= 2, express


def test_a_request_pipelined_behind_one_the_lane_took_waits_its_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lane took a request (the origin is slow to answer it); the next one arrives on
    the same connection meanwhile: it is parsed and held, answered after the first, in order."""
    taken = count_takes(monkeypatch)
    slow = {"on": False}

    heads: list[bytes] = []

    def on_head(head: bytes, transport: Any) -> None:
        heads.append(head)
        path = head.split(b" ")[1]
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)
        if slow["on"] and path == b"/first":
            asyncio.get_running_loop().call_later(0.2, transport.write, answer)
        else:
            transport.write(answer)

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(lambda: HeadOrigin(on_head), "127.0.0.1", 0)
            conf, svc = proxy_service(server.sockets[0].getsockname()[1])
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    slow["on"] = False
                    out = await exchange(port, [(b"GET", b"/first")] * 3)
                    slow["on"] = True
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    n = len(heads)
                    w.write(client_head(b"/first"))
                    # once the first is with the origin (which answers it in 0.2 s)
                    await asyncio.wait_for(_until(lambda: len(heads) > n), 5)
                    w.write(client_head(b"/second"))
                    out.append(await asyncio.wait_for(read_exact_response(r), 5))
                    out.append(await asyncio.wait_for(read_exact_response(r), 5))
                    w.close()
            finally:
                slow["on"] = False
                server.close()
            return out
        return main()

    out, express = three(scenario, taken)
    assert out[3].endswith(b"/first") and out[4].endswith(b"/second")
    assert express >= 2, express


def test_read_timeout_counts_from_the_send_even_when_a_first_byte_comes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An origin that sends one byte of its head and stalls gets its 504 read_seconds after
    the request went, not read_seconds after that byte (the lane hands the wait over with
    its deadline)."""
    taken = count_takes(monkeypatch)
    drip = {"on": False}

    def on_head(head: bytes, transport: Any) -> None:
        if drip["on"]:
            asyncio.get_running_loop().call_later(0.8, transport.write, b"H")
        else:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(lambda: HeadOrigin(on_head), "127.0.0.1", 0)
            conf, svc = proxy_service(server.sockets[0].getsockname()[1])  # read_seconds: 1
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    drip["on"] = False
                    await exchange(port, [(b"GET", b"/d")] * 3)
                    drip["on"] = True
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    started = loop.time()
                    w.write(client_head(b"/d"))
                    head = await asyncio.wait_for(r.readuntil(b"\r\n"), 5)
                    waited = loop.time() - started
                    w.close()
            finally:
                server.close()
            return head, waited < 1.5  # 1 s, not 1.8 s (the byte came at 0.8 s)
        return main()

    result, express = three(scenario, taken)
    assert result == (b"HTTP/1.1 504 Gateway Timeout\r\n", True)
    assert express >= 2, express


def test_a_balancer_that_raises_gets_the_fast_paths_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing and the balancer run inside the connection's callback on the lane: what they
    raise must not escape into the event loop (the fast path asks again and answers 500)."""
    from pyngora.proxy import declarative
    taken = count_takes(monkeypatch)
    fail = {"on": False}
    real = declarative._Group.next_addr

    def next_addr(self: Any) -> Any:
        if fail["on"]:
            raise RuntimeError("balancer broke")
        return real(self)
    monkeypatch.setattr(declarative._Group, "next_addr", next_addr)

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            server, oport, _ = await start_origin()
            conf, svc = proxy_service(oport)
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    fail["on"] = False
                    out = [await closing_request(port, b"/len") for _ in range(3)]  # learnt
                    fail["on"] = True
                    out.append(await closing_request(port, b"/len"))
                    fail["on"] = False
                    out.append(await closing_request(port, b"/len"))
            finally:
                fail["on"] = False
                server.close()
            return [o.split(b"\r\n")[0] for o in out]
        return main()

    lines, express = three(scenario, taken)
    assert lines == [b"HTTP/1.1 200 OK"] * 3 + [b"HTTP/1.1 500 Internal Server Error",
                                                 b"HTTP/1.1 200 OK"]
    assert express >= 2, express


class Flaky:
    """A balancer (of the ``balancer_factory`` hook's kind) of one backend that says "no
    backend" on some calls and raises on others: what it answers depends on how often it is
    asked, so asking twice for one request shows."""

    class Backend:
        def __init__(self, addr: str) -> None:
            self.addr = addr

    def __init__(self, addr: str) -> None:
        self.backend = self.Backend(addr)
        self.calls = 0

    def select(self, key: bytes, max_iterations: int = 256) -> Any:
        self.calls += 1
        if self.calls in (5, 9):
            return None
        if self.calls in (7, 11):
            raise RuntimeError("balancer hiccup")
        return self.backend


def test_a_balancer_is_asked_once_per_request_whatever_it_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its "no backend" (503) and its exceptions (500) go with the request to the fast path,
    which does not ask again: the same answers, in the same order, and the same number of
    calls as on the engine."""
    taken = count_takes(monkeypatch)

    def scenario(mode: str) -> Any:
        async def main() -> Any:
            server, oport, _ = await start_origin()
            conf, svc = proxy_service(oport)
            try:
                async with serving(svc, conf) as (port, ctx):
                    set_mode(ctx, mode)
                    group = ctx.state["http_app"].proxy.groups["o"]
                    flaky = group.balancer = Flaky(f"127.0.0.1:{oport}")
                    out = [await closing_request(port, b"/len") for _ in range(12)]
            finally:
                server.close()
            return [o.split(b"\r\n")[0] for o in out], flaky.calls
        return main()

    (lines, calls), express = three(scenario, taken)
    assert calls == 12
    assert lines[4] == lines[8] == b"HTTP/1.1 503 Service Unavailable"
    assert lines[6] == lines[10] == b"HTTP/1.1 500 Internal Server Error"
    assert lines.count(b"HTTP/1.1 200 OK") == 8
    assert express >= 4, express
