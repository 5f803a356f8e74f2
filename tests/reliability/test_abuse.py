"""Abusive clients against the real server: slowloris, a client that never reads, oversized
heads, huge chunk sizes, and 10,000 pipelined requests in one write. Each is answered or
refused within the limits, and normal clients keep being served."""
from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from typing import Iterator

import pytest

from tests.reliability.rawnet import (RawOrigin, read_reply, read_request_head, request, rss_kib,
                                      wait_until)
from tests.support import Pyngora, free_port, get, wait_for

SLOWLORIS = 2000
HEADER_TIMEOUT = 4.0
PROXY_PORT: list[int] = []  # the module fixture's proxy (in front of its static service)


def _raise_nofile(want: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE (pyngora, started from here, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _conf(tmp, port: int, body_kib: int = 0, extra_services: str = "") -> str:
    body = "x" * (body_kib * 1024) if body_kib else "hi"
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nmetrics_dir: {tmp}/m\n"
            f"threads: 1\nservices:\n  - name: origin\n    type: static\n"
            f"    listeners: ['127.0.0.1:{port}']\n    body: {body}\n"
            f"    limits: {{header_read_timeout_seconds: {HEADER_TIMEOUT}, "
            f"max_header_bytes: 16384, max_body_bytes: 1048576}}\n" + extra_services)


def _sink(conn: socket.socket, n: int) -> None:
    """An origin that reads everything and never answers (until its client gives up)."""
    while conn.recv(65536):
        pass


@pytest.fixture(scope="module")
def static(tmp_path_factory) -> Iterator[tuple[int, Pyngora]]:
    _raise_nofile(3 * SLOWLORIS + 1024)
    tmp = tmp_path_factory.mktemp("abuse")
    port, pport = free_port(), free_port()
    sink = RawOrigin(_sink)  # reads request bodies to the end before it would answer
    proxy = (f"  - name: proxy\n    type: http_proxy\n    listeners: ['127.0.0.1:{pport}']\n"
             f"    upstream: origin\n    upstreams:\n      - name: origin\n"
             f"        backends: [{{addr: '{sink.addr}'}}]\n"
             f"    limits: {{max_header_bytes: 16384, max_body_bytes: 1048576}}\n")
    p = Pyngora(tmp, _conf(tmp, port, extra_services=proxy)).start()
    try:
        p.wait_serving(port)
        p.wait_serving(pport)
        wait_for(lambda: len(p.workers()) == 2, 20, "a worker per service")
        PROXY_PORT.append(pport)
        yield port, p
    finally:
        p.stop()
        sink.stop()


def test_slowloris_does_not_starve_normal_clients(static) -> None:
    port, p = static
    workers = sorted(p.workers())
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        for i in range(SLOWLORIS):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        time.sleep(0.2)
        for s in socks:
            try:
                s.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n")
            except OSError:
                pass
        served = []
        t0 = time.monotonic()
        # Trickle one header byte per connection every ~0.5 s while normal clients ask.
        while time.monotonic() - t0 < HEADER_TIMEOUT * 0.6:
            for s in socks:
                try:
                    s.send(b"X")
                except OSError:
                    pass
            for _ in range(5):
                status, _, body = get(port, "/", timeout=10)
                served.append(status)
        assert served and all(c == 200 for c in served), served
        # The header timeout then ends every trickling connection (408 + close), however
        # much it trickles: the count of closed ones reaches all of them.
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        closed: set[int] = set()
        end = time.monotonic() + HEADER_TIMEOUT * 3 + 10
        while len(closed) < len(socks) and time.monotonic() < end:
            for key, _ in sel.select(0.5):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    data = s.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    closed.add(id(s))
                    sel.unregister(s)
            for s in socks:  # the trickle goes on
                if id(s) not in closed:
                    try:
                        s.send(b"Y")
                    except OSError:
                        pass
        print(f"\nslowloris: {SLOWLORIS} connections, {len(served)} normal requests all 200 "
              f"meanwhile; {len(closed)} slow connections closed by the header timeout "
              f"({HEADER_TIMEOUT}s) within {time.monotonic() - t0:.1f}s")
        assert len(closed) == len(socks)
        assert sorted(p.workers()) == workers  # no worker died
        assert get(port, "/")[0] == 200
    finally:
        sel.close()
        for s in socks:
            s.close()


def test_client_that_never_reads_pipelined_big_responses(tmp_path) -> None:
    """1 MiB responses, 300 pipelined requests, never read: the worker stops reading requests
    once its write buffer is full, so its memory stays bounded (not 300 MiB)."""
    port = free_port()
    p = Pyngora(tmp_path, _conf(tmp_path, port, body_kib=1024)).start()
    try:
        p.wait_serving(port)
        worker = wait_for(lambda: p.workers(), 20, "the worker")[0]  # type: ignore[index]
        assert get(port, "/")[0] == 200
        rss0 = rss_kib(worker)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            reqs = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 300
            s.setblocking(False)
            try:
                s.send(reqs)  # as much as the kernel takes; the rest is never needed
            except BlockingIOError:
                pass
            peak = rss0
            for _ in range(20):
                time.sleep(0.1)
                peak = max(peak, rss_kib(worker))
            # it still serves others meanwhile
            assert get(port, "/", timeout=10)[0] == 200
        growth = (peak - rss0) / 1024
        print(f"\nnever-reading client: worker RSS {rss0 / 1024:.1f} MiB -> peak "
              f"{peak / 1024:.1f} MiB (+{growth:.1f} MiB) with 300 MiB of responses asked")
        assert growth < 48, growth
    finally:
        p.stop()


def test_client_that_never_reads_a_proxied_download(tmp_path) -> None:
    """A 200 MiB download through the proxy to a client that never reads: back-pressure stops
    the origin, and the worker's RSS stays bounded."""
    total = 200 * 1024 * 1024
    sent = [0]

    def big(conn: socket.socket, n: int) -> None:
        buf = b""
        while True:
            head, buf = read_request_head(conn, buf)
            if not head:
                return
            if head.startswith(b"GET /big "):
                break
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # warm-up
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        chunk = b"z" * 65536
        conn.settimeout(5)
        while sent[0] < total:
            try:
                conn.sendall(chunk)
            except (socket.timeout, OSError):
                return  # blocked: the proxy stopped reading (back-pressure)
            sent[0] += len(chunk)

    origin = RawOrigin(big)
    port = free_port()
    conf = (f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
            f"metrics_dir: {tmp_path}/m\nthreads: 1\nservices:\n  - name: proxy\n"
            f"    type: http_proxy\n    listeners: ['127.0.0.1:{port}']\n    upstream: big\n"
            f"    upstreams:\n      - name: big\n        backends: [{{addr: '{origin.addr}'}}]\n")
    p = Pyngora(tmp_path, conf).start()
    try:
        p.wait_serving(port)
        worker = wait_for(lambda: p.workers(), 20, "the worker")[0]  # type: ignore[index]
        assert get(port, "/small")[0] == 200  # the worker is up and has proxied once
        rss0 = rss_kib(worker)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            # wait until the origin is blocked (sent stops moving)
            last = [-1]

            def settled() -> bool:
                v, last[0] = last[0], sent[0]
                return v == sent[0] and v > 0
            wait_until(settled, 20, interval=0.5)
            peak = rss_kib(worker)
        growth = (peak - rss0) / 1024
        print(f"\nnever-reading download: origin sent {sent[0] / 2**20:.1f} of 200 MiB before "
              f"back-pressure stopped it; worker RSS +{growth:.1f} MiB")
        assert sent[0] < total // 4
        assert growth < 48, growth
    finally:
        p.stop()
        origin.stop()


def test_oversized_head_is_431(static) -> None:
    port, p = static
    r = request(port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert r.status == 431 and r.complete, (r.status, r.error)
    r = request(port, b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Many: 1\r\n" * 300 + b"\r\n")
    assert r.status == 431 and r.complete, (r.status, r.error)
    # a head that never ends is cut at the limit, not buffered forever
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        try:
            for _ in range(64):
                s.sendall(b"b" * 1024)
        except OSError:
            pass
        r, _ = read_reply(s)
        assert r.status in (431, 0), (r.status, r.error)


@pytest.mark.parametrize("size", [b"FFFFFFFFFFFFFFFFFFFFFF", b"7FFFFFFF", b"100001"])
@pytest.mark.parametrize("via", ["static", "proxy"])
def test_huge_chunk_sizes_are_refused(static, size: bytes, via: str) -> None:
    port, p = static
    target = port if via == "static" else PROXY_PORT[0]
    with socket.create_connection(("127.0.0.1", target), timeout=10) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + size +
                  b"\r\n")
        try:
            for _ in range(40):  # 1.25 MiB of chunk data: over max_body_bytes (1 MiB)
                s.sendall(b"c" * 32768)
        except OSError:
            pass  # refused early and closed: fine
        r, rest = read_reply(s)
        # Whatever the answer, the connection then ends (no hang, no second answer).
        tail = b""
        if r.complete:
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    tail += chunk
            except OSError:
                pass
    print(f"\nchunk size {size!r} via {via}: {r.status} {r.error}")
    if via == "static":
        # The static service answers before reading a body, then reads and drops it within
        # the limits; the bad chunk ends the connection. (The proxy's origin reads the body
        # first, so there the proxy's own refusal is what the client sees.)
        assert r.status in (200, 400, 413), (r.status, r.error)
    else:
        assert r.status in (400, 413), (r.status, r.error)
    assert rest + tail == b"", rest + tail
    assert p.workers() and get(port, "/")[0] == 200


def test_ten_thousand_pipelined_requests_in_one_write(static) -> None:
    port, p = static
    n = 10000
    reqs = b"".join(b"GET /item/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(n))
    got: list[int] = []
    err: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        def reader() -> None:
            buf = b""
            try:
                while len(got) < n:
                    r, buf = read_reply(s, buf)
                    if not r.complete:
                        err.append(r.error)
                        return
                    got.append(r.status)
            except OSError as e:
                err.append(repr(e))
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.sendall(reqs)
        t.join(60)
    print(f"\npipelined: {len(got)} of {n} answered ({len(reqs)} bytes in one write)")
    assert not err, (len(got), err)
    assert len(got) == n and set(got) == {200}
