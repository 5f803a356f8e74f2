"""YAML keys that only had parse tests, proven to have their effect on a real server
(``python -m pyngora -c``, real sockets, real origins):

- ``total_connect_seconds`` bounds an upstream connect that hangs (TCP, or TLS after it),
  well below ``connect_seconds``: the client gets 504 in about that time;
- ``upstream_keepalive_pool_size`` bounds the idle upstream connections a worker keeps: the
  origin sees the extra ones closed (size 1), or all of them kept and reused (default 128);
- ``log_level`` filters the error log: the master's info and debug lines come and go with it;
- ``access_log_format: json`` writes one JSON object per request to ``access_log``, with the
  fields ``pyngora/proxy/access.py`` documents.
"""
from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest

from tests.origins import Origin
from tests.support import children_of, free_port, get, title, wait_for


def _conf(tmp: Path, port: int, service: str, top: str = "") -> str:
    """A one-worker server with one http_proxy service on ``port``; ``service`` is the rest
    of the service (upstreams, routes), ``top`` more server keys."""
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/error.log\n"
            f"metrics_dir: {tmp}/m\nthreads: 1\n{top}"
            f"services:\n  - name: proxy\n    type: http_proxy\n"
            f"    listeners: ['127.0.0.1:{port}']\n{service}")


def _group(name: str, backend: str, timeouts: str = "connect_seconds: 1, read_seconds: 10",
           extra: str = "") -> str:
    """One upstream group (a list item under ``upstreams:``) of one backend."""
    return (f"      - name: {name}\n        backends: [{{{backend}}}]\n"
            f"        timeouts: {{{timeouts}}}\n{extra}")


# ---------------------------------------------------------------- total_connect_seconds

def _silent_listener() -> socket.socket:
    """A socket the kernel completes TCP handshakes on, and nobody ever answers: a TLS
    ClientHello sent there waits forever."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def _full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full (never accepted): the kernel drops further SYNs,
    so a TCP connect to it hangs. Returns the listener and the connections that filled it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    fillers: list[socket.socket] = []
    while len(fillers) < 16:  # Linux queues backlog + 1; more in case the kernel is generous
        c = socket.socket()
        # A loopback handshake is done at once when there is room: waiting 0.5 s means the
        # SYN was dropped, the queue is full.
        c.settimeout(0.5)
        try:
            c.connect(s.getsockname())
        except OSError:
            c.close()
            break
        fillers.append(c)
    else:
        pytest.skip("this kernel never fills a listener's accept queue")
    assert fillers, "not even one connection reached the accept queue"
    return s, fillers


@pytest.mark.parametrize("stage", ["tls", "tcp"])
def test_total_connect_seconds_bounds_a_hanging_connect(tmp_path: Path, pyngora_factory,
                                                        stage: str) -> None:
    """With ``connect_seconds: 10`` and ``total_connect_seconds: 0.5``, a connect that never
    completes (the TLS handshake, or the TCP connect itself) fails after ~0.5 s with 504
    (ConnectTimedout/TLSHandshakeTimedout), not after connect_seconds' 10 s. Ignoring the key
    would take 10 s: the upper bound of 5 s tells the two apart on a loaded machine."""
    fillers: list[socket.socket] = []
    if stage == "tls":
        backend = _silent_listener()
    else:
        backend, fillers = _full_backlog()
    addr = f"127.0.0.1:{backend.getsockname()[1]}"
    tls = ", tls: true, verify: false" if stage == "tls" else ""
    port = free_port()
    # retries: 0, so one attempt is measured (the default is one try per backend anyway).
    service = ("    upstreams:\n" + _group(
        "app", f"addr: '{addr}'{tls}",
        "connect_seconds: 10, total_connect_seconds: 0.5, read_seconds: 10",
        "        retries: 0\n"))
    try:
        p = pyngora_factory(_conf(tmp_path, port, service)).start()
        p.wait_serving(port)
        start = time.monotonic()
        status, _, body = get(port, timeout=30)
        elapsed = time.monotonic() - start
        assert (status, body) == (504, b""), p.output()
        # >= 0.4: the proxy did wait for the connect (no instant failure of another kind);
        # < 5: it gave up on total_connect_seconds, not on connect_seconds (10 s).
        assert 0.4 <= elapsed < 5.0, f"answered after {elapsed:.2f}s"
    finally:
        for c in fillers:
            c.close()
        backend.close()


# ------------------------------------------------------- upstream_keepalive_pool_size

class _ConnectionCountingOrigin:
    """An HTTP/1.1 origin that counts connections opened and open now, and holds each
    request until ``batch`` requests are in flight at once: a batch of that many concurrent
    requests through the proxy needs that many upstream connections at the same time."""

    def __init__(self, batch: int) -> None:
        self.opened = 0
        self.open = 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(batch, timeout=15)  # cyclic: one pass per batch
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the connection outlives a request

            def setup(self) -> None:
                super().setup()
                with origin.lock:
                    origin.opened += 1
                    origin.open += 1

            def finish(self) -> None:  # the proxy closed the connection (EOF)
                super().finish()
                with origin.lock:
                    origin.open -= 1

            def do_GET(self) -> None:
                origin.barrier.wait()  # BrokenBarrierError (no answer: 502) if never reached
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        self.barrier.abort()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("pool_size", [1, None])
def test_upstream_keepalive_pool_size_bounds_idle_connections(
        tmp_path: Path, pyngora_factory, pool_size: Optional[int]) -> None:
    """One worker, 4 concurrent requests: 4 upstream connections. Afterwards, with
    ``upstream_keepalive_pool_size: 1`` the proxy keeps one idle and closes 3 (the origin
    sees them go), and the next batch of 4 must dial 3 new ones; with the default (128) all
    4 stay open and the next batch reuses them (no new connection)."""
    n = 4
    origin = _ConnectionCountingOrigin(n)
    port = free_port()
    top = f"upstream_keepalive_pool_size: {pool_size}\n" if pool_size is not None else ""
    service = "    upstreams:\n" + _group("app", f"addr: '{origin.addr}'")
    p = pyngora_factory(_conf(tmp_path, port, service, top)).start()
    p.wait_serving(port)

    def batch() -> None:
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda i: get(port, f"/{i}", timeout=30), range(n)))
        assert [(s, b) for s, _, b in answers] == [(200, b"ok")] * n, p.output()

    try:
        batch()
        assert origin.opened == n  # the barrier made the proxy open n at once
        if pool_size == 1:
            # The pool keeps one; the other three are closed on their release.
            wait_for(lambda: origin.open == 1, 10, "the proxy to close all but one")
            batch()  # one reused, three dialled
            assert origin.opened == 2 * n - 1
            wait_for(lambda: origin.open == 1, 10, "the proxy to close all but one again")
        else:
            # A connection is pooled before the client gets its answer (fast_path._finish),
            # so every one is idle in the pool by now: the batch takes them all, dials none.
            batch()
            assert origin.opened == n
            assert origin.open == n
    finally:
        origin.stop()


# ------------------------------------------------------------------------- log_level

@pytest.mark.parametrize("level", ["warning", "info", "debug"])
def test_log_level_filters_the_error_log(tmp_path: Path, pyngora_factory, level: str) -> None:
    """The master logs "pyngora serving" at info and "started worker ..." at debug: with
    ``log_level: warning`` neither is in ``error_log``, with info only the first, with debug
    both. A worker killed afterwards gives a warning line in every case: the file checked is
    the one the master writes, and it was written after the serving line would have been."""
    port = free_port()
    service = "    upstreams:\n" + _group("app", "addr: '127.0.0.1:1'")
    p = pyngora_factory(_conf(tmp_path, port, service, f"log_level: {level}\n"))
    # -d: the launcher returns only once the master has announced serving (its info line
    # is written before that report), so no waiting is needed for that line.
    r = p.run("-d")
    assert r.returncode == 0, r.stderr
    master = int((tmp_path / "p.pid").read_text())
    p.extra_pgids.add(os.getpgid(master))  # killed at the end with the rest
    error_log = tmp_path / "error.log"
    worker = wait_for(lambda: [c for c in children_of(master) if "worker" in title(c)], 10,
                      "the worker")[0]
    os.kill(worker, signal.SIGKILL)
    # The master's warning for the dead worker: "... (pid N) exited with ...".
    wait_for(lambda: f"(pid {worker}) exited with" in error_log.read_text(), 10,
             "the master's warning about the killed worker")
    text = error_log.read_text()
    assert ("pyngora serving:" in text) == (level in ("info", "debug")), text
    assert (" DEBUG " in text and "started worker proxy/0" in text) == (level == "debug"), text
    if level == "warning":
        assert " INFO " not in text and " DEBUG " not in text, text


# ----------------------------------------------------------------- access_log_format

JSON_FIELDS = {"time", "remote_addr", "method", "uri", "protocol", "status", "body_bytes_sent",
               "request_bytes", "request_time", "referer", "user_agent", "host", "upstream",
               "upstream_status", "retries", "error", "service"}


def test_access_log_format_json_writes_one_object_per_request(tmp_path: Path,
                                                             pyngora_factory) -> None:
    """With ``access_log: PATH`` and ``access_log_format: json``, every request (proxied
    200s, an unreachable upstream's 502, an unrouted 404) leaves one line that is a JSON
    object with exactly the documented fields, holding that request's method, uri, status,
    headers and upstream."""
    origin = Origin("origin").start()
    dead = f"127.0.0.1:{free_port()}"
    port = free_port()
    access = tmp_path / "access.log"
    service = ("    upstreams:\n" + _group("app", f"addr: '{origin.addr}'")
               + _group("dead", f"addr: '{dead}'")
               + "    routes:\n      - {path_prefix: /app, upstream: app}\n"
               "      - {path_prefix: /dead, upstream: dead}\n")
    top = f"access_log: {access}\naccess_log_format: json\n"
    p = pyngora_factory(_conf(tmp_path, port, service, top)).start()
    try:
        p.wait_serving(port)
        ua = {"User-Agent": "config-effects/1", "Referer": "http://ref.test/"}
        sent = [("GET", "/app/one?q=1", 200), ("HEAD", "/app/two", 200),
                ("GET", "/dead/x", 502), ("GET", "/nowhere", 404)]
        for method, path, want in sent:
            assert get(port, path, method=method, headers=ua)[0] == want, p.output()
        def written() -> list[str]:
            return access.read_text().splitlines() if access.exists() else []

        # A line is written after its response (the logging phase): await them all.
        wait_for(lambda: len(written()) >= len(sent), 10, "the access log lines")
        lines = written()
        assert len(lines) == len(sent), lines
        for line, (method, path, status) in zip(lines, sent):
            entry = json.loads(line)  # a combined line is not JSON: this fails first
            assert isinstance(entry, dict) and set(entry) == JSON_FIELDS, line
            assert (entry["method"], entry["uri"], entry["status"]) == (method, path, status)
            assert entry["protocol"] == "HTTP/1.1" and entry["service"] == "proxy"
            assert entry["remote_addr"] == "127.0.0.1"
            assert entry["user_agent"] == "config-effects/1"
            assert entry["referer"] == "http://ref.test/"
            assert entry["host"] == f"127.0.0.1:{port}"
            assert isinstance(entry["request_time"], (int, float))
        ok, head, bad, unrouted = (json.loads(line) for line in lines)
        assert (ok["upstream"], ok["upstream_status"]) == (origin.addr, 200)
        assert ok["body_bytes_sent"] == len(b"origin") and ok["error"] is None
        assert head["body_bytes_sent"] == 0  # HEAD: the head only
        assert bad["upstream"] == dead and bad["upstream_status"] is None and bad["error"]
        assert unrouted["upstream"] is None and unrouted["body_bytes_sent"] == 0
    finally:
        origin.stop()
