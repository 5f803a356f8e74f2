"""HTTP/2 and TLS with real pyngora processes and real clients: curl --http2 over TLS (ALPN),
curl --http2-prior-knowledge on h2c, h2load with 100 concurrent streams through the proxy,
GOAWAY seen by a client whose stream is in flight during a reload (and the stream finishes),
and ``-t`` rejecting an expired certificate or a key that does not match.

Needs the integration described in the HTTP/2 report (HttpService.ssl_context and the
h2_dispatch protocol factory); skipped, with that reason, until it is there."""
from __future__ import annotations

import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from pyngora.services.http_app import HttpService
from tests.support import free_port, read_request_head, self_signed_cert, wait_for

pytestmark = [
    pytest.mark.skipif(not hasattr(HttpService, "ssl_context"),
                       reason="HttpService.ssl_context / h2_dispatch not integrated yet"),
    pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("curl") is None,
                       reason="openssl and curl are needed"),
]


class SlowOrigin(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 origin that answers after ``delay`` seconds, or as soon as ``release`` is
    set (one request per connection)."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.got_request = threading.Event()
        self.release = threading.Event()

        class Handler(socketserver.BaseRequestHandler):
            def handle(h) -> None:  # noqa: N805
                if read_request_head(h.request) is None:
                    return
                self.got_request.set()
                self.release.wait(self.delay)
                h.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n"
                                  b"Connection: close\r\n\r\nslow")

        super().__init__(("127.0.0.1", 0), Handler)


def _config(tmp: Path, ports: dict[str, int], origin: int, cert: str, key: str) -> str:
    return f"""
pid_file: {tmp}/p.pid
upgrade_sock: {tmp}/u.sock
error_log: {tmp}/error.log
grace_period_seconds: 20
services:
  - name: origin
    type: static
    threads: 1
    listeners:
      - {{address: "127.0.0.1:{ports['tls']}", tls: {{cert: {cert}, key: {key}}}}}
      - {{address: "127.0.0.1:{ports['h2c']}", h2c: true}}
    body: hello
  - name: proxy
    type: http_proxy
    threads: 1
    listeners:
      - {{address: "127.0.0.1:{ports['proxy']}", h2c: true}}
    upstreams:
      - name: slow
        backends: [{{addr: "127.0.0.1:{origin}"}}]
        timeouts: {{read_seconds: 30}}
      - name: fast
        backends: [{{addr: "127.0.0.1:{ports['h2c']}"}}]
    routes:
      - {{path_prefix: /slow, upstream: slow}}
      - {{path_prefix: /, upstream: fast}}
"""


@pytest.fixture
def running(tmp_path, pyngora_factory):
    cert, key = self_signed_cert(tmp_path, "h2.test")
    ports = {"tls": free_port(), "h2c": free_port(), "proxy": free_port()}
    origin = SlowOrigin(0.0)
    t = threading.Thread(target=origin.serve_forever, daemon=True)
    t.start()
    try:
        p = pyngora_factory(_config(tmp_path, ports, origin.server_address[1], cert, key)).start()
        for port in ports.values():
            p.wait_serving(port)
        yield p, ports, origin
    finally:
        origin.shutdown()
        origin.server_close()


def _curl(*args: str) -> tuple[int, str, str]:
    r = subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr


def test_curl_http2_over_tls_and_h2c(running) -> None:
    p, ports, _ = running
    rc, out, err = _curl("-k", "--http2", "-o", "-", "-w", "\n%{http_version}",
                         f"https://127.0.0.1:{ports['tls']}/")
    assert rc == 0, err + p.output()
    assert out.split("\n") == ["hello", "2"]
    rc, out, err = _curl("-k", "--http1.1", "-o", "-", "-w", "\n%{http_version}",
                         f"https://127.0.0.1:{ports['tls']}/")
    assert rc == 0 and out.split("\n") == ["hello", "1.1"], err
    rc, out, err = _curl("--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_version}",
                         f"http://127.0.0.1:{ports['h2c']}/")
    assert rc == 0 and out.split("\n") == ["hello", "2"], err
    rc, out, err = _curl("-o", "-", "-w", "\n%{http_version}", f"http://127.0.0.1:{ports['h2c']}/")
    assert rc == 0 and out.split("\n") == ["hello", "1.1"], err  # HTTP/1 on the h2c port


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_h2load_100_streams_through_the_proxy(running) -> None:
    p, ports, origin = running
    for url in (f"http://127.0.0.1:{ports['proxy']}/", f"https://127.0.0.1:{ports['tls']}/"):
        r = subprocess.run(["h2load", "-n", "2000", "-c", "4", "-m", "100", url],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert "2000 succeeded, 0 failed, 0 errored, 0 timeout" in r.stdout, r.stdout
        assert "status codes: 2000 2xx" in r.stdout, r.stdout


def test_goaway_on_reload_and_the_in_flight_stream_finishes(running) -> None:
    p, ports, origin = running
    # the answer waits for the GOAWAY: a reload slower than any fixed delay still shows it
    origin.delay = 20.0
    sock = socket.create_connection(("127.0.0.1", ports["proxy"]), timeout=20)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/slow"),
                          (b":authority", b"t")], end_stream=True)
    sock.sendall(conn.data_to_send())
    try:
        assert origin.got_request.wait(20)
        p.signal(signal.SIGHUP)
        goaways, body, status, ended = [], b"", None, False
        buf = b""
        deadline = time.monotonic() + 25
        while not ended and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n = 9 + int.from_bytes(buf[:3], "big")
                frame, buf = buf[:n], buf[n:]
                if goaways:  # h2 closes its state machine on GOAWAY (h2 issue #1181)
                    conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
                for ev in conn.receive_data(frame):
                    if isinstance(ev, h2.events.ConnectionTerminated):
                        goaways.append((ev.error_code, ev.last_stream_id))
                        origin.release.set()
                    elif isinstance(ev, h2.events.ResponseReceived):
                        status = dict(ev.headers)[b":status"]
                    elif isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                    elif isinstance(ev, h2.events.StreamEnded):
                        ended = True
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
        assert goaways and all(code == 0 for code, _ in goaways), goaways
        assert goaways[-1][1] >= 1
        assert (status, body, ended) == (b"200", b"slow", True)
    finally:
        sock.close()
    # the new generation serves
    wait_for(lambda: _curl("--http2-prior-knowledge", f"http://127.0.0.1:{ports['h2c']}/")[1]
             == "hello", 20, "the reloaded workers")


def test_dash_t_rejects_mismatched_and_missing_certificates(tmp_path, pyngora_factory) -> None:
    a_cert, a_key = self_signed_cert(tmp_path, "a.test")
    b_cert, b_key = self_signed_cert(tmp_path, "b.test")
    port = free_port()
    conf = (f"services:\n  - name: s\n    type: static\n    listeners:\n"
            f"      - {{address: '127.0.0.1:{port}', tls: {{cert: {a_cert}, key: {b_key}}}}}\n")
    p = pyngora_factory(conf, name="bad.yaml")
    r = p.run("-t")
    assert r.returncode == 1
    assert "does not match" in r.stdout + r.stderr
    conf = (f"services:\n  - name: s\n    type: static\n    listeners:\n"
            f"      - {{address: '127.0.0.1:{port}', tls: {{cert: {tmp_path}/none.pem, "
            f"key: {a_key}}}}}\n")
    r = pyngora_factory(conf, name="missing.yaml").run("-t")
    assert r.returncode == 1 and "does not exist" in r.stdout + r.stderr
