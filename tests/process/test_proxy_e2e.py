"""The HTTP/1 proxy through the real server (python -m pyngora) with real clients: curl and
raw sockets, in front of real origins that count what reaches them."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import pytest

from tests.origins import Origin
from tests.support import free_port, get, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")


def _conf(tmp, port: int, backend: str, read: float = 2.0, threads: int = 1) -> str:
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/error.log\n"
            f"metrics_dir: {tmp}/m\nthreads: {threads}\n"
            f"services:\n  - name: proxy\n    type: http_proxy\n"
            f"    listeners: ['127.0.0.1:{port}']\n"
            f"    upstreams:\n      - name: app\n        backends: [{{addr: '{backend}'}}]\n"
            f"        timeouts: {{connect_seconds: 1, read_seconds: {read}}}\n")


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          timeout=30)


@pytest.fixture
def origin():
    o = Origin("origin").start()
    yield o
    o.stop()


@pytest.fixture
def proxy(tmp_path, pyngora_factory, origin):
    port = free_port()
    p = pyngora_factory(_conf(tmp_path, port, origin.addr)).start()
    p.wait_serving(port)
    return port


def test_keepalive_reuse_both_sides(proxy, origin) -> None:
    urls = [f"http://127.0.0.1:{proxy}/{i}" for i in range(10)]
    r = curl("-v", *urls)  # curl reuses one connection for the ten
    assert r.returncode == 0 and r.stdout == b"origin" * 10
    assert r.stderr.count(b"Re-using existing connection") >= 9
    # the origin counts a request after writing its answer: curl may be done before that
    wait_for(lambda: origin.counts["requests"] == 10, 5, "the origin's count")
    assert origin.counts["connections"] == 1  # the upstream pool reused one connection


def test_pipelining_answers_in_order(proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
        s.sendall(b"".join(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(20))
                  + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 21 and data.count(b"\r\n\r\norigin") == 21


def test_chunked_upload_and_100_continue(tmp_path, pyngora_factory) -> None:
    echo = _EchoOrigin()
    port = free_port()
    p = pyngora_factory(_conf(tmp_path, port, echo.addr)).start()
    p.wait_serving(port)
    try:
        body = tmp_path / "body"
        body.write_bytes(b"x" * 300_000)
        r = curl("-v", "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
                 "--data-binary", f"@{body}", f"http://127.0.0.1:{port}/up")
        assert r.returncode == 0, r.stderr
        assert b"HTTP/1.1 100 Continue" in r.stderr
        assert r.stdout == b"300000"  # the origin got every byte, re-framed
    finally:
        echo.stop()


def test_head_has_no_body(proxy) -> None:
    r = curl("-I", f"http://127.0.0.1:{proxy}/")
    assert r.returncode == 0 and r.stdout.startswith(b"HTTP/1.1 200")
    assert b"content-length: 6" in r.stdout.lower()
    # on one connection, HEAD then GET: the GET's status line follows the HEAD's head at once
    with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200")
    assert rest.endswith(b"\r\n\r\norigin")


def test_upstream_refused_is_502(tmp_path, pyngora_factory) -> None:
    port, dead = free_port(), free_port()
    p = pyngora_factory(_conf(tmp_path, port, f"127.0.0.1:{dead}")).start()
    p.wait_serving(port)
    status, headers, body = get(port)
    assert (status, body) == (502, b"")
    assert headers["cache-control"] == "private, no-store"


def test_silent_upstream_is_504_after_read_timeout(tmp_path, pyngora_factory) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (in the kernel) and never answers
    port = free_port()
    try:
        p = pyngora_factory(_conf(tmp_path, port, f"127.0.0.1:{silent.getsockname()[1]}",
                                  read=1.0)).start()
        p.wait_serving(port)
        status, _, body = get(port, timeout=20)
        assert (status, body) == (504, b"")
    finally:
        silent.close()


def test_malformed_request_never_reaches_upstream(proxy, origin) -> None:
    with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 400")
    assert origin.counts["connections"] == 0


class _EchoOrigin:
    """Answers every POST with the number of body bytes it received."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import http.server

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                n = 0
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            break
                        n += len(self.rfile.read(size))
                        self.rfile.readline()
                else:
                    n = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                out = str(n).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a: object) -> None:
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H, bind_and_activate=False)
        srv.socket.close()
        srv.socket = self.sock
        self.srv = srv
        srv.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        wait_for(lambda: hasattr(self, "srv"), 5, "the echo origin")
        self.srv.shutdown()
        self.sock.close()


class _ResetFirst:
    """Resets (RST) the first connection after reading its request; answers the others."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import struct
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.recv(65536)
            if self.connections == 1:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            conn.close()


@pytest.mark.parametrize("method,expect,attempts", [("GET", 200, 2), ("POST", 502, 1)])
def test_lost_fresh_connection_retried_only_when_idempotent(tmp_path, pyngora_factory,
                                                            method, expect, attempts) -> None:
    origin = _ResetFirst()
    port = free_port()
    p = pyngora_factory(_conf(tmp_path, port, origin.addr)).start()
    p.wait_serving(port)
    try:
        status, _, _ = get(port, method=method, body=b"data" if method == "POST" else None)
        assert status == expect
        assert origin.connections == attempts
    finally:
        origin.sock.close()
