"""Origin faults through the real proxy: each gets its SPEC status (section 7), and nothing
hangs (every client read has a timeout well above the proxy's own, so a hang fails the test).

One proxy serves every case, routed by path prefix to one misbehaving origin each.
"""
from __future__ import annotations

import socket
import time
from typing import Iterator

import pytest

from tests.reliability.rawnet import RawOrigin, read_reply, read_request_head, request, reset
from tests.support import Pyngora, free_port, wait_for

READ_TIMEOUT = 1.0  # the proxy's upstream read timeout; clients wait 10x that at most
CLIENT_TIMEOUT = 10.0


def _truncating(conn: socket.socket, n: int) -> None:
    """Announces 100000 bytes, sends 1000, then resets the connection."""
    if read_request_head(conn)[0]:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.05)
        reset(conn)


def _silent(conn: socket.socket, n: int) -> None:
    """Reads the request and never answers (until the proxy gives up)."""
    if read_request_head(conn)[0]:
        conn.recv(1)  # returns when the proxy closes its side


def _head_then_stall(conn: socket.socket, n: int) -> None:
    if read_request_head(conn)[0]:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        conn.recv(1)


def _garbage(conn: socket.socket, n: int) -> None:
    if read_request_head(conn)[0]:
        conn.sendall(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n")
        time.sleep(0.2)


def _reset_at_once(conn: socket.socket, n: int) -> None:
    """Reads the request, then resets the (fresh) connection without a byte of answer."""
    if read_request_head(conn)[0]:
        reset(conn)


def _close_at_once(conn: socket.socket, n: int) -> None:
    """Reads the request, then closes (FIN) without a byte of answer."""
    read_request_head(conn)


RESETS: list[int] = []  # connections _close_on_reuse reset when a second request came


def _close_on_reuse(conn: socket.socket, n: int) -> None:
    """Answers the first request on each connection with keep-alive; a second request on the
    same connection makes it close without a byte of answer (the pooled-connection race)."""
    head, rest = read_request_head(conn)
    if not head:
        return
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
    head, rest = read_request_head(conn, rest)
    if head:
        RESETS.append(n)
        reset(conn)


CASES = {"truncate": _truncating, "silent": _silent, "stall": _head_then_stall,
         "garbage": _garbage, "reuse": _close_on_reuse, "rst": _reset_at_once,
         "fin": _close_at_once}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[tuple[int, dict[str, RawOrigin], Pyngora]]:
    tmp = tmp_path_factory.mktemp("faults")
    origins = {name: RawOrigin(h) for name, h in CASES.items()}
    refused = free_port()  # nothing listens there
    port = free_port()
    ups = [f"      - name: refuse\n        backends: [{{addr: '127.0.0.1:{refused}'}}]\n"
           f"        timeouts: {{connect_seconds: 1}}\n"]
    routes = ["      - {path_prefix: /refuse, upstream: refuse}\n"]
    for name, o in origins.items():
        ups.append(f"      - name: {name}\n        backends: [{{addr: '{o.addr}'}}]\n"
                   f"        timeouts: {{connect_seconds: 1, read_seconds: {READ_TIMEOUT}}}\n")
        routes.append(f"      - {{path_prefix: /{name}, upstream: {name}}}\n")
    conf = (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nmetrics_dir: {tmp}/m\n"
            f"threads: 1\nservices:\n  - name: proxy\n    type: http_proxy\n"
            f"    listeners: ['127.0.0.1:{port}']\n    upstreams:\n" + "".join(ups) +
            "    routes:\n" + "".join(routes))
    p = Pyngora(tmp, conf).start()
    try:
        p.wait_serving(port)
        wait_for(lambda: len(p.workers()) == 1, 20, "the worker")
        yield port, origins, p
    finally:
        p.stop()
        for o in origins.values():
            o.stop()


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def test_origin_refusing_is_502(proxy) -> None:
    port, _, p = proxy
    r = request(port, _get("/refuse"), CLIENT_TIMEOUT)
    assert r.complete and r.status == 502, (r.status, r.error)
    assert r.body == b"" and r.headers.get("cache-control") == "private, no-store"


def test_origin_reset_mid_response_cuts_the_client(proxy) -> None:
    port, _, p = proxy
    workers = set(p.workers())
    t0 = time.monotonic()
    r = request(port, _get("/truncate"), CLIENT_TIMEOUT)  # socket.timeout here = a hang
    # The head was already forwarded: the only honest signal left is a cut connection.
    assert r.status == 200 and not r.complete, (r.status, r.error)
    assert 0 < len(r.body) < 100000 and r.error
    assert time.monotonic() - t0 < CLIENT_TIMEOUT
    assert set(p.workers()) == workers


def test_origin_silent_after_request_is_504(proxy) -> None:
    port, _, p = proxy
    t0 = time.monotonic()
    r = request(port, _get("/silent"), CLIENT_TIMEOUT)
    assert r.complete and r.status == 504, (r.status, r.error)
    assert time.monotonic() - t0 >= READ_TIMEOUT * 0.9


def test_origin_stalling_after_head_cuts_the_connection(proxy) -> None:
    port, _, p = proxy
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
        s.sendall(_get("/stall"))
        r, _ = read_reply(s)
        assert r.status == 200 and not r.complete, (r.status, r.error, r.body)
        assert r.body == b"abc"


@pytest.mark.parametrize("path", ["/rst", "/fin"])
def test_origin_dropping_a_fresh_connection_is_502(proxy, path: str) -> None:
    port, _, p = proxy
    r = request(port, _get(path), CLIENT_TIMEOUT)
    assert r.complete and r.status == 502, (r.status, r.error)


def test_origin_garbage_is_502(proxy) -> None:
    port, _, p = proxy
    r = request(port, _get("/garbage"), CLIENT_TIMEOUT)
    assert r.complete and r.status == 502, (r.status, r.error)


def test_pooled_connection_closed_on_reuse_is_retried(proxy) -> None:
    port, origins, p = proxy
    o = origins["reuse"]
    before, resets = o.connections, len(RESETS)
    # Two requests in a row on one worker: the second goes to the pooled connection, which
    # the origin resets on seeing it; the proxy must retry on a fresh one (GET, no byte back).
    for i in range(4):
        r = request(port, _get("/reuse"), CLIENT_TIMEOUT)
        assert r.complete and r.status == 200 and r.body == b"fresh", (i, r.status, r.error)
    # each request after the first tried the pooled connection first (reset), then a new one
    # (which the next request reuses): 4 connections, 3 of them reset on their reuse
    assert o.connections - before == 4 and len(RESETS) - resets == 3, (o.connections, RESETS)


def test_after_the_faults_the_worker_still_serves(proxy) -> None:
    port, _, p = proxy
    assert len(p.workers()) == 1
    r = request(port, _get("/refuse"), CLIENT_TIMEOUT)
    assert r.status == 502
