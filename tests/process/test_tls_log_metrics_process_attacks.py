"""The metrics and access-log attacks of tests/protocol/test_tls_log_metrics_attacks.py
against a real master: an origin that answers any status the client asks for (httpbin's
/status/N) behind an HTTP/2-capable proxy with a combined access log, junk dropped into the
running server's metrics_dir, and the exporter killed with SIGKILL while scraped.

Before the fixes: /metrics answered 500 (then 503) for as long as one junk file lay in the
directory, and 800 status codes made 800 series per label set.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.process.test_metrics_e2e import scrape
from tests.support import (Pyngora, children_of, free_port, get, read_request_head,
                           self_signed_cert, title, wait_for)


class EchoStatusOrigin(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 origin answering ``/status/N`` with status N (one request a connection)."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(h) -> None:  # noqa: N805
                data = read_request_head(h.request)
                if data is None:
                    return
                target = data.split(b" ", 2)[1]
                code = target.rsplit(b"/", 1)[-1] if target.startswith(b"/status/") else b"200"
                h.request.sendall(b"HTTP/1.1 " + code + b" X\r\nContent-Length: 0\r\n"
                                  b"Connection: close\r\n\r\n")

        super().__init__(("127.0.0.1", 0), Handler)


def _conf(tmp: Path, origin: int, proxy: int, metrics: int) -> str:
    return f"""
pid_file: {tmp}/p.pid
upgrade_sock: {tmp}/u.sock
error_log: {tmp}/error.log
access_log: {tmp}/access.log
metrics_dir: {tmp}/metrics
grace_period_seconds: 2
services:
  - name: proxy
    type: http_proxy
    threads: 1
    listeners: [{{address: "127.0.0.1:{proxy}", h2c: true}}]
    upstream: echo
    upstreams:
      - name: echo
        backends: [{{addr: "127.0.0.1:{origin}"}}]
  - name: metrics
    type: prometheus
    listeners: ["127.0.0.1:{metrics}"]
"""


@pytest.fixture
def running(tmp_path: Path, pyngora_factory):
    origin = EchoStatusOrigin()
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    proxy, metrics = free_port(), free_port()
    try:
        p = pyngora_factory(_conf(tmp_path, origin.server_address[1], proxy, metrics)).start()
        p.wait_serving(proxy)
        p.wait_serving(metrics)
        yield p, proxy, metrics, tmp_path
    finally:
        origin.shutdown()
        origin.server_close()


async def _statuses(port: int, codes: range) -> None:
    """GET /status/N for each N (a connection each, 20 at a time); each gets an answer."""
    gate = asyncio.Semaphore(20)

    async def one(code: int) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /status/{code} HTTP/1.1\r\nHost: t\r\n"
                         f"Connection: close\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.read(-1), 10)
            writer.close()
            assert head.startswith(b"HTTP/1.1 "), (code, head)
    await asyncio.gather(*(one(code) for code in codes))


def test_origin_statuses_junk_files_and_a_killed_exporter(running) -> None:
    p, proxy, metrics, tmp = running
    asyncio.run(_statuses(proxy, range(200, 1000)))  # (1xx are interim)
    # Workers publish once a second: wait for the last request to be counted.
    wait_for(lambda: sum(v for k, v in scrape(metrics).items()
                         if k.startswith("pyngora_requests_total{")
                         and 'service="proxy"' in k) >= 800, timeout=15,
             what="the 800 requests counted")
    # Junk in the running server's metrics_dir: torn, empty, foreign, a directory.
    mdir = tmp / "metrics"
    (mdir / "counter_999990.db").write_bytes(b"")
    (mdir / "counter_999991.db").write_bytes(struct.pack("<i", 0x7FFFFFFF) + b"\0" * 4)
    (mdir / "histogram_999992.db").write_bytes(struct.pack("<i", 64) + b"\0" * 4 + b"\x10" * 9)
    (mdir / "counter_999993.db").mkdir()
    # Scraped until the exporter has read the junk (it names each file once; a scrape
    # within RENDER_REUSE_SECONDS of the last shares its render): every answer is a 200.

    def junk_read() -> bool:
        assert get(metrics, "/metrics")[0] == 200  # 500, then 503, before
        said = (tmp / "error.log").read_text()
        return all(n in said for n in ("counter_999991.db", "histogram_999992.db",
                                       "counter_999993.db"))

    wait_for(junk_read, timeout=10, what="the junk files named in the error log")
    status, _, body = get(metrics, "/metrics")
    assert status == 200  # 500, then 503, before
    text = body.decode()
    codes = {line.split('code="')[1].split('"')[0] for line in text.splitlines()
             if line.startswith("pyngora_requests_total{") and 'service="proxy"' in line}
    assert len(codes) <= 69 and {"200", "2xx", "000", "5xx"} <= codes, sorted(codes)
    upstream = [line for line in text.splitlines()
                if line.startswith("pyngora_upstream_requests_total{")]
    assert 0 < len(upstream) <= 69
    if shutil.which("promtool"):
        out = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                             timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
    # The access log: one ASCII line a request.
    lines = wait_for(lambda: [ln for ln in (tmp / "access.log").read_bytes().splitlines()
                              if b"/status/" in ln] if (tmp / "access.log").exists() else [],
                     what="access lines")
    assert all(line.isascii() for line in lines)  # type: ignore[union-attr]
    # The exporter killed with SIGKILL: respawned, and the totals are all still there.
    exporter = next(pid for pid in children_of(p.pid) if "metrics" in title(pid))
    os.kill(exporter, signal.SIGKILL)
    wait_for(lambda: any("metrics" in title(pid) and pid != exporter
                         for pid in children_of(p.pid)), timeout=15, what="a new exporter")
    after = wait_for(lambda: _try_scrape(metrics), timeout=15, what="a scrape after the kill")
    total = sum(v for k, v in after.items()  # type: ignore[union-attr]
                if k.startswith("pyngora_requests_total{") and 'service="proxy"' in k)
    assert total >= 800


def _try_scrape(port: int) -> dict[str, float]:
    """A scrape's samples, or {} while the exporter is not answering yet."""
    try:
        return scrape(port)
    except (OSError, AssertionError):
        return {}


def test_a_worker_restarted_after_its_certificate_broke_serves_the_checked_one(
        tmp_path: Path, pyngora_factory) -> None:
    """A certificate file overwritten with garbage (a half-written renewal) and no reload,
    then a worker dies: the master forks a new one, which used to read the broken file, fail
    to boot ("[SSL] PEM lib", no file named), and after five tries stop the whole server
    (exit 3). It now loads the bytes the master checked at the start (cli.plan_services ->
    tls.remember), as nginx's workers use what their master loaded."""
    p, port, cert = _serving_tls_site(tmp_path, pyngora_factory, "hello")
    good = ssl.PEM_cert_to_DER_cert(Path(cert).read_text())

    def served() -> bytes:
        return _tls_get(port, b"hello")

    assert served() == good
    Path(cert).write_text("garbage\n")
    (old,) = p.workers()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: [w for w in p.workers() if w != old], 20, "a new worker")
    wait_for(lambda: _serves(served), 20, "the new worker serving TLS")
    assert served() == good
    assert p.proc.poll() is None, p.output()


def _tls_site(tmp: Path, port: int, cert: str, key: str, keys: str) -> str:
    """A one-worker static service on a TLS listener at ``port``; ``keys`` are more of the
    service's keys (indented as its others)."""
    return f"""
pid_file: {tmp}/p.pid
upgrade_sock: {tmp}/u.sock
metrics_dir: {tmp}/metrics
services:
  - name: site
    type: static
    threads: 1
    {keys}
    listeners:
      - address: '127.0.0.1:{port}'
        tls: {{cert: '{cert}', key: '{key}'}}
"""


def _serving_tls_site(tmp: Path, pyngora_factory, body: str, limits: str = ""
                      ) -> tuple[Pyngora, int, str]:
    """A ``_tls_site`` answering ``body`` (with ``limits``, a flow mapping, when given),
    started and serving TLS: (the master, its port, the certificate's path)."""
    cert, key = self_signed_cert(tmp, "tls.test")
    port = free_port()
    keys = f'body: "{body}"' + (f"\n    limits: {limits}" if limits else "")
    p = pyngora_factory(_tls_site(tmp, port, cert, key, keys)).start()
    p.wait_serving(port)
    wait_for(lambda: _serves(lambda: _tls_get(port, body.encode())), 20,
             "the worker serving TLS")
    return p, port, cert


def _tls_get(port: int, body: bytes) -> bytes:
    """One GET over TLS to ``port`` (any certificate): asserts the answer ends with ``body``;
    returns the certificate served (DER)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="tls.test") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
            assert answer.endswith(body), answer
            return s.getpeercert(binary_form=True)


def _serves(probe) -> bool:
    try:
        probe()
        return True
    except (OSError, AssertionError):
        return False


def test_a_tls_client_that_never_says_hello_is_closed_after_the_header_timeout(
        tmp_path: Path, pyngora_factory) -> None:
    """A client that connects to a TLS listener and sends no ClientHello (a slowloris of
    TLS) was held for uvloop's 60 s handshake timeout, whatever the service's limits. The
    handshake is now bounded by ``limits.header_read_timeout_seconds`` (nginx bounds it by
    client_header_timeout): here 1 s, so the server hangs up well before 60."""
    p, port, _ = _serving_tls_site(tmp_path, pyngora_factory, "hi",
                                   "{header_read_timeout_seconds: 1}")
    workers = p.workers()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as silent:
        start = time.monotonic()
        try:
            assert silent.recv(1024) == b""  # the server's close (a timeout raises instead)
        except ConnectionResetError:
            pass  # (uvloop aborts a handshake that timed out: a reset is the server's close)
        waited = time.monotonic() - start
    assert waited < 15, f"held for {waited:.1f}s"
    assert _tls_get(port, b"hi") and p.workers() == workers  # (the worker's own hang-up)


def test_a_header_timeout_of_0_still_serves_tls(tmp_path: Path, pyngora_factory) -> None:
    """(A review's finding.) ``header_read_timeout_seconds: 0`` (no header timeout) became
    a handshake timeout of 0, which uvloop refuses per connection: every TLS client hung
    and its descriptor leaked, while -t and the start said all was well."""
    p, _, _ = _serving_tls_site(tmp_path, pyngora_factory, "zero",
                                "{header_read_timeout_seconds: 0}")
    assert "ssl_handshake_timeout" not in p.output()
